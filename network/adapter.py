"""The network adapter: the network service's notifications in, events out.

Listens with oslo.messaging on the notification topic(s) an unmodified
network service already emits to (exchange ``neutron``, topic
``notifications``), in a pool of its own, so it never takes notifications
away from other listeners on the same topic (telemetry, search): the pool
queue is bound beside theirs. Several adapters sharing the pool share the
work.

One worker thread: notifications about a port must be judged in the order
they were emitted, and the translator's memory is not shared. A notification
is acknowledged only after its events are safe (confirmed or spooled); when
publishing fails (spool full, or no spool and no broker), it is requeued
after a pause, and the translator is left as it was so the requeued copy is
judged the same way.
"""

import logging
import threading
from dataclasses import dataclass, field

import oslo_messaging
from oslo_config import cfg

from network.notifications import EVENT_TYPE_PATTERN, NotificationTranslator

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSettings:
    transport_url: str = "rabbit://guest:guest@127.0.0.1:5672/"
    exchange: str = "neutron"
    topics: tuple = ("notifications",)
    pool: str = "evrouter-network-adapter"
    max_ports: int = 100_000
    requeue_delay: float = 2.0
    # oslo.messaging's own options ([oslo_messaging_rabbit] ...): a separate
    # ConfigOpts, as evrouter's [DEFAULT] transport_url means the bus.
    messaging_conf: object = field(default=None, compare=False)


class PortNotificationEndpoint:
    filter_rule = oslo_messaging.NotificationFilter(
        event_type=EVENT_TYPE_PATTERN)

    def __init__(self, translator, publish, *, requeue_delay=2.0, stop=None):
        self.translator = translator
        self.publish = publish
        self.requeue_delay = requeue_delay
        self._stop = stop or threading.Event()
        self.handled = 0

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        events, remember = self.translator.translate(event_type, payload)
        message_id = (metadata or {}).get("message_id")
        try:
            for event in events:
                self.publish(event)
        except Exception as exc:
            # The events published before the failure go out again with the
            # requeued notification (at-least-once; the waiter dedups).
            LOG.error("notification %s %s from %s requeued: %s", message_id,
                      event_type, publisher_id, exc)
            self._stop.wait(self.requeue_delay)
            return oslo_messaging.NotificationResult.REQUEUE
        remember()
        self.handled += 1
        LOG.debug("notification %s %s from %s: %d event(s)", message_id,
                  event_type, publisher_id, len(events))
        return oslo_messaging.NotificationResult.HANDLED


class NetworkAdapter:
    """The listener, around a publish callable (the network publisher's)."""

    def __init__(self, settings, publish):
        self.settings = settings
        self._stop = threading.Event()
        self.endpoint = PortNotificationEndpoint(
            NotificationTranslator(settings.max_ports), publish,
            requeue_delay=settings.requeue_delay, stop=self._stop)
        self._transport = None
        self._listener = None

    def start(self):
        s = self.settings
        conf = s.messaging_conf
        if conf is None:
            conf = cfg.ConfigOpts()
            conf([], project="evrouter")
        self._transport = oslo_messaging.get_notification_transport(
            conf, url=s.transport_url)
        targets = [oslo_messaging.Target(exchange=s.exchange, topic=topic)
                   for topic in s.topics]
        self._listener = oslo_messaging.get_notification_listener(
            self._transport, targets, [self.endpoint], executor="threading",
            allow_requeue=True, pool=s.pool)
        self._listener.start(override_pool_size=1)
        LOG.info("network adapter listening on exchange %s topics %s "
                 "(pool %s)", s.exchange, ",".join(s.topics), s.pool)
        return self

    def stop(self):
        """Stop taking notifications; returns once the one in hand is done."""
        self._stop.set()
        if self._listener is not None:
            self._listener.stop()
            self._listener.wait()
            self._listener = None
        if self._transport is not None:
            self._transport.cleanup()
            self._transport = None
