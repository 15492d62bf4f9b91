"""The router service: ingress queue in, per-host exchanges out.

One thread owns one connection. Broker callbacks (deliveries, confirms,
lifecycle events) only append values to lists; the loop alone publishes,
acknowledges and decides, so nothing is ever published from inside a
delivery callback (py-amqp would drain the socket and recurse).

An ingress message is acknowledged only after the broker confirmed every
copy it caused (host copies, a retry or a dead-letter). On any connection
or channel error the session is dropped: unacknowledged messages go back
to the queue and are routed again (at-least-once; waiters deduplicate).
"""

import collections
import heapq
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from kombu import Consumer

from router import acks, routing
from router.acks import AckWindow
from router.bus import connection as bus_connection
from router.bus import contract, publishing, topology
from router.bus.topology import Topology
from router.metrics import LatencyHistogram
from router.placement import PlacementTable

LOG = logging.getLogger(__name__)

_HOST_COPY, _RETRY, _DEAD = "host", "retry", "dead"
_NEGATIVE_HOST_TTL = 2.0


@dataclass
class RouterSettings:
    transport_url: str = bus_connection.DEFAULT_URL
    topology: Topology = field(default_factory=Topology)
    policy: routing.Policy = field(default_factory=routing.Policy)
    prefetch: int = 512
    max_body_bytes: int = contract.DEFAULT_MAX_BODY_BYTES
    drain_timeout: float = 10.0
    heartbeat: int = 30
    ssl: object = False
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


class _Inflight:
    __slots__ = ("tag", "message", "env_id", "remaining", "ok", "started")

    def __init__(self, tag, message, env_id):
        self.started = time.monotonic()
        self.tag = tag
        self.message = message
        self.env_id = env_id
        self.remaining = 0
        self.ok = True


class RouterService:
    def __init__(self, settings, *, placement=None):
        self.settings = settings
        self.placement = placement if placement is not None else PlacementTable()
        self.stats = collections.Counter()
        self.latency = LatencyHistogram()
        self._stop = threading.Event()
        self.ready = threading.Event()   # set while consuming

    def stop(self):
        """Finish in-flight messages and return from run(). Signal-safe."""
        self._stop.set()

    def health(self):
        if self.ready.is_set():
            return True, "consuming"
        return False, "not connected to the broker"

    def run(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url,
                                         heartbeat=s.heartbeat, ssl_opts=s.ssl)
        errors = conn.connection_errors + conn.channel_errors
        lost = True
        while lost and not self._stop.is_set():
            lost = False
            # A fresh retry loop per loss: the backoff of an outage last
            # week must not delay the reconnect after today's.
            for attempt in bus_connection.reconnecting(self._stop, "router",
                                                       errors=errors):
                with attempt:
                    try:
                        _Session(self, conn.clone()).run()
                    except errors as exc:
                        if not self.ready.is_set():
                            raise       # never consumed: back off, retry
                        lost = True
                        self.stats["reconnects"] += 1
                        LOG.warning("router %s: connection lost (%s), "
                                    "reconnecting", s.name, exc)
                    finally:
                        self.ready.clear()
        LOG.info("router %s stopped", s.name)


