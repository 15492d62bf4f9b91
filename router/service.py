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
from router.bus import contract, inbound, publishing, supervision, topology
from router.bus.topology import Topology
from router.metrics import LatencyHistogram
from router.placement import PlacementTable

LOG = logging.getLogger(__name__)

_HOST_COPY, _RETRY, _DEAD = "host", "retry", "dead"
_NEGATIVE_HOST_TTL = 2.0
# A host exchange seen to exist is checked again after this long, so one
# deleted since (a decommissioned host) does not close the publish channel.
_POSITIVE_HOST_TTL = 60.0
# A copy the broker refused (nack) is published again after this long,
# doubling up to the maximum; after so many refusals it is dead-lettered.
_REFUSED_DELAY = 0.25
_REFUSED_MAX = 5.0
_MAX_REFUSALS = 30

# How often a message came back to a router without being settled, counted
# by the routers themselves on classic queues (the broker's x-delivery-count
# does it on quorum queues). Trusted only on copies the router user sent.
HEADER_REDELIVERIES = "x-evrouter-redeliveries"
HEADER_HOST = "x-evrouter-host"


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
    # Deliveries of one message that never got settled (its router died
    # or lost its connection each time) before it is dead-lettered poison.
    redelivery_limit: int = 5
    # Seconds after (re)connecting during which placement is incomplete
    # (agents are answering the resync request): REST says "try again".
    resync_window: float = 5.0


class _Lane:
    """One consuming channel, its acknowledgement window and prefetch."""

    __slots__ = ("name", "channel", "consumer", "window")

    def __init__(self, name, channel, consumer, window):
        self.name = name
        self.channel = channel
        self.consumer = consumer
        self.window = window


class _Inflight:
    __slots__ = ("lane", "tag", "key", "message", "env_id", "remaining",
                 "nacks", "started")

    def __init__(self, lane, tag, message, env_id):
        self.started = time.monotonic()
        self.lane = lane
        self.tag = tag
        self.key = (lane.name, tag)     # delivery tags are per channel
        self.message = message
        self.env_id = env_id
        self.remaining = 0
        self.nacks = 0


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
        if self.last_failure is not None:
            return False, f"restarting after: {self.last_failure}"
        if self.last_connect_error is not None:
            return False, f"cannot connect to the broker: {self.last_connect_error}"
        return False, "not connected to the broker"

    last_failure = None
    last_connect_error = None

    def _connect_failed(self, exc):
        self.last_connect_error = str(exc)[:300]

    def run(self):
        """Route until stop(). Supervised: a bug outside the per-message
        containment restarts the session (logged at ERROR, with backoff);
        whatever it held unacknowledged is redelivered, and counted."""
        supervision.run_supervised(self._serve, self._stop,
                                   f"router {self.settings.name}",
                                   on_failure=self._failed)
        LOG.info("router %s stopped", self.settings.name)

    def _failed(self, exc):
        self.stats["failures"] += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"[:300]

    def _serve(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url,
                                         heartbeat=s.heartbeat, ssl_opts=s.ssl)
        errors = conn.connection_errors + conn.channel_errors
        lost = True
        while lost and not self._stop.is_set():
            lost = False
            # A fresh retry loop per loss: the backoff of an outage last
            # week must not delay the reconnect after today's.
            for attempt in bus_connection.reconnecting(
                    self._stop, "router", errors=errors,
                    on_error=self._connect_failed):
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


