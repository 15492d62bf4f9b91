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
import logging
import threading
import time
from dataclasses import dataclass, field

from kombu import Consumer

from compute import events
from router import acks
from router.acks import AckWindow
from router.bus import connection as bus_connection
from router.bus import contract, publishing, topology
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


class _Lost(Exception):
    """A session that had been consuming lost its connection."""


class HostConsumer:
    """Feeds ``deliver(event, message_id)`` (InstanceEvents.deliver) from
    this host's queue. Run ``run()`` on a thread of its own."""

    def __init__(self, settings, deliver):
        self.settings = settings
        self.deliver = deliver
        self.stats = collections.Counter()
        self.ready = threading.Event()      # set while consuming
        # The current session's kombu Connection, for diagnostics and fault
        # tests; None between sessions.
        self.connection = None
        self._stop = threading.Event()

    def stop(self):
        """Finish what is in hand and return from run(). Signal-safe."""
        self._stop.set()

    def run(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url,
                                         heartbeat=s.heartbeat, ssl_opts=s.ssl)
        errors = conn.connection_errors + conn.channel_errors
        what = f"host consumer {s.host}"
        while not self._stop.is_set():
            try:
                # A fresh retry loop per loss: the backoff of an outage last
                # week must not delay the reconnect after today's.
                for attempt in bus_connection.reconnecting(self._stop, what,
                                                           errors=errors):
                    with attempt:
                        _Session(self, conn.clone(), errors).run()
            except _Lost as lost:
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
            self.consumer.qos(prefetch_count=self.s.prefetch)
            self.consumer.consume()
            owner.connection = conn
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
        acks.send(self.consumer.channel, self.window.flush())

    def _handle(self, message):
        self.window.open(message.delivery_tag)
        msg_id = message.properties.get("message_id") or "-"
        try:
            env = contract.decode(message.body, self.s.max_body_bytes)
        except contract.ContractError as exc:
            return self._dead_letter(message, msg_id, exc.reason, str(exc))
        if env.kind != contract.INSTANCE_EVENT:
            return self._dead_letter(message, env.id, contract.REASON_INVALID,
                                     f"kind: {env.kind} does not belong on a "
                                     f"host queue")
        try:
            outcome = self.owner.deliver(env.payload, env.id)
        except Exception:
            # A fault of ours, not of the message; rejecting without requeue
            # lets the broker dead-letter it instead of looping on it.
            LOG.exception("event %s: delivery to the registry failed; "
                          "rejected to the dead-letter exchange", env.id)
            self.stats["deliver_errors"] += 1
            self.window.settle(message.delivery_tag, False, requeue=False)
            return
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

    def _dead_letter(self, message, msg_id, reason, detail):
        if not self.dead_letter_exchange:
            # Publishing to a missing exchange would close the channel and
            # bring the same poison back forever.
            LOG.error("event %s on host %s rejected (%s): %s", msg_id,
                      self.s.host, reason, detail)
            self.window.settle(message.delivery_tag, False, requeue=False)
            self.stats["rejected"] += 1
            return
        headers = dict(message.headers or {})
        headers[contract.HEADER_REASON] = reason
        headers[contract.HEADER_DETAIL] = detail[:1000]
        headers[HEADER_HOST] = self.s.host
        self.publisher.publish(self.topo.dead_letter_exchange_name, reason,
                               message.body, message,
                               message_id=None if msg_id == "-" else msg_id,
                               headers=headers,
                               content_type=message.content_type)
        self._dead_letters_in_flight += 1
        LOG.warning("event %s on host %s dead-lettered (%s): %s", msg_id,
                    self.s.host, reason, detail)

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
