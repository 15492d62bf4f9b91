"""One connection's worth of routing: the loop, and what it does per message.

One thread owns the connection. Broker callbacks (deliveries, confirms,
lifecycle messages, channel closes) only append values to lists; the loop
alone publishes, acknowledges and decides, so nothing is ever published from
inside a callback (py-amqp would drain the socket and recurse).

Failures stay where they happen (README, "Fault model"): a bad message is
dead-lettered by itself; a copy the broker refuses or a channel it closes
is handled by the publish side (router/delivery.py); a lane or placement
channel the broker closes is reopened here, its unacknowledged messages
requeued by the broker. Only a lost connection ends a session.
"""

import heapq
import itertools
import logging
import time

from amqp.exceptions import ConsumerCancelled

from router import journal as journal_
from router import routing
from router.bus import connection as bus_connection
from router.bus import contract, inbound, topology, tracecontext
from router.bus.connection import take
from router.delivery import (
    DEAD,
    HEADER_FOR_HOST,
    HEADER_HOST,
    HEADER_PARKED,
    HEADER_UNBOUND,
    HOST_COPY,
    RETRY,
    Delivery,
    property_of,
    untrusted_headers,
)
from router.lanes import HEADER_REDELIVERIES, HEADER_VERDICT, HEADER_VERDICT_DETAIL, Lane
from router.observer import PlacementObserver

LOG = logging.getLogger(__name__)

# Messages routed past a refusing probation queue whose count this process
# keeps (router/service.py RouterService.bypassed), the oldest forgotten.
BYPASS_LEDGER = 10_000

__all__ = ["Session", "HOST_COPY", "RETRY", "DEAD"]