class _Session:
    """One connection's worth of routing; discarded on any broker error."""

    def __init__(self, service, conn):
        self.service = service
        self.s = service.settings
        self.topo = self.s.topology
        self.conn = conn
        self.stats = service.stats
        self._deliveries = []
        self._probation = []
        self._outcomes = []
        self._lifecycle = []
        self._inflight = {}
        # ingress tags whose counted copy went to probation: that copy is
        # routed only once their acknowledgements have left (see _pump)
        self._probation_blockers = set()
        self.probation = None
        self._known = {}            # host -> (known, checked at)
        self._tokens = itertools.count()
        self._parked = []           # memory transport only: (due, n, ...)
        self._refused_copies = []   # (due, n, token): publish again then
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
            # A new name per session: after a half-open connection the old
            # exclusive queue lingers until the broker reaps it, and
            # declaring the same name would fail RESOURCE_LOCKED.
            placement_q = self.topo.placement_queue(
                f"{self.s.name}.{uuid.uuid4().hex[:8]}")
            self.lifecycle_consumer = Consumer(
                conn.channel(), [placement_q], no_ack=True,
                on_message=self._lifecycle.append)
            self.lifecycle_consumer.consume()
            self.main = self._lane("main", self.topo.router_queue(),
                                   self._deliveries, self.s.prefetch)
            if not self.memory:
                self.probation = self._lane("probation",
                                            self.topo.probation_queue(),
                                            self._probation, 1)
            self._ask_for_snapshots()
            self.stats["sessions"] += 1
            self.service.last_connect_error = None
            self.service.ready.set()
            LOG.info("router %s consuming %s (prefetch %d)", self.s.name,
                     self.topo.router_queue_name, self.s.prefetch)
            self._loop()
        finally:
            conn.release()

    def _lane(self, name, queue, into, prefetch):
        channel = self.conn.channel()
        consumer = Consumer(channel, [queue], on_message=into.append)
        consumer.qos(prefetch_count=prefetch)
        consumer.consume()
        return _Lane(name, channel, consumer,
                     AckWindow(multiple=not self.memory))

    # --- the loop -----------------------------------------------------------
    def _loop(self):
        stopping_since = None
        next_heartbeat = 0.0
        while True:
            if self.service._stop.is_set() and stopping_since is None:
                stopping_since = time.monotonic()
                self.main.consumer.cancel()
                if self.probation is not None:
                    self.probation.consumer.cancel()
                LOG.info("router %s stopping: %d in flight", self.s.name,
                         len(self._inflight) + len(self._deliveries))
            if stopping_since is not None:
                idle = not (self._inflight or self._deliveries or
                            self._outcomes or self._probation)
                if idle or time.monotonic() - stopping_since > self.s.drain_timeout:
                    return
            bus_connection.drain(self.conn, 0.25)
            self._pump()
            now = time.monotonic()
            if self._refused_copies:
                self._publish_refused_again(now)
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
                self._route_safely(message, self.main)
            self.publisher.pump()
            for token, outcome in bus_connection.take(self._outcomes):
                self._settle(token, outcome)
        acks.send(self.main.channel, self.main.window.flush())
        if self.probation is not None:
            if self._probation:
                self._route_probation()
            acks.send(self.probation.channel, self.probation.window.flush())

    def _route_probation(self):
        """Route the redelivered message in hand, alone.

        Not before the acknowledgements of the originals it was counted
        from have left: if it is the one that kills routers, its original
        must not come back as well and start a second count.
        """
        window = self.main.window
        self._probation_blockers = {
            t for t in self._probation_blockers if window.holds(t)}
        if self._probation_blockers:
            return
        for message in bus_connection.take(self._probation):
            self._route_safely(message, self.probation)

    # --- placement ----------------------------------------------------------
    def _ask_for_snapshots(self):
        """Every agent answers with its host's whole placement: a router that
        (re)connects knows it within seconds instead of learning it from
        whatever lifecycle events happen next."""
        self.service.placement.warm_up(self.s.resync_window)
        if self.memory:
            return      # the memory transport's agents snapshot on start
        request = contract.envelope(contract.ResyncRequest(self.s.name),
                                    f"router@{self.s.name}")
        self.publisher.publish(self.topo.control_exchange_name, "",
                               contract.encode(request), None,
                               message_id=request.id, mandatory=False)
        LOG.info("router %s asked the agents for snapshots (%s)", self.s.name,
                 request.id)

    def _observe(self, message):
        try:
            self._observe_one(message)
        except self._broker_errors:
            raise
        except Exception:
            # Consumed without ack: nothing comes back to loop on, and one
            # compute host's bad message must not stop every router.
            self.stats["lifecycle_errors"] += 1
            LOG.exception("lifecycle message %s: unexpected error; ignored",
                          inbound.loggable(_property(message, "message_id")))

    def _observe_one(self, message):
        try:
            env = inbound.decode_message(message.body,
                                         inbound.properties_of(message),
                                         self.s.max_body_bytes)
        except contract.ContractError as exc:
            self.stats["lifecycle_invalid"] += 1
            LOG.warning("lifecycle message %s ignored (%s): %s",
                        inbound.loggable(_property(message, "message_id")),
                        exc.reason, exc)
            return
        p = env.payload
        if env.kind == contract.RESYNC_REQUEST:
            return      # another router asking the agents; not for us
        user_id = _property(message, "user_id")
        if not routing.lifecycle_sender_ok(user_id, p.host, self.s.policy):
            self.stats["lifecycle_forged"] += 1
            LOG.warning("lifecycle message %s ignored: user %s may not speak "
                        "for host %s", env.id, user_id, p.host)
            return
        if env.kind == contract.LIFECYCLE_EVENT:
            self.service.placement.observe(p)
            self.stats["lifecycle_seen"] += 1
        elif env.kind == contract.HOST_SNAPSHOT:
            self.service.placement.replace_host(p.host, p.instances)
            self.stats["snapshots_seen"] += 1
            LOG.info("host %s snapshot %s: %d instance(s)", p.host, env.id,
                     len(p.instances))
        # A host that announces itself is not yet a host whose exchange
        # exists (its consumer may start later): routing checks that.

    def _is_known_host(self, host):
        known, checked = self._known.get(host, (None, 0.0))
        age = time.monotonic() - checked
        if (known and age < _POSITIVE_HOST_TTL) or (
                known is False and age < _NEGATIVE_HOST_TTL):
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
    def _route_safely(self, message, lane):
        try:
            self._route(message, lane)
        except self._broker_errors:
            raise
        except Exception as exc:
            # A bug must not stop the service or lose the message: park it
            # in the dead-letter queue, where an operator can replay it.
            tag = message.delivery_tag
            msg_id = _property(message, "message_id")
            LOG.exception("event %s: unexpected error while routing",
                          inbound.loggable(msg_id))
            # Copies already published report to the dropped entry, harmlessly.
            self._inflight.pop((lane.name, tag), None)
            self._dead_letter_or_drop(lane, tag, message, msg_id,
                                      contract.REASON_INTERNAL,
                                      f"{type(exc).__name__}: {exc}")

    def _dead_letter_or_drop(self, lane, tag, message, msg_id, reason, detail):
        """The last line of defence: it must work on any message."""
        try:
            self._dead_letter(lane, tag, message, msg_id, reason, detail)
        except self._broker_errors:
            raise
        except Exception:
            self._inflight.pop((lane.name, tag), None)
            lane.window.settle(tag, False, requeue=False)
            self.stats["dropped"] += 1
            LOG.exception("event %s could not be dead-lettered (%s); rejected "
                          "without requeue", inbound.loggable(msg_id), reason)

    def _route(self, message, lane):
        tag = message.delivery_tag
        lane.window.open(tag)
        self.stats["in"] += 1
        props = inbound.properties_of(message)
        headers = props.get("application_headers")
        user_id = props.get("user_id")
        ours = not self.memory and user_id is not None and user_id == self.user
        seen = self._redeliveries(message, headers, ours)
        if seen >= self.s.redelivery_limit:
            return self._dead_letter(
                lane, tag, message, props.get("message_id"), contract.REASON_POISON,
                f"delivered {seen + 1} times without being settled")
        try:
            env = inbound.decode_message(message.body, props,
                                         self.s.max_body_bytes)
        except contract.ContractError as exc:
            return self._dead_letter(lane, tag, message,
                                     props.get("message_id"), exc.reason,
                                     str(exc))
        publisher = user_id
        attempt, first_seen = 0, time.time()
        if ours or (self.memory and type(headers) is dict):
            # Our own retry: carries the original, broker-validated publisher.
            publisher = inbound.header(headers, contract.HEADER_PUBLISHER,
                                       str, publisher)
            attempt = inbound.header(headers, contract.HEADER_ATTEMPT, int, 0)
            first_seen = inbound.header(headers, contract.HEADER_FIRST_SEEN,
                                        float, first_seen)
        if seen:
            return self._to_probation(lane, tag, message, env, publisher,
                                      seen, attempt, first_seen)
        decision = routing.decide(
            env, publisher=publisher,
            hosts_for=self.service.placement.hosts_for,
            is_known_host=self._is_known_host, attempt=attempt,
            first_seen=first_seen, now=time.time(), policy=self.s.policy)
        if type(decision) is routing.Deliver:
            self._deliver(lane, tag, message, env, decision.hosts, publisher)
        elif type(decision) is routing.Retry:
            self._retry(lane, tag, message, env, decision, publisher,
                        first_seen)
        else:
            self._dead_letter(lane, tag, message, env.id, decision.reason,
                              decision.detail)

    def _redeliveries(self, message, headers, ours):
        """Unsettled deliveries of this message before this one, or 0.

        A redelivered message is not routed with the others: a router
        counts it in a copy (HEADER_REDELIVERIES) sent to the probation
        queue, acknowledges the original once the copy is confirmed, and
        routes probation messages one at a time. Whatever keeps killing
        routers on one message, its count survives them and ends in a
        poison dead-letter, while the messages that were merely in flight
        beside it are each routed alone and never counted with it again
        (a quorum queue's own x-delivery-count counts them all alike).
        """
        if self.memory:
            return 0
        info = message.delivery_info
        if not (type(info) is dict and info.get("redelivered")):
            return 0
        counted = (inbound.header(headers, HEADER_REDELIVERIES, int, 0)
                   if ours else 0)
        return max(counted + 1, inbound.delivery_count(headers))

    def _to_probation(self, lane, tag, message, env, publisher, seen, attempt,
                      first_seen):
        entry = self._track(lane, tag, message, env.id, 1)
        headers = {HEADER_REDELIVERIES: seen,
                   contract.HEADER_ATTEMPT: attempt,
                   contract.HEADER_FIRST_SEEN: first_seen,
                   contract.HEADER_PUBLISHER: publisher or ""}
        self._send(entry, _RETRY, None, "", self.topo.probation_queue_name,
                   inbound.raw_body(message.body), message_id=env.id,
                   headers=headers, user_id=self.user)
        if lane is self.main:
            # The probation lane takes one message at a time: the broker
            # sends the copy only after this original is acknowledged.
            self._probation_blockers.add(tag)
        self.stats["redelivered"] += 1
        LOG.info("event %s redelivered (%d): to probation", env.id, seen)

    def _track(self, lane, tag, message, env_id, copies):
        entry = _Inflight(lane, tag, message, env_id)
        self._inflight[entry.key] = entry
        entry.remaining = copies
        return entry

    def _deliver(self, lane, tag, message, env, hosts, publisher):
        entry = self._track(lane, tag, message, env.id, len(hosts))
        key = topology.instance_routing_key(env.payload.name)
        headers = {contract.HEADER_PUBLISHER: publisher} if publisher else None
        body = inbound.raw_body(message.body)
        for host in hosts:
            self._send(entry, _HOST_COPY, host, self.topo.host_exchange_name(host),
                       key, body, message_id=env.id, headers=headers)
        LOG.debug("event %s %s for %s routed to %s", env.id,
                  env.payload.name, env.payload.server_uuid, ",".join(hosts))

    def _retry(self, lane, tag, message, env, decision, publisher,
               first_seen):
        entry = self._track(lane, tag, message, env.id, 1)
        delay = self.topo.retry_delay_ms(decision.attempt)
        headers = {contract.HEADER_ATTEMPT: decision.attempt,
                   contract.HEADER_FIRST_SEEN: first_seen,
                   contract.HEADER_PUBLISHER: publisher or ""}
        if self.memory:
            # The memory transport has no TTLs to park a message with: keep
            # it here (it has no durability to lose) and put it back later.
            heapq.heappush(self._parked, (time.monotonic() + delay / 1000,
                                          next(self._tokens),
                                          inbound.raw_body(message.body),
                                          env, headers))
            self._outcomes.append(((entry, _RETRY, None, None), publishing.ACK))
        else:
            self._send(entry, _RETRY, None, "", self.topo.retry_queue_name(delay),
                       inbound.raw_body(message.body), message_id=env.id,
                       headers=headers, user_id=self.user)
        self.stats["retried"] += 1
        LOG.info("event %s retry %d in %dms: %s", env.id, decision.attempt,
                 delay, decision.detail)

    def _dead_letter(self, lane, tag, message, msg_id, reason, detail, *,
                     track=True, extra_headers=None):
        """Send the message to the dead-letter exchange with a reason.

        Everything taken from the message is untrusted: the id, headers and
        content type are passed through inbound's safe_* filters, so this
        step cannot fail on what a sender put there.
        """
        msg_id = inbound.safe_shortstr(msg_id)
        if track:
            entry = self._track(lane, tag, message, msg_id or "-", 1)
        else:
            entry = self._inflight[(lane.name, tag)]
            entry.remaining += 1
        headers = inbound.safe_headers(_property(message,
                                                 "application_headers"))
        headers[contract.HEADER_REASON] = reason
        headers[contract.HEADER_DETAIL] = inbound.clip(detail)
        headers["x-evrouter-router"] = self.s.name
        if extra_headers:
            headers.update(extra_headers)
        self._send(
            entry, _DEAD, None, self.topo.dead_letter_exchange_name, reason,
            inbound.raw_body(message.body),
            message_id=msg_id, headers=headers,
            content_type=inbound.safe_shortstr(
                _property(message, "content_type")))
        self.stats[f"dead_lettered:{reason}"] += 1
        LOG.warning("event %s dead-lettered (%s): %s", inbound.loggable(msg_id),
                    reason, inbound.clip(detail, 300))

    def _send(self, entry, kind, host, exchange, routing_key, body, **kwargs):
        """Publish one copy for an ingress message; the token carries what
        it takes to publish the copy again if the broker refuses it."""
        token = (entry, kind, host, (exchange, routing_key, body, kwargs))
        self.publisher.publish(exchange, routing_key, body, token, **kwargs)

    def _settle(self, token, outcome):
        if token is None:       # a parked retry put back on ingress, a request
            return
        entry, kind, host, _ = token
        if self._inflight.get(entry.key) is not entry:
            return
        if outcome == publishing.RETURNED and kind == _HOST_COPY:
            # The host exchange exists but nothing is bound to it. Only this
            # host's copy is dead-lettered, saying which host it was for:
            # the other hosts' copies were delivered.
            self._known.pop(host, None)
            self._dead_letter(entry.lane, entry.tag, entry.message,
                              entry.env_id, contract.REASON_UNROUTABLE,
                              f"no queue bound to {self.topo.host_exchange_name(host)}",
                              track=False,
                              extra_headers={HEADER_HOST: host})
        elif outcome != publishing.ACK:
            return self._refused(token, outcome)
        elif kind == _HOST_COPY:
            self.stats["out"] += 1
        entry.remaining -= 1
        if entry.remaining == 0:
            del self._inflight[entry.key]
            entry.lane.window.settle(entry.tag, True)
            self.service.latency.observe(time.monotonic() - entry.started)

    def _refused(self, token, outcome):
        """The broker refused a copy (nack: a queue without a leader during
        a cluster failover, a full queue...). The copy is published again
        after a backoff while the ingress message stays unacknowledged.
        Rejecting it for requeue instead would bring it back flagged as
        redelivered, to be counted towards poison for the broker's trouble."""
        entry, kind, host, _ = token
        entry.nacks += 1
        self.stats["refused"] += 1
        if entry.nacks > _MAX_REFUSALS and kind == _HOST_COPY:
            LOG.error("event %s: broker %s the copy for host %s %d times; "
                      "dead-lettering that copy", entry.env_id, outcome, host,
                      entry.nacks)
            entry.remaining -= 1    # replaced by the dead-letter copy
            self._dead_letter(entry.lane, entry.tag, entry.message,
                              entry.env_id, contract.REASON_UNROUTABLE,
                              f"the broker refused the copy for "
                              f"{self.topo.host_exchange_name(host)} "
                              f"{entry.nacks} times", track=False,
                              extra_headers={HEADER_HOST: host})
            return
        delay = min(_REFUSED_DELAY * 2 ** (entry.nacks - 1), _REFUSED_MAX)
        heapq.heappush(self._refused_copies,
                       (time.monotonic() + delay, next(self._tokens), token))
        # One line per event at WARNING; during a failover every copy in
        # flight may be refused many times over.
        LOG.log(logging.WARNING if entry.nacks == 1 else logging.DEBUG,
                "event %s: broker %s the %s copy (host %s); publishing it "
                "again in %.2fs", entry.env_id, outcome, kind, host, delay)

    def _publish_refused_again(self, now):
        while self._refused_copies and self._refused_copies[0][0] <= now:
            _, _, token = heapq.heappop(self._refused_copies)
            entry = token[0]
            if self._inflight.get(entry.key) is not entry:
                continue
            exchange, routing_key, body, kwargs = token[3]
            self.publisher.publish(exchange, routing_key, body, token, **kwargs)

def _property(message, name):
    """One AMQP property of a kombu message, whatever the transport."""
    props = getattr(message, "properties", None)
    if name == "application_headers":
        return getattr(message, "headers", None)
    if name == "content_type":
        return getattr(message, "content_type", None)
    return props.get(name) if type(props) is dict else None