class _Session:
    """One connection's worth of routing; discarded on any broker error."""

    def __init__(self, service, conn):
        self.service = service
        self.s = service.settings
        self.topo = self.s.topology
        self.conn = conn
        self.stats = service.stats
        self._deliveries = []
        self._outcomes = []
        self._lifecycle = []
        self._inflight = {}
        self._known = {}            # host -> (known, checked at)
        self._tokens = itertools.count()
        self._parked = []           # memory transport only: (due, n, ...)
        self._broker_errors = conn.connection_errors + conn.channel_errors

    # --- set-up -------------------------------------------------------------
    def run(self):
        conn = self.conn
        try:
            bus_connection.connect_once(conn)
            self.memory = bus_connection.is_memory(conn)
            self.user = bus_connection.user_of(conn)
            ch = conn.channel()
            topology.declare(ch, *self.topo.central())
            self.publish_ch = conn.channel()
            self.publisher = publishing.ConfirmedPublisher(
                self.publish_ch, lambda token, outcome:
                self._outcomes.append((token, outcome)))
            self.check_ch = conn.channel()
            self.window = AckWindow(multiple=not self.memory)
            placement_q = self.topo.placement_queue(self.s.name)
            self.lifecycle_consumer = Consumer(
                conn.channel(), [placement_q], no_ack=True,
                on_message=self._lifecycle.append)
            self.lifecycle_consumer.consume()
            self.consume_ch = conn.channel()
            self.consumer = Consumer(self.consume_ch,
                                     [self.topo.router_queue()],
                                     on_message=self._deliveries.append)
            self.consumer.qos(prefetch_count=self.s.prefetch)
            self.consumer.consume()
            self.service.ready.set()
            LOG.info("router %s consuming %s (prefetch %d)", self.s.name,
                     self.topo.router_queue_name, self.s.prefetch)
            self._loop()
        finally:
            conn.release()

    # --- the loop -----------------------------------------------------------
    def _loop(self):
        stopping_since = None
        next_heartbeat = 0.0
        while True:
            if self.service._stop.is_set() and stopping_since is None:
                stopping_since = time.monotonic()
                self.consumer.cancel()
                LOG.info("router %s stopping: %d in flight", self.s.name,
                         len(self._inflight) + len(self._deliveries))
            if stopping_since is not None:
                idle = not (self._inflight or self._deliveries or self._outcomes)
                if idle or time.monotonic() - stopping_since > self.s.drain_timeout:
                    return
            bus_connection.drain(self.conn, 0.25)
            self._pump()
            now = time.monotonic()
            while self._parked and self._parked[0][0] <= now:
                _, _, body, env, headers = heapq.heappop(self._parked)
                self.publisher.publish(
                    self.topo.ingress_exchange_name,
                    topology.RETRY_ROUTING_KEY, body, None,
                    message_id=env.id, headers=headers)
            if now >= next_heartbeat and not self.memory:
                self.conn.heartbeat_check()
                next_heartbeat = now + 1.0

    def _pump(self):
        while self._lifecycle or self._deliveries or self._outcomes:
            for message in bus_connection.take(self._lifecycle):
                self._observe(message)
            for message in bus_connection.take(self._deliveries):
                self._route_safely(message)
            self.publisher.pump()
            for token, outcome in bus_connection.take(self._outcomes):
                self._settle(token, outcome)
        acks.send(self.consume_ch, self.window.flush())

    # --- placement ----------------------------------------------------------
    def _observe(self, message):
        try:
            env = contract.decode(message.body, self.s.max_body_bytes)
        except contract.ContractError as exc:
            self.stats["lifecycle_invalid"] += 1
            LOG.warning("lifecycle message %s ignored: %s",
                        message.properties.get("message_id"), exc)
            return
        p = env.payload
        user_id = message.properties.get("user_id")
        if not routing.lifecycle_sender_ok(user_id, p.host, self.s.policy):
            self.stats["lifecycle_forged"] += 1
            LOG.warning("lifecycle message %s ignored: user %s may not speak "
                        "for host %s", env.id, user_id, p.host)
            return
        self._known[p.host] = (True, 0.0)
        if env.kind == contract.LIFECYCLE_EVENT:
            self.service.placement.observe(p)
            self.stats["lifecycle_seen"] += 1

    def _is_known_host(self, host):
        known, checked = self._known.get(host, (None, 0.0))
        if known or (known is False and
                     time.monotonic() - checked < _NEGATIVE_HOST_TTL):
            return known
        # A passive declare that fails closes the channel: it has its own.
        try:
            self.check_ch.exchange_declare(self.topo.host_exchange_name(host),
                                           "topic", passive=True)
            known = True
        except self.conn.channel_errors:
            known = False
            self.check_ch = self.conn.channel()
        self._known[host] = (known, time.monotonic())
        return known

    # --- routing ------------------------------------------------------------
    def _route_safely(self, message):
        try:
            self._route(message)
        except self._broker_errors:
            raise
        except Exception as exc:
            # A bug must not stop the service or lose the message: park it
            # in the dead-letter queue, where an operator can replay it.
            tag = message.delivery_tag
            LOG.exception("event %s: unexpected error while routing",
                          message.properties.get("message_id"))
            # Copies already published report to the dropped entry, harmlessly.
            self._inflight.pop(tag, None)
            self._dead_letter(tag, message, message.properties.get(
                "message_id") or "-", contract.REASON_INTERNAL,
                f"{type(exc).__name__}: {exc}")

    def _route(self, message):
        tag = message.delivery_tag
        self.window.open(tag)
        props = message.properties
        self.stats["in"] += 1
        body = message.body
        if type(body) is str:
            # py-amqp decodes bodies that declare a content_encoding.
            message.body = body = body.encode(message.content_encoding or "utf-8")
        try:
            env = contract.decode(body, self.s.max_body_bytes)
        except contract.ContractError as exc:
            msg_id = props.get("message_id") or "-"
            return self._dead_letter(tag, message, msg_id, exc.reason, str(exc))
        headers = message.headers or {}
        publisher = props.get("user_id")
        attempt, first_seen = 0, time.time()
        if contract.HEADER_PUBLISHER in headers and (
                self.memory or (publisher and publisher == self.user)):
            # Our own retry: carries the original, broker-validated publisher.
            publisher = headers[contract.HEADER_PUBLISHER]
            attempt = headers.get(contract.HEADER_ATTEMPT, 0)
            first_seen = headers.get(contract.HEADER_FIRST_SEEN, first_seen)
        decision = routing.decide(
            env, publisher=publisher,
            hosts_for=self.service.placement.hosts_for,
            is_known_host=self._is_known_host, attempt=attempt,
            first_seen=first_seen, now=time.time(), policy=self.s.policy)
        if type(decision) is routing.Deliver:
            self._deliver(tag, message, env, decision.hosts, publisher)
        elif type(decision) is routing.Retry:
            self._retry(tag, message, env, decision, publisher, first_seen)
        else:
            self._dead_letter(tag, message, env.id, decision.reason,
                              decision.detail)

    def _track(self, tag, message, env_id, copies):
        entry = self._inflight[tag] = _Inflight(tag, message, env_id)
        entry.remaining = copies
        return entry

    def _deliver(self, tag, message, env, hosts, publisher):
        entry = self._track(tag, message, env.id, len(hosts))
        key = topology.instance_routing_key(env.payload.name)
        headers = {contract.HEADER_PUBLISHER: publisher} if publisher else None
        for host in hosts:
            self.publisher.publish(self.topo.host_exchange_name(host), key,
                                   message.body, (entry, _HOST_COPY, host),
                                   message_id=env.id, headers=headers)
        LOG.debug("event %s %s for %s routed to %s", env.id,
                  env.payload.name, env.payload.server_uuid, ",".join(hosts))

    def _retry(self, tag, message, env, decision, publisher, first_seen):
        entry = self._track(tag, message, env.id, 1)
        delay = self.topo.retry_delay_ms(decision.attempt)
        headers = {contract.HEADER_ATTEMPT: decision.attempt,
                   contract.HEADER_FIRST_SEEN: first_seen,
                   contract.HEADER_PUBLISHER: publisher or ""}
        if self.memory:
            # The memory transport has no TTLs to park a message with: keep
            # it here (it has no durability to lose) and put it back later.
            heapq.heappush(self._parked, (time.monotonic() + delay / 1000,
                                          next(self._tokens), message.body,
                                          env, headers))
            self._outcomes.append(((entry, _RETRY, None), publishing.ACK))
        else:
            self.publisher.publish("", self.topo.retry_queue_name(delay),
                                   message.body, (entry, _RETRY, None),
                                   message_id=env.id, headers=headers,
                                   user_id=self.user)
        self.stats["retried"] += 1
        LOG.info("event %s retry %d in %dms: %s", env.id, decision.attempt,
                 delay, decision.detail)

    def _dead_letter(self, tag, message, msg_id, reason, detail, *,
                     track=True):
        if track:
            entry = self._track(tag, message, msg_id, 1)
        else:
            entry = self._inflight[tag]
            entry.remaining += 1
        headers = dict(message.headers or {})
        headers[contract.HEADER_REASON] = reason
        headers[contract.HEADER_DETAIL] = detail[:1000]
        headers["x-evrouter-router"] = self.s.name
        self.publisher.publish(self.topo.dead_letter_exchange_name, reason,
                               message.body, (entry, _DEAD, None),
                               message_id=msg_id if msg_id != "-" else None,
                               headers=headers,
                               content_type=message.content_type)
        self.stats[f"dead_lettered:{reason}"] += 1
        LOG.warning("event %s dead-lettered (%s): %s", msg_id, reason, detail)

    def _settle(self, token, outcome):
        if token is None:       # a parked retry put back on ingress
            return
        entry, kind, host = token
        tag = entry.tag
        if self._inflight.get(tag) is not entry:
            return
        if outcome == publishing.RETURNED and kind == _HOST_COPY:
            # The host exchange exists but nothing is bound to it.
            self._known.pop(host, None)
            self._dead_letter(tag, entry.message, entry.env_id,
                              contract.REASON_UNROUTABLE,
                              f"no queue bound to {self.topo.host_exchange_name(host)}",
                              track=False)
        elif outcome != publishing.ACK:
            entry.ok = False
            LOG.error("event %s: broker %s for %s copy (host %s); requeueing",
                      entry.env_id, outcome, kind, host)
        elif kind == _HOST_COPY:
            self.stats["out"] += 1
        entry.remaining -= 1
        if entry.remaining == 0:
            del self._inflight[tag]
            self.window.settle(tag, entry.ok)
            self.service.latency.observe(time.monotonic() - entry.started)
