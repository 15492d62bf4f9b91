"""The compute host's end of the bus: its own queue in, the waiter registry out.

One thread owns one connection, as in the router: broker callbacks only
append to lists, and the loop alone decodes, delivers, dead-letters and
acknowledges. A message is acknowledged only after the registry recorded it
(delivered, held or recognised as a duplicate) or after the broker confirmed
its dead-letter copy. Whatever is unacknowledged when the connection drops
comes back from the durable queue; the registry's message-id memory makes
that harmless.
"""

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field

from kombu import Consumer

from compute import events
from router import acks
from router.acks import AckWindow
from router.bus import connection as bus_connection
from router.bus import contract, inbound, publishing, supervision, topology
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

HEADER_HOST = "x-evrouter-host"


@dataclass
class HostConsumerSettings:
    host: str
    transport_url: str = bus_connection.DEFAULT_URL
    topology: Topology = field(default_factory=Topology)
    prefetch: int = 64
    max_body_bytes: int = contract.DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 5.0
    heartbeat: int = 30
    ssl: object = False
    # Deliveries of one message that never got settled before it is
    # dead-lettered poison (counted here; quorum queues count themselves).
    redelivery_limit: int = 5


_REDELIVERY_MEMORY = 10_000


class _Lost(Exception):
    """A session that had been consuming lost its connection."""


class HostConsumer:
    """Feeds ``deliver(event, message_id)`` (InstanceEvents.deliver) from
    this host's queue. Run ``run()`` on a thread of its own."""

    def __init__(self, settings, deliver, *, on_failure=None):
        self.settings = settings
        self.deliver = deliver
        # InstanceEvents.deliver tells a late event of a finished wait by
        # the envelope's created_at; a plain callable may not take it.
        self.deliver_takes_created_at = _accepts(deliver, "created_at")
        self.stats = collections.Counter()
        self.ready = threading.Event()      # set while consuming
        # The current session's kombu Connection, for diagnostics and fault
        # tests; None between sessions.
        self.connection = None
        # on_failure(exc): told each time the consumer failed unexpectedly
        # and is about to be restarted (the embedding service's hook).
        self.on_failure = on_failure
        self.last_failure = None            # (monotonic time, repr)
        self._stop = threading.Event()
        # message key -> unsettled deliveries seen; survives restarts
        self._redeliveries = collections.OrderedDict()
        # After a session that ended badly, the next one takes one message
        # at a time until it has settled a prefetch's worth (or emptied the
        # queue): if one of them keeps killing the consumer, it is alone in
        # flight when it does, and the others are not counted with it.
        self._cautious = False

    def stop(self):
        """Finish what is in hand and return from run(). Signal-safe."""
        self._stop.set()

    def start(self, name=None):
        """run() on a daemon thread of its own; returns the thread."""
        thread = threading.Thread(
            target=self.run, daemon=True,
            name=name or f"evrouter-host-consumer-{self.settings.host}")
        thread.start()
        return thread

    def health(self):
        """(ok, why) for the embedding service's health check."""
        if self.ready.is_set():
            return True, "consuming"
        if self.last_failure is not None:
            return False, f"restarting after: {self.last_failure[1]}"
        if self.last_connect_error is not None:
            return False, f"cannot connect to the broker: {self.last_connect_error}"
        return False, "not connected to the broker"

    last_connect_error = None

    def _connect_failed(self, exc):
        self.last_connect_error = str(exc)[:300]

    def run(self):
        """Consume until stop(): supervised, so a bug restarts the consumer
        (logged at ERROR, reported to on_failure) instead of ending it."""
        supervision.run_supervised(self._consume, self._stop,
                                   f"host consumer {self.settings.host}",
                                   on_failure=self._failed)

    def _failed(self, exc):
        self._cautious = True
        self.stats["failures"] += 1
        self.last_failure = (time.monotonic(),
                             f"{type(exc).__name__}: {exc}"[:300])
        if self.on_failure is not None:
            self.on_failure(exc)

    def _consume(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url,
                                         heartbeat=s.heartbeat, ssl_opts=s.ssl)
        errors = conn.connection_errors + conn.channel_errors
        what = f"host consumer {s.host}"
        while not self._stop.is_set():
            try:
                # A fresh retry loop per loss: the backoff of an outage last
                # week must not delay the reconnect after today's.
                for attempt in bus_connection.reconnecting(
                        self._stop, what, errors=errors,
                        on_error=self._connect_failed):
                    with attempt:
                        _Session(self, conn.clone(), errors).run()
            except _Lost as lost:
                self._cautious = True
                self.stats["reconnects"] += 1
                LOG.warning("%s: connection lost (%s), reconnecting", what,
                            lost.__cause__)
            except errors:
                if not self._stop.is_set():
                    raise
        LOG.info("%s stopped", what)