class Session:
    def __init__(self, service, conn):
        self.service = service
        self.s = service.settings
        self.topo = self.s.topology
        self.conn = conn
        self.stats = service.stats
        self._broker_errors = conn.connection_errors + conn.channel_errors
        self._parked = []           # memory transport only: (due, n, ...)
        self._n = itertools.count()
        # Events with no host yet, held for their placement: entry ->
        # (due, server key, decoded...), oldest first; and by instance.
        self._unplaced = {}
        self._unplaced_for = {}
        # ingress tags whose counted copy went to probation: that copy is
        # routed only once their acknowledgements have left (_route_probation)
        self._probation_blockers = set()
        self.probation = None
        self._repaired = float("-inf")     # when the topology was last declared again
        self._repair_why = None             # why it must be, until it is

    # --- set-up -------------------------------------------------------------
    def run(self):
        conn = self.conn
        try:
            bus_connection.connect_once(conn)
            self.memory = bus_connection.is_memory(conn)
            self.user = bus_connection.user_of(conn)
            topology.declare(conn.channel(), *self.topo.central())
            if not self.memory and not self.service.parking_checked:
                self.service.parking_checked = True
                self._check_parking()
            self.delivery = Delivery(
                conn, self.topo, self.stats, settled=self._settled,
                router_name=self.s.name,
                no_host_timeout=self.s.policy.no_host_timeout,
                alone_returned=self._alone_returned,
                patience=self.s.refused_patience, hold=self.s.refused_hold,
                user=self.user, memory=self.memory,
                damaged=self._damaged, journal=self.service.journal,
                max_held=max(1, self.s.prefetch // 4))
            self.observer = PlacementObserver(
                conn, self.delivery, self.s, self.service.placement,
                self.stats, memory=self.memory, placed=self._placed)
            self.observer.start()
            self.main = Lane("main", self.topo.router_queue(), self.s.prefetch,
                             memory=self.memory, consume_check=self.s.consume_check)
            self.main.open(conn, self.delivery.watch)
            if not self.memory:
                self.probation = Lane("probation", self.topo.probation_queue(),
                                      1, memory=False,
                                      consume_check=self.s.consume_check)
                self.probation.open(conn, self.delivery.watch)
            self.stats["sessions"] += 1
            self.service.last_connect_error = None
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
        lanes = [lane for lane in (self.main, self.probation) if lane]
        while True:
            if self.service._stop.is_set() and stopping_since is None:
                stopping_since = time.monotonic()
                for lane in lanes:
                    lane.cancel()
                LOG.info("router %s stopping: %d in flight", self.s.name,
                         len(self.delivery.entries) + len(self.main.deliveries))
                # parked now, rather than given back to the queue (and
                # counted as redeliveries) when the session ends
                self._release_unplaced(float("inf"))
            if stopping_since is not None:
                # Held for a denied write, nothing drains: the broker gives
                # what is in hand back to the queue when the session ends.
                idle = self.delivery.held or self.delivery.idle and not any(
                    lane.deliveries for lane in lanes)
                if idle or time.monotonic() - stopping_since > self.s.drain_timeout:
                    return
            bus_connection.drain(self.conn, 0.25)
            with bus_connection.corked(self.conn):
                self._pump()
            now = time.monotonic()
            if self._unplaced:
                self._release_unplaced(now)
            while self._parked and self._parked[0][0] <= now:
                _, _, body, env, headers = heapq.heappop(self._parked)
                self.delivery.send_untracked(
                    self.topo.ingress_exchange_name, topology.RETRY_ROUTING_KEY,
                    body, message_id=env.id, headers=headers)
            if now >= next_heartbeat and not self.memory:
                self.conn.heartbeat_check()
                next_heartbeat = now + 1.0
            if stopping_since is None and not self.memory:
                self._check_lanes(lanes, now)

    def _check_lanes(self, lanes, now):
        """A lane whose queue was deleted without a cancel (RabbitMQ 3.10,
        quorum queues: router/bus/consuming.py) is reopened as a cancelled
        one is: the queue declared again, consumed on a new channel. An
        idle lane's or placement queue's binding is declared again."""
        for lane in lanes:
            try:
                lane.queue_watch.check(now)
            except ConsumerCancelled as exc:
                self._reopen_lane(lane, exc)
        try:
            self.observer.queue_watch.check(now)
        except ConsumerCancelled as exc:
            self.observer.reopen(exc)

    def _check_parking(self):
        """Once per process: said at ERROR, and routing goes on (events are
        at risk only while the router queue refuses a parked one)."""
        why = topology.parking_refusal(self.conn, self.topo)
        if why is not None:
            LOG.error("router %s: parked events may be lost: %s", self.s.name,
                      why)

    def _pump(self):
        delivery = self.delivery
        while True:
            self.observer.pump(self._broker_errors)
            if self.main.deliveries:
                self.main.queue_watch.delivered()
            for message in take(self.main.deliveries):
                self._route_safely(message, self.main)
            busy = delivery.pump()
            if self._repair_why is not None:
                self._repair_topology()
            if not busy and not (self.main.deliveries or self.observer.pending):
                break
        self._reopen_closed_channels()
        self.main.flush()
        if self.probation is not None:
            if self.probation.deliveries:
                self.probation.queue_watch.delivered()
                self._route_probation()
            self.probation.flush()

    def _reopen_closed_channels(self):
        for channel, exc in self.delivery.closed_channels():
            for lane in (self.main, self.probation):
                if lane is not None and channel is lane.channel:
                    self._reopen_lane(lane, exc)
            if channel is self.observer.channel:
                self.observer.reopen(exc)

    def _reopen_lane(self, lane, exc):
        """The broker closed a lane's channel (the queue deleted, an ack it
        did not like): it requeued what that channel held, so those entries
        settle nothing any more; consume again on a new channel."""
        self.stats["lane_channel_faults"] += 1
        LOG.warning("router %s: the broker closed the %s lane's channel (%s); "
                    "%d message(s) in hand go back to the queue; consuming "
                    "again", self.s.name, lane.name, exc, len(lane.window or ()))
        self.delivery.forget_lane(lane)
        for entry in [e for e in self._unplaced if e.lane is lane]:
            self._unhold(entry)     # the broker gave it back to the queue
        if lane is self.main:
            self._probation_blockers.clear()
        bus_connection.close_quietly(lane.channel, self._broker_errors)
        # a deleted queue is declared again, as at the session's start
        topology.declare(self.conn.channel(), *self.topo.central())
        lane.open(self.conn, self.delivery.watch)

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
        for message in take(self.probation.deliveries):
            self._route_safely(message, self.probation)

    def _damaged(self, why):
        """A central destination the router publishes to without consuming
        from it (a retry queue, the dead-letter exchange or queue) is gone:
        an operator deleted it. Repaired from the loop (_pump), never from
        inside the publish side's fault handling: declaring waits for the
        broker, and whatever that reads must not land mid-publish."""
        if self._repair_why is None:
            self._repair_why = why

    def _repair_topology(self):
        """Declare the central topology again, at most once a second; the
        copy that found it gone is published again by its backoff."""
        now = time.monotonic()
        if now - self._repaired < 1.0:
            return
        why, self._repair_why, self._repaired = self._repair_why, None, now
        self.stats["topology_repairs"] += 1
        LOG.warning("router %s: declaring the central topology again (%s)",
                    self.s.name, why)
        channel = self.conn.channel()
        try:
            topology.declare(channel, *self.topo.central())
        except self.conn.channel_errors as exc:
            LOG.error("router %s: the central topology could not be declared "
                      "again: %s", self.s.name, exc)
        finally:
            bus_connection.close_quietly(channel, self._broker_errors)

    def _settled(self, entry):
        # A dropped entry (its dead letter refused for the whole patience)
        # is acknowledged as well: rejected, the queue's own dead-lettering
        # put it in the dead-letter queue without our reason once the
        # refusal ended (found by tests/chaos). The ERROR line and
        # dropped:<reason> say what happened to it.
        entry.lane.window.settle(entry.tag, True)
        self.service.latency.observe(time.monotonic() - entry.started)

    # --- routing ------------------------------------------------------------
    def _route_safely(self, message, lane):
        try:
            self._route(message, lane)
        except self._broker_errors:
            raise
        except Exception as exc:
            # A bug must not stop the service or lose the message: park it
            # in the dead-letter queue, where an operator can replay it.
            msg_id = property_of(message, "message_id")
            LOG.exception("event %s: unexpected error while routing",
                          inbound.loggable(msg_id))
            self._dead_letter_or_drop(lane, message, msg_id,
                                      contract.REASON_INTERNAL,
                                      f"{type(exc).__name__}: {exc}")

    def _dead_letter_or_drop(self, lane, message, msg_id, reason, detail):
        """The last line of defence: it must work on any message."""
        tag = message.delivery_tag
        # Copies already published report to the dropped entry, harmlessly.
        self.delivery.entries.pop((lane.name, tag), None)
        try:
            entry = self.delivery.track(lane, tag, message,
                                        inbound.safe_shortstr(msg_id) or "-")
            self.delivery.dead_letter(entry, reason, detail)
        except self._broker_errors:
            raise
        except Exception:
            self.delivery.entries.pop((lane.name, tag), None)
            lane.window.settle(tag, False, requeue=False)
            self.stats["dropped:internal-error"] += 1
            LOG.exception("event %s could not be dead-lettered (%s); rejected "
                          "without requeue", inbound.loggable(msg_id), reason)

    def _route(self, message, lane):
        tag = message.delivery_tag
        lane.window.open(tag)
        self.stats["in"] += 1
        props = inbound.properties_of(message)
        headers = props.get("application_headers")
        user_id = props.get("user_id")
        msg_id = props.get("message_id")
        ours = not self.memory and user_id is not None and user_id == self.user
        seen = lane.redeliveries(message, headers, ours)
        bypass_key = None
        if seen:
            # Routed past a refusing probation queue before (uncounted
            # there): the count this process kept goes on from its own.
            bypass_key = (inbound.safe_shortstr(msg_id),
                          hash(inbound.raw_body(message.body)))
            seen = max(seen, self.service.bypassed.get(bypass_key, 0) + 1)
        limit = self.s.redelivery_limit
        if seen >= limit + 2:
            return self._drop_poison(lane, tag, msg_id, seen)
        if seen >= limit:
            entry = self.delivery.track(lane, tag, message,
                                        inbound.safe_shortstr(msg_id) or "-",
                                        ours=ours)
            return self.delivery.dead_letter(
                entry, contract.REASON_POISON,
                f"delivered {seen + 1} times without being settled")
        try:
            env, verdict = inbound.decode_message(
                message.body, props, self.s.max_body_bytes), None
        except contract.ContractError as exc:
            env, verdict = None, (exc.reason, str(exc))
        publisher = user_id
        now = time.time()
        attempt, first_seen = 0, now
        for_host, parked, unbound = None, 0, 0
        # Without headers every read below gives its default: skipped.
        if headers and (ours or (self.memory and type(headers) is dict)):
            # Our own copy: carries the original, broker-validated publisher.
            publisher = inbound.header(headers, contract.HEADER_PUBLISHER,
                                       str, publisher)
            attempt = inbound.header(headers, contract.HEADER_ATTEMPT, int, 0)
            first_seen = inbound.header(headers, contract.HEADER_FIRST_SEEN,
                                        float, first_seen)
            # A host copy parked after refusals: for that host alone.
            for_host = inbound.header(headers, HEADER_FOR_HOST, str, None)
            parked = inbound.header(headers, HEADER_PARKED, int, 0)
            unbound = inbound.header(headers, HEADER_UNBOUND, int, 0)
            carried = inbound.header(headers, HEADER_VERDICT, str, None)
            if carried and verdict is None:
                verdict = (carried, inbound.header(
                    headers, HEADER_VERDICT_DETAIL, str, ""))
        entry = self.delivery.track(
            lane, tag, message,
            env.id if env else inbound.safe_shortstr(msg_id) or "-", ours=ours,
            parked=parked, unbound=unbound)
        if headers:
            # The sender's, so hostile: kept only if it is well formed.
            traceparent = tracecontext.valid(headers.get(tracecontext.HEADER)) \
                if type(headers) is dict else None
        else:
            traceparent = None
        entry.trace = traceparent
        if env is not None and type(env.payload) is contract.InstanceEvent:
            entry.event = env.payload
        if seen:
            # If the probation queue refuses its copy past hold, the message
            # is routed here instead, uncounted: a bystander of a lost
            # connection is not dead-lettered for the probation queue's
            # trouble (the review: 512 of 512 in flight were).
            entry.fallback = lambda: self._bypass(
                entry, bypass_key, seen, env, verdict, publisher, for_host,
                attempt, first_seen, time.time())
            return self._to_probation(entry, verdict, publisher, seen, attempt,
                                      first_seen)
        # Only here may the event be held for its placement: the caller
        # settles nothing after this (a fallback's caller settles the entry
        # as soon as it returns: a held one would be acknowledged unrouted).
        self._route_decoded(entry, env, verdict, publisher, for_host, attempt,
                            first_seen, now, hold=True)

    def _bypass(self, entry, key, seen, *decoded):
        """Route a redelivered message the probation queue refuses, here.
        Its count is kept in this process instead (bounded, oldest out):
        one that kills sessions comes back counted on, and is dead-lettered
        `poison` at the limit (the review: a bypassed poison, uncounted,
        killed 8 sessions in 60 s with no end). And contained as the main
        lane is (_route_safely): this runs from the publish side's turn."""
        ledger = self.service.bypassed
        ledger[key] = seen
        ledger.move_to_end(key)
        if len(ledger) > BYPASS_LEDGER:
            ledger.popitem(last=False)
        try:
            self._route_decoded(entry, *decoded)
        except self._broker_errors:
            raise
        except Exception as exc:
            LOG.exception("event %s: unexpected error routing it past the "
                          "probation queue; dead-lettering it", entry.env_id)
            self.delivery.dead_letter(entry, contract.REASON_INTERNAL,
                                      f"{type(exc).__name__}: {exc}")

    def _route_decoded(self, entry, env, verdict, publisher, for_host, attempt,
                       first_seen, now, hold=False):
        if verdict is not None:
            return self.delivery.dead_letter(entry, *verdict)
        if for_host:
            return self._deliver(entry, env, (for_host,), publisher,
                                 entry.trace)
        decision = self._decide(env, publisher, attempt, first_seen, now)
        if type(decision) is routing.Deliver:
            self._deliver(entry, env, decision.hosts, publisher, entry.trace,
                          (env, publisher, attempt, first_seen))
        elif type(decision) is routing.Retry:
            if hold and attempt == 0 and self._may_hold(entry, env):
                self._hold_unplaced(entry, env, publisher, attempt, first_seen)
            else:
                self._retry(entry, env, decision, publisher, first_seen)
        else:
            self.delivery.dead_letter(entry, decision.reason, decision.detail)

    def _decide(self, env, publisher, attempt, first_seen, now):
        return routing.decide(
            env, publisher=publisher,
            hosts_for=self.service.placement.hosts_for, attempt=attempt,
            first_seen=first_seen, now=now, policy=self.s.policy,
            placement_ready=self.service.placement.ready,
            authenticated=not self.memory)

    # --- events without a host, held for their placement ----------------------
    # An event with no host hint for an instance no host has reported yet is
    # most often early: the instance's first lifecycle event is on its way.
    # Parked in a retry queue it would come back at the end of its tier
    # (0.5 s, then 1, 2, ... 16 s) whenever the placement arrived; held here
    # for unplaced_hold, it is routed as soon as the placement fanout names
    # a host. Held in hand, it keeps its ingress delivery (and a prefetch
    # slot: at most prefetch // 4 are held; acknowledgements of the others
    # pass it, router/acks.py); past its time, on stop, or over the cap it is
    # parked as before. Only the main lane's (probation takes one at a time)
    # and only hint-less events: a hint is the sender's to make up.

    def _may_hold(self, entry, env):
        # First pass only (attempt 0): an event back from a retry tier was
        # held once; held again each round, a few never placed would keep
        # the cap full for their whole no_host_timeout.
        return (self.s.unplaced_hold > 0 and entry.lane is self.main
                and env.payload.host is None and entry.remaining == 0
                and entry.fallback is None
                and len(self._unplaced) < max(1, self.s.prefetch // 4))

    def _hold_unplaced(self, entry, env, publisher, attempt, first_seen):
        key = env.payload.server_uuid      # lower case (contract), as placement's
        self._unplaced[entry] = (time.monotonic() + self.s.unplaced_hold, key,
                                 env, publisher, attempt, first_seen)
        self._unplaced_for.setdefault(key, []).append(entry)
        self.stats["unplaced_held"] += 1
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug("event %s for %s: no host yet; held up to %.1fs for its "
                      "placement", env.id, env.payload.server_uuid,
                      self.s.unplaced_hold)

    def _unhold(self, entry):
        _, key, *decoded = self._unplaced.pop(entry)
        waiting = self._unplaced_for.get(key)
        if waiting is not None:
            waiting.remove(entry)
            if not waiting:
                del self._unplaced_for[key]
        return decoded

    def _placed(self, uuids):
        """The placement fanout named hosts for these instances: the events
        held for them are routed now, if they have a host now."""
        if not self._unplaced_for:
            return
        for uuid in uuids:
            waiting = self._unplaced_for.get(uuid)
            if not waiting:
                continue
            for entry in list(waiting):
                env, publisher, attempt, first_seen = self._unplaced[entry][2:]
                if not self.delivery.holds(entry):
                    self._unhold(entry)         # its lane's channel is gone
                    continue
                decision = self._decide(env, publisher, attempt, first_seen,
                                        time.time())
                if type(decision) is routing.Deliver:
                    self._unhold(entry)
                    self.stats["unplaced_placed"] += 1
                    self._deliver(entry, env, decision.hosts, publisher,
                                  entry.trace,
                                  (env, publisher, attempt, first_seen))

    def _release_unplaced(self, now):
        """Held events whose time is up (all of them: now=inf) are routed
        as the routing table says now: parked, mostly."""
        for entry, (due, *_) in list(self._unplaced.items()):
            if due > now:
                break               # oldest first: the rest are younger
            env, publisher, attempt, first_seen = self._unhold(entry)
            if not self.delivery.holds(entry):
                continue
            self._route_decoded(entry, env, None, publisher, None, attempt,
                                first_seen, time.time(), hold=False)

    def _drop_poison(self, lane, tag, msg_id, seen):
        """Its poison dead letter failed too, every time: let it go."""
        lane.window.settle(tag, False, requeue=False)
        self.stats["dropped:poison"] += 1
        LOG.error("event %s: dropped after %d deliveries: even its poison "
                  "dead letter could not be placed", inbound.loggable(msg_id),
                  seen + 1)
        self.service.journal.record(
            journal_.DROPPED, inbound.safe_shortstr(msg_id), None, None, None,
            None, None, f"poison: delivered {seen + 1} times")

    def _to_probation(self, entry, verdict, publisher, seen, attempt,
                      first_seen):
        """Copy the message, as it came and counted, to the probation queue;
        the original is acknowledged once the copy is confirmed."""
        message = entry.message
        counted = {HEADER_REDELIVERIES: seen,
                   contract.HEADER_ATTEMPT: attempt,
                   contract.HEADER_FIRST_SEEN: first_seen,
                   contract.HEADER_PUBLISHER: publisher or ""}
        if verdict is not None:
            counted[HEADER_VERDICT] = verdict[0]
            counted[HEADER_VERDICT_DETAIL] = inbound.clip(verdict[1])
        headers = untrusted_headers(message, entry.ours)
        if type(headers) is dict:
            headers = {k: v for k, v in headers.items()
                       if k not in ("x-delivery-count", HEADER_VERDICT,
                                    HEADER_VERDICT_DETAIL)}
        headers = self.delivery.bounded(headers, counted)
        self.delivery.send(entry, RETRY, None, "",
                           self.topo.probation_queue_name,
                           inbound.raw_body(message.body),
                           message_id=(inbound.safe_shortstr(
                               property_of(message, "message_id"))
                               or inbound.safe_shortstr(entry.env_id)),
                           headers=headers, user_id=self.user)
        if entry.lane is self.main:
            # The probation lane takes one message at a time: the broker
            # sends the copy only after this original is acknowledged.
            self._probation_blockers.add(entry.tag)
        self.stats["redelivered"] += 1
        LOG.info("event %s redelivered (%d): to probation", entry.env_id, seen)

    def _deliver(self, entry, env, hosts, publisher, traceparent=None,
                 decided=None):
        """A copy per host to the hosts exchange, the host its routing key:
        one exchange the router declared, whatever the host (issue 22).
        decided: (env, publisher, attempt, first_seen) when `hosts` is the
        routing decision's (not a parked copy's one host)."""
        p = env.payload
        if decided is not None and len(hosts) == 1:
            entry.routed = decided
        headers = {contract.HEADER_PUBLISHER: publisher} if publisher else None
        if traceparent is not None:
            if headers is None:
                headers = {tracecontext.HEADER: traceparent}
            else:
                headers[tracecontext.HEADER] = traceparent
        self.service.journal.record(journal_.ROUTED, env.id,
                                    traceparent and traceparent[3:35],
                                    p.server_uuid, p.tag, p.name, p.status,
                                    hosts,
                                    span_id=traceparent and traceparent[36:52])
        body = inbound.raw_body(entry.message.body)
        exchange = self.topo.hosts_exchange_name
        for host in hosts:
            self.delivery.send(entry, HOST_COPY, host, exchange, host, body,
                               message_id=env.id, headers=headers)
        if LOG.isEnabledFor(logging.DEBUG):     # not the join, per event
            LOG.debug("event %s %s for %s routed to %s", env.id,
                      env.payload.name, env.payload.server_uuid,
                      ",".join(hosts))

    def _alone_returned(self, entry, host):
        """The event's only copy came back: its host has no queue bound
        (most often a hint naming no host, with no placement yet). Decided
        again after a retry tier, with the placement then, as an event with
        no host is; dead-lettered unknown-host once no_host_timeout has
        passed, never while placement is warming up."""
        env, publisher, attempt, first_seen = entry.routed
        entry.routed = None
        now = time.time()
        detail = f"host {host!r} has no queue bound to {self.topo.hosts_exchange_name}"
        if (now - first_seen >= self.s.policy.no_host_timeout
                and self.service.placement.ready()):
            LOG.warning("event %s: %s after %.0fs; dead-lettering it", env.id,
                        detail, now - first_seen)
            return self.delivery.dead_letter(
                entry, contract.REASON_UNKNOWN_HOST,
                f"{detail} after {now - first_seen:.0f}s",
                extra_headers={HEADER_HOST: host})
        self._retry(entry, env, routing.Retry(attempt + 1, detail), publisher,
                    first_seen)

    def _retry(self, entry, env, decision, publisher, first_seen):
        delay = self.topo.retry_delay_ms(decision.attempt)
        headers = {contract.HEADER_ATTEMPT: decision.attempt,
                   contract.HEADER_FIRST_SEEN: first_seen,
                   contract.HEADER_PUBLISHER: publisher or ""}
        if entry.trace is not None:
            headers[tracecontext.HEADER] = entry.trace
        body = inbound.raw_body(entry.message.body)
        if self.memory:
            # The memory transport has no TTLs to park a message with: keep
            # it here (it has no durability to lose) and put it back later.
            heapq.heappush(self._parked, (time.monotonic() + delay / 1000,
                                          next(self._n), body, env, headers))
            self.delivery.complete(entry)
        else:
            self.delivery.send(entry, RETRY, None, "",
                               self.topo.retry_queue_name(delay), body,
                               message_id=env.id, headers=headers,
                               user_id=self.user)
        self.stats["retried"] += 1
        self.delivery.record(entry, journal_.RETRIED,
                             f"attempt {decision.attempt} in {delay}ms: "
                             f"{decision.detail}")
        LOG.info("event %s retry %d in %dms: %s", env.id, decision.attempt,
                 delay, decision.detail)
