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
judged the same way. The pause grows while publishing keeps failing (the
reconnect schedule of router.bus.backoff, from ``requeue_delay``) and starts
afresh once a notification went through: a broker that stays away is not
asked about the same notification every two seconds for ever.

A notification is judged before anything of it is published: translated
and each event checked against the contract. One that fails there -- or
anywhere oslo.messaging looks at it before us -- is the notification's
fault, and requeueing it would bring it back for ever (oslo.messaging
requeues whatever raises). It is logged with its id and the reason and
acknowledged; the next one flows. It is not dead-lettered: the network
service's notification is not an evrouter envelope, and the network user
may write only events to the ingress exchange.

Each event's message id is derived from the notification's own
``message_id`` (see notifications.event_message_id): a notification
redelivered after its events went out -- an adapter killed before its ack
-- publishes the same ids again, and the waiter drops the copies.
"""

import logging
import threading
import time
from dataclasses import dataclass, field

import oslo_messaging
from oslo_config import cfg
from oslo_messaging.notify import dispatcher as notify_dispatcher
from oslo_messaging.notify import listener as notify_listener

from network.notifications import (
    EVENT_TYPE_PATTERN,
    NotificationTranslator,
    event_message_id,
)
from router.bus import contract
from router.bus.backoff import Backoff, Schedule

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

    def __init__(self, translator, publish, *, requeue_delay=2.0, stop=None,
                 producer="network-adapter"):
        self.translator = translator
        self.publish = publish
        self.requeue_delay = requeue_delay
        # Publishing has been healthy since (None: the last one failed).
        self._ok_since = time.monotonic()
        self._pause = Backoff(Schedule(
            first=requeue_delay, cap=max(30.0, requeue_delay),
            healthy_after=0))
        self.producer = producer
        self._stop = stop or threading.Event()
        self.handled = 0
        self.dropped = 0

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        message_id = (metadata if isinstance(metadata, dict) else {}).get(
            "message_id")
        try:
            events, remember = self.translator.translate(event_type, payload)
            named = [(event, self._checked_id(message_id, event))
                     for event in events]
        except Exception as exc:
            return self.drop(message_id, event_type, publisher_id, exc)
        try:
            for event, event_id in named:
                self.publish(event, message_id=event_id)
        except Exception as exc:
            # Not the notification's fault (it was judged above): the
            # publisher could not make the events safe. The events published
            # before the failure go out again with the requeued notification,
            # under the same ids, so the waiter drops them.
            delay = self._pause.failed(exc, self._ok_since)
            self._ok_since = None
            LOG.error("notification %s %s from %s requeued in %.1fs "
                      "(failure %d in a row): %s", _printable(message_id),
                      _printable(event_type), _printable(publisher_id), delay,
                      self._pause.attempt, exc)
            self._stop.wait(delay)
            return oslo_messaging.NotificationResult.REQUEUE
        remember()
        if self._ok_since is None:
            self._ok_since = time.monotonic()
        self.handled += 1
        LOG.debug("notification %s %s from %s: %d event(s)", _printable(message_id),
                  _printable(event_type), _printable(publisher_id), len(named))
        return oslo_messaging.NotificationResult.HANDLED

    def _checked_id(self, message_id, event):
        """The event's derived id, once the contract accepts event and id
        (the same check the publisher and the router make)."""
        event_id = event_message_id(message_id, event)
        contract.decode(contract.encode(
            contract.envelope(event, self.producer, message_id=event_id)))
        return event_id

    def drop(self, message_id, event_type, publisher_id, exc):
        """Acknowledge a notification that can never be handled, loudly."""
        self.dropped += 1
        reason = (contract.REASON_INVALID
                  if isinstance(exc, contract.ContractError)
                  else contract.REASON_INTERNAL)
        LOG.warning("notification %s %s from %s dropped (%s): %s",
                    _printable(message_id), _printable(event_type),
                    _printable(publisher_id), reason, _describe(exc))
        return oslo_messaging.NotificationResult.HANDLED


class ContainedDispatcher(notify_dispatcher.NotificationDispatcher):
    """oslo.messaging's dispatcher, minus requeue-for-ever.

    oslo.messaging requeues a notification when anything raises while it is
    dispatched, before an endpoint sees it (a priority that is not a string
    is enough) or inside one; with requeue allowed, that copy comes back at
    once, again and again. Here it goes to `on_drop` (log, count,
    acknowledge). Endpoints still ask for a requeue by returning REQUEUE.
    """

    def __init__(self, endpoints, on_drop, serializer=None):
        super().__init__(endpoints, serializer)
        self._on_drop = on_drop

    def dispatch(self, incoming):
        try:
            return super().dispatch(incoming)
        except Exception as exc:
            message = getattr(incoming, "message", None)
            if not isinstance(message, dict):
                message = {}
            return self._on_drop(message.get("message_id"),
                                 message.get("event_type"),
                                 message.get("publisher_id"), exc)


def _printable(value, limit=200):
    """A value from the notification bus as one log token: as it is when
    printable, else its repr (a newline forged a whole log line)."""
    if isinstance(value, str) and value.isprintable():
        return value[:limit]
    return repr(value)[:limit]


def _describe(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


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
        # What get_notification_listener builds, with our dispatcher.
        self._listener = notify_listener.NotificationServer(
            self._transport, targets,
            ContainedDispatcher([self.endpoint], self.endpoint.drop),
            executor="threading", allow_requeue=True, pool=s.pool)
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