class _Session:
    """One connection's worth of consuming; discarded on any broker error."""

    def __init__(self, owner, conn, errors):
        self.owner = owner
        self.s = owner.settings
        self.topo = self.s.topology
        self.conn = conn
        self.errors = errors
        self.stats = owner.stats
        self._deliveries = []
        self._outcomes = []
        self._dead_letters_in_flight = 0

    def run(self):
        owner, conn, host = self.owner, self.conn, self.s.host
        try:
            bus_connection.connect_once(conn)
            self.memory = bus_connection.is_memory(conn)
            self.window = AckWindow(multiple=not self.memory)
            exchanges, queues = self.topo.for_host(host)
            # Only this host's own entities: its broker user may configure
            # nothing else (see router/permissions.py). The dead-letter
            # exchange belongs to the central topology.
            topology.declare(conn.channel(), exchanges, queues)
            self.dead_letter_exchange = self._exists(
                self.topo.dead_letter_exchange_name)
            if not self.dead_letter_exchange:
                LOG.error("host consumer %s: dead-letter exchange %s does not "
                          "exist (run `evrouter topology --declare`); poison "
                          "messages will be rejected and dropped", host,
                          self.topo.dead_letter_exchange_name)
            self.publisher = publishing.ConfirmedPublisher(
                conn.channel(), lambda token, outcome:
                self._outcomes.append((token, outcome)))
            self.consumer = Consumer(conn.channel(), queues,
                                     on_message=self._deliveries.append)
            self._settled = 0
            self._quiet_since = time.monotonic()
            self.consumer.qos(prefetch_count=1 if owner._cautious
                              else self.s.prefetch)
            self.consumer.consume()
            owner.connection = conn
            owner.last_connect_error = None
            owner.ready.set()
            LOG.info("host consumer %s consuming %s (prefetch %d)", host,
                     queues[0].name, self.s.prefetch)
            self._loop()
        except self.errors as exc:
            if owner.ready.is_set():
                raise _Lost() from exc
            raise
        finally:
            owner.ready.clear()
            owner.connection = None
            try:
                conn.release()
            except self.errors:
                pass

    def _exists(self, exchange):
        # A failed passive declare closes its channel: use a throwaway one.
        channel = self.conn.channel()
        try:
            channel.exchange_declare(exchange, "fanout", passive=True)
        except self.conn.channel_errors:
            return False
        channel.close()
        return True

    def _loop(self):
        stopping_since = None
        next_heartbeat = 0.0
        while True:
            if self.owner._stop.is_set() and stopping_since is None:
                stopping_since = time.monotonic()
                self.consumer.cancel()
            if stopping_since is not None:
                idle = not (self._deliveries or self._outcomes or
                            self._dead_letters_in_flight)
                if idle or (time.monotonic() - stopping_since >
                            self.s.drain_timeout):
                    # Anything still unacknowledged goes back to the queue.
                    return
            bus_connection.drain(self.conn, 0.25)
            self._pump()
            now = time.monotonic()
            if now >= next_heartbeat and not self.memory:
                self.conn.heartbeat_check()
                next_heartbeat = now + 1.0

    def _pump(self):
        while self._deliveries or self._outcomes:
            for message in bus_connection.take(self._deliveries):
                self._handle(message)
            self.publisher.pump()
            for message, outcome in bus_connection.take(self._outcomes):
                self._settle_dead_letter(message, outcome)
        # One multiple-ack for the batch: fewer frames for us and the broker.
        frames = self.window.flush()
        acks.send(self.consumer.channel, frames)
        if self.owner._cautious and not self.memory:
            self._leave_caution(len(frames))

    def _leave_caution(self, settled):
        """Back to the full prefetch after a prefetch's worth of messages
        settled one by one, or once the queue has been quiet for a second."""
        now = time.monotonic()
        if settled:
            self._settled += settled
            self._quiet_since = now
        elif self._deliveries or self._outcomes or len(self.window):
            self._quiet_since = now
        quiet = now - self._quiet_since > 1.0
        if self._settled >= self.s.prefetch or quiet:
            self.consumer.qos(prefetch_count=self.s.prefetch)
            self.owner._cautious = False
            LOG.info("host consumer %s: back to prefetch %d", self.s.host,
                     self.s.prefetch)

    def _handle(self, message):
        self.window.open(message.delivery_tag)
        try:
            self._handle_one(message)
        except self.errors:
            raise
        except Exception as exc:
            # Whatever this message did to us, it does not stop the host.
            LOG.exception("event %s on host %s: unexpected error",
                          inbound.loggable(self._message_id(message)),
                          self.s.host)
            self._dead_letter(message, self._message_id(message),
                              contract.REASON_INTERNAL,
                              f"{type(exc).__name__}: {exc}")

    @staticmethod
    def _message_id(message):
        props = getattr(message, "properties", None)
        return props.get("message_id") if type(props) is dict else None

    def _handle_one(self, message):
        props = inbound.properties_of(message)
        msg_id = props.get("message_id")
        seen = self._redelivered(message, props)
        if seen >= self.s.redelivery_limit:
            return self._dead_letter(
                message, msg_id, contract.REASON_POISON,
                f"delivered {seen + 1} times without being settled")
        try:
            env = inbound.decode_message(message.body, props,
                                         self.s.max_body_bytes)
        except contract.ContractError as exc:
            return self._dead_letter(message, msg_id, exc.reason, str(exc))
        if env.kind != contract.INSTANCE_EVENT:
            return self._dead_letter(message, env.id, contract.REASON_INVALID,
                                     f"kind: {env.kind} does not belong on a "
                                     f"host queue")
        try:
            if self.owner.deliver_takes_created_at:
                outcome = self.owner.deliver(env.payload, env.id,
                                             created_at=env.created_at)
            else:
                outcome = self.owner.deliver(env.payload, env.id)
        except Exception as exc:
            # A fault of the registry, not of the message: set aside with
            # the cause, for an operator to replay, rather than looped on.
            LOG.exception("event %s: delivery to the registry failed", env.id)
            self.stats["deliver_errors"] += 1
            return self._dead_letter(message, env.id, contract.REASON_INTERNAL,
                                     f"delivery failed: {type(exc).__name__}: "
                                     f"{exc}")
        if outcome == events.CLOSED:
            # The registry is shut down: the event belongs to the next
            # process on this host, and consuming on would only spin.
            self.window.settle(message.delivery_tag, False, requeue=True)
            if not self.owner._stop.is_set():
                LOG.info("host consumer %s: registry closed, stopping "
                         "(event %s left in the queue)", self.s.host, env.id)
                self.owner.stop()
            return
        self.window.settle(message.delivery_tag, True)
        self.stats[outcome] += 1

    def _redelivered(self, message, props):
        """Unsettled deliveries of this message before this one.

        Only this host reads its queue, so this consumer can count them
        itself, across its own restarts; a quorum queue's x-delivery-count
        also covers restarts of the whole process.
        """
        info = message.delivery_info
        if not (type(info) is dict and info.get("redelivered")):
            return 0
        key = (inbound.safe_shortstr(props.get("message_id")),
               hash(inbound.raw_body(message.body)))
        counts = self.owner._redeliveries
        seen = counts.pop(key, 0) + 1
        counts[key] = seen
        if len(counts) > _REDELIVERY_MEMORY:
            counts.popitem(last=False)
        return max(seen, inbound.delivery_count(
            props.get("application_headers")))

    def _dead_letter(self, message, msg_id, reason, detail):
        """The last line of defence: must work on any message."""
        msg_id = inbound.safe_shortstr(msg_id)
        if not self.dead_letter_exchange:
            # Publishing to a missing exchange would close the channel and
            # bring the same poison back forever.
            LOG.error("event %s on host %s rejected (%s): %s",
                      inbound.loggable(msg_id), self.s.host, reason, detail)
            self.window.settle(message.delivery_tag, False, requeue=False)
            self.stats["rejected"] += 1
            return
        try:
            headers = inbound.safe_headers(getattr(message, "headers", None))
            headers[contract.HEADER_REASON] = reason
            headers[contract.HEADER_DETAIL] = inbound.clip(detail)
            headers[HEADER_HOST] = self.s.host
            self.publisher.publish(
                self.topo.dead_letter_exchange_name, reason,
                inbound.raw_body(message.body), message, message_id=msg_id,
                headers=headers, content_type=inbound.safe_shortstr(
                    getattr(message, "content_type", None)))
        except self.errors:
            raise
        except Exception:
            LOG.exception("event %s on host %s could not be dead-lettered "
                          "(%s); rejected without requeue",
                          inbound.loggable(msg_id), self.s.host, reason)
            self.window.settle(message.delivery_tag, False, requeue=False)
            self.stats["rejected"] += 1
            return
        self._dead_letters_in_flight += 1
        LOG.warning("event %s on host %s dead-lettered (%s): %s",
                    inbound.loggable(msg_id), self.s.host, reason,
                    inbound.clip(detail, 300))

    def _settle_dead_letter(self, message, outcome):
        self._dead_letters_in_flight -= 1
        if outcome == publishing.ACK:
            self.window.settle(message.delivery_tag, True)
            self.stats["dead_lettered"] += 1
            return
        # Nothing took the copy (no dead-letter queue bound, or a nack):
        # rejecting makes the broker dead-letter the original through the
        # queue's own x-dead-letter-exchange, without our reason header.
        LOG.error("host consumer %s: dead-letter copy %s; rejecting the "
                  "original instead", self.s.host, outcome)
        self.window.settle(message.delivery_tag, False, requeue=False)
        self.stats["rejected"] += 1


def _accepts(func, name):
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
