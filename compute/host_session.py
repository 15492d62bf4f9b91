"""One connection's worth of a host consumer (compute/host_consumer.py).

A failure costs no more than its blast radius (issue 19):

  failure                             blast radius      what the session does
  a bad message (decode, registry)    that message      dead-letters it with a reason
  the dead-letter copy refused, or    that copy         compute/dead_letters.py: retried
  its channel closed (404/403/406)                      for a patience, then dropped
                                                        and counted
  the consuming channel closed        its deliveries    reopened, one message at a time;
  (406 on an ack, 403 on consume)                       the broker requeued them
  a message that killed its session   that message      counted in the ledger across
                                                        sessions; poison at the limit
  the connection lost or hard-closed  the session       ends it (the consumer reconnects)

A channel the broker closes is found from the operation it names: each
channel here does its own operations only (the intake consumes and settles,
the dead-letter channel publishes), so the fault goes to the one that caused
it and nothing else stops. Nothing sent can be a hard error (a frame over
frame_max): dead-letter copies are bounded.
"""

import logging
import time

from amqp import spec
from kombu import Consumer

from compute import dead_letters, events
from compute.delivery_ledger import DeliveryLedger
from router import acks
from router import journal as journal_
from router.acks import AckWindow
from router.bus import connection as bus_connection
from router.bus import consuming, contract, inbound, supervision, topology, tracecontext

LOG = logging.getLogger(__name__)

HEADER_HOST = "x-evrouter-host"

# (class, method) of what each channel sends; a channel.close names one.
_DEAD_LETTER_OPS = frozenset({spec.Basic.Publish, spec.Confirm.Select})
_INTAKE_OPS = frozenset({spec.Basic.Qos, spec.Basic.Consume, spec.Basic.Cancel,
                         spec.Basic.Ack, spec.Basic.Reject, spec.Basic.Nack,
                         spec.Basic.Recover})


_NESTED_FAULTS = 3


class Lost(Exception):
    """A session that had been consuming lost its connection."""

    def __init__(self, up_since):
        super().__init__()
        self.up_since = up_since        # when it started consuming


class _Intake:
    """The consuming channel, its deliveries and what is owed on them."""

    def __init__(self, conn, queues, prefetch, memory, *, consume=True):
        self.deliveries = []
        self.window = AckWindow(multiple=not memory)
        self.keys = {}                  # delivery tag -> ledger key
        # Declared by the session (topology.declare: a central binding it
        # may not make yet must not fail the session), not again here.
        self.consumer = Consumer(conn.channel(), queues, auto_declare=False,
                                 on_message=self.deliveries.append)
        self.consumer.qos(prefetch_count=prefetch)
        if consume:
            self.consumer.consume()

    @property
    def channel(self):
        return self.consumer.channel


class HostSession:
    """Consumes on one connection until it is lost; the consumer (owner)
    holds what outlives it: settings, stats, the ledger, caution."""

    def __init__(self, owner, conn, errors):
        self.owner = owner
        self.s = owner.settings
        self.topo = self.s.topology
        self.conn = conn
        self.errors = errors
        self.stats = owner.stats
        self.ledger = owner.ledger

    def run(self):
        owner, conn, host = self.owner, self.conn, self.s.host
        try:
            bus_connection.connect_once(conn)
            self.memory = bus_connection.is_memory(conn)
            exchanges, queues = self.topo.for_host(host)
            self.queues = queues
            # Only this host's own entities: its broker user may configure
            # nothing else (see router/permissions.py). The dead-letter
            # exchange belongs to the central topology.
            for queue, exchange, key, why in topology.declare(
                    conn.channel(), exchanges, queues):
                LOG.error("host consumer %s: queue %s cannot be bound to %s "
                          "with key %r: %s (run `evrouter topology --declare` "
                          "as the router user, and `evrouter permissions "
                          "--apply`); it is bound once it can be, and the "
                          "routers' copies for this host are parked until "
                          "then", host, queue, exchange, key, why)
            # Said once, for the operator; each copy still tries, since the
            # exchange may be declared at any time (a cached "missing" once
            # dropped messages the exchange was there to take).
            if not self._exists(self.topo.dead_letter_exchange_name):
                LOG.error("host consumer %s: dead-letter exchange %s does not "
                          "exist (run `evrouter topology --declare`); poison "
                          "messages will be dropped until it does", host,
                          self.topo.dead_letter_exchange_name)
            self.dead_letters = dead_letters.DeadLetters(
                conn, self.topo.dead_letter_exchange_name, host,
                patience=self.s.dead_letter_patience,
                max_message_bytes=self.s.max_message_bytes,
                on_settled=self._settle_dead_letter, stats=self.stats)
            self._settled = 0
            self._quiet_since = time.monotonic()
            self.intake = _Intake(conn, queues, 1 if owner._cautious
                                  else self.s.prefetch, self.memory)
            # RabbitMQ 3.10 does not always cancel the consumers of a
            # deleted quorum queue: asked when idle (router/bus/consuming.py)
            self.watch = consuming.QueueWatch(conn, queues[0],
                                              self.s.consume_check)
            owner.connection = conn
            owner.last_connect_error = None
            owner.ready.set()
            self.stats["sessions"] += 1
            LOG.info("host consumer %s consuming %s (prefetch %d)", host,
                     queues[0].name, self.s.prefetch)
            self._loop()
        except self.errors as exc:
            if owner.ready.is_set():
                raise Lost(owner.ready.since) from exc
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

    # --- the loop --------------------------------------------------------------
    def _loop(self):
        stopping_since = None
        next_heartbeat = 0.0
        while True:
            if self.owner._stop.is_set() and stopping_since is None:
                stopping_since = time.monotonic()
                self.intake.consumer.cancel()
            if stopping_since is not None:
                idle = not (self.intake.deliveries or self.dead_letters.busy)
                if idle or (time.monotonic() - stopping_since >
                            self.s.drain_timeout):
                    # Anything still unacknowledged goes back to the queue.
                    return
            try:
                self._drain(stopping_since is not None, next_heartbeat)
                self._pump()
            except self.conn.channel_errors as exc:
                self._channel_fault(exc, stopping=stopping_since is not None)
                # A copy dropped there settled its original: say so now, not
                # after the next wait for the broker.
                self._flush()
            now = time.monotonic()
            if now >= next_heartbeat and not self.memory:
                self.conn.heartbeat_check()
                next_heartbeat = now + bus_connection.heartbeat_every(self.conn)
            if stopping_since is None and not self.memory:
                self.watch.check(now)     # ends the session as a cancel would
            if self.owner.waits is not None:
                self.owner.waits.check()

    def _drain(self, stopping, next_heartbeat):
        """Wait for the broker until something arrives or is due.

        Idle, that is the next heartbeat check: nothing polls (issue 22: an
        idle compute host's consumer costs no measurable CPU). stop() wakes
        the wait at once through the owner's Waker."""
        if self.memory:
            # kombu's memory transport has no socket to wait on.
            bus_connection.drain(self.conn, self._wait(stopping, next_heartbeat))
        elif bus_connection.wait_readable(
                self.conn, self._wait(stopping, next_heartbeat),
                self.owner.waker):
            # Up to a second for the rest of a frame that began arriving.
            bus_connection.drain(self.conn, 1.0)

    def _wait(self, stopping, next_heartbeat):
        now = time.monotonic()
        due = [self.dead_letters.next_due()]
        if self.memory or stopping or self.owner._cautious:
            # No socket to wait on (and no heartbeat), finishing in-flight
            # copies, or watching for a quiet second to leave caution.
            due.append(now + 0.25)
        else:
            due += [next_heartbeat, self.watch.next_due]
        if self.owner.waits is not None:
            # counted on the registry's clock (a test may inject one)
            due_in = self.owner.waits.due_in()
            if due_in is not None:
                due.append(now + due_in)
        return min(max(0.0, min(d for d in due if d is not None) - now), 30.0)

    def _pump(self):
        intake = self.intake
        while True:
            for message in bus_connection.take(intake.deliveries):
                self.watch.delivered()
                self._handle(message)
            self.dead_letters.pump()
            if not intake.deliveries:
                break
        # One multiple-ack for the batch: fewer frames for us and the broker.
        settled = self._flush()
        if self.owner._cautious and not self.memory:
            self._leave_caution(settled)

    def _flush(self):
        """Tell the broker what was settled; returns how many frames."""
        intake = self.intake
        frames = intake.window.flush()
        acks.send(intake.channel, frames)
        # Out of the ledger once the broker has been told, not when decided:
        # a message that kills the session between the two counts.
        for tag in [t for t in intake.keys if not intake.window.holds(t)]:
            self.ledger.settled(intake.keys.pop(tag))
        return len(frames)

    def _leave_caution(self, settled):
        """Back to the full prefetch after a prefetch's worth of messages
        settled one by one, or once the queue has been quiet for a second."""
        now = time.monotonic()
        if settled:
            self._settled += settled
            self._quiet_since = now
        elif self.intake.deliveries or self.dead_letters.busy or \
                len(self.intake.window):
            self._quiet_since = now
        quiet = now - self._quiet_since > 1.0
        if self._settled >= self.s.prefetch or quiet:
            # RabbitMQ applies a per-consumer prefetch to consumers started
            # after the basic.qos only: the running consumer is cancelled
            # and started again, or it stays at one message for the whole
            # session (found by tests/chaos: a bad message whose dead
            # letter waited for the patience held every event behind it).
            # What it had in flight stays ours to settle on this channel.
            consumer = self.intake.consumer
            consumer.qos(prefetch_count=self.s.prefetch)
            if not self.memory and not self.owner._stop.is_set():
                consumer.cancel()
                consumer.consume()
            self.owner._cautious = False
            LOG.info("host consumer %s: back to prefetch %d", self.s.host,
                     self.s.prefetch)

    # --- channel faults: the operation names the channel -----------------------
    def _channel_fault(self, exc, *, stopping):
        # Reopening waits for the broker, which may close another channel
        # meanwhile: that fault is handled too, a bounded number of times.
        for _ in range(_NESTED_FAULTS):
            try:
                return self._reopen_for(exc, stopping)
            except self.conn.channel_errors as again:
                exc = again
        raise exc

    def _reopen_for(self, exc, stopping):
        op = getattr(exc, "method_sig", None)
        if op in _DEAD_LETTER_OPS:
            self.dead_letters.channel_failed(exc)
        elif op in _INTAKE_OPS:
            self._reopen_intake(exc, stopping)
        else:
            # No operation of ours named: which channel closed is unknown,
            # so both start afresh (the broker requeues the deliveries).
            self.dead_letters.channel_failed(exc)
            self._reopen_intake(exc, stopping)

    def _reopen_intake(self, exc, stopping):
        old = self.intake
        self.dead_letters.forget(old)
        try:
            old.channel.close()
        except self.conn.channel_errors:
            pass
        # What was in flight comes back redelivered: one at a time, so a
        # message that does this again is alone when it does.
        self.owner._cautious = True
        self._settled = 0
        self.intake = _Intake(self.conn, self.queues, 1, self.memory,
                              consume=not stopping)
        self.stats["intake_channel_faults"] += 1
        LOG.warning("host consumer %s: the broker closed the consuming "
                    "channel (%s); reopened, its %d unsettled deliveries "
                    "requeued", self.s.host, exc, len(old.window))

    # --- one message --------------------------------------------------------------
    def _handle(self, message):
        self.intake.window.open(message.delivery_tag)
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
        if seen > self.s.redelivery_limit:
            # Not even its poison copy settled it: the last resort is the
            # queue's own dead-lettering, without our headers.
            LOG.error("event %s on host %s: delivered %d times, its poison "
                      "copy never confirmed; rejected and dropped",
                      inbound.loggable(msg_id), self.s.host, seen + 1)
            self.stats[f"dropped:{contract.REASON_POISON}"] += 1
            return self._settle(message, False, requeue=False)
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
        headers = props.get("application_headers")
        parsed = tracecontext.parse(headers.get(tracecontext.HEADER)) \
            if type(headers) is dict else None
        # the span id: the parent of this host's spans (router/journal_otlp.py)
        trace, span = parsed[:2] if parsed else (None, None)
        # For the embedding service's log lines, while deliver() runs on
        # this thread (compute/nova_driver.py: Nova's request id)
        self.owner.current_trace = trace
        taken_at = time.time()      # the journal's "delivered": before the waiter
        try:
            # The envelope's created_at (the sender's clock) is not passed
            # on (issue 19, item 6).
            outcome = self.owner.deliver(env.payload, env.id)
        except supervision.FATAL:
            raise
        except BaseException as exc:    # noqa: B036 (FATAL re-raised above)
            # A fault of the registry, not of the message: set aside with
            # the cause, for an operator to replay, rather than looped on.
            # A BaseException too (an eventlet.Timeout the embedding
            # service's code let out): it must not end the host's consumer.
            LOG.exception("event %s: delivery to the registry failed", env.id)
            self.stats["deliver_errors"] += 1
            return self._dead_letter(message, env.id, contract.REASON_INTERNAL,
                                     f"delivery failed: {type(exc).__name__}: "
                                     f"{exc}")
        finally:
            self.owner.current_trace = None
        if outcome == events.CLOSED:
            # The registry is shut down: the event belongs to the next
            # process on this host, and consuming on would only spin.
            self._settle(message, False, requeue=True)
            if not self.owner._stop.is_set():
                LOG.info("host consumer %s: registry closed, stopping "
                         "(event %s left in the queue)", self.s.host, env.id)
                self.owner.stop()
            return
        self._settle(message, True)
        self.stats[outcome] += 1
        journal = self.owner.journal
        if journal.enabled:
            self._record(journal, env, trace, outcome, taken_at, span)

    def _record(self, journal, env, trace, outcome, taken_at, span=None):
        """Taken from the queue, and what the waiter made of it."""
        p = env.payload
        where = f"host {self.s.host}"
        journal.record(journal_.DELIVERED, env.id, trace, p.server_uuid,
                       p.tag, p.name, p.status, where, at=taken_at,
                       span_id=span)
        journal.record(journal_.MATCHED, env.id, trace, p.server_uuid, p.tag,
                       p.name, p.status, journal_.OUTCOMES.get(outcome, outcome),
                       span_id=span)

    def _redelivered(self, message, props):
        info = message.delivery_info
        redelivered = type(info) is dict and bool(info.get("redelivered"))
        key = self.intake.keys[message.delivery_tag] = \
            DeliveryLedger.key(message, props)
        return self.ledger.delivered(key, redelivered, inbound.delivery_count(
            props.get("application_headers")))

    def _settle(self, message, ok, requeue=True):
        self.intake.window.settle(message.delivery_tag, ok, requeue=requeue)

    def _dead_letter(self, message, msg_id, reason, detail):
        """The last line of defence: must work on any message."""
        msg_id = inbound.safe_shortstr(msg_id)
        try:
            ours = {contract.HEADER_REASON: reason,
                    contract.HEADER_DETAIL: inbound.clip(detail),
                    HEADER_HOST: self.s.host}
            cut = self.dead_letters.send(
                message, self.intake, msg_id, reason, ours,
                getattr(message, "headers", None),
                inbound.safe_shortstr(getattr(message, "content_type", None)))
        except self.errors:
            raise
        except Exception:
            LOG.exception("event %s on host %s could not be dead-lettered "
                          "(%s); rejected without requeue",
                          inbound.loggable(msg_id), self.s.host, reason)
            self._settle(message, False, requeue=False)
            self.stats["rejected"] += 1
            return
        LOG.warning("event %s on host %s dead-lettered (%s): %s%s",
                    inbound.loggable(msg_id), self.s.host, reason,
                    inbound.clip(detail, 300), f" [{cut}]" if cut else "")
        # under its message id only: nothing of a body it could not take
        # is believed
        self.owner.journal.record(
            journal_.DEAD, msg_id, None, None, None, None, None,
            f"{reason}: {inbound.clip(detail, 300)} (host {self.s.host})")

    def _settle_dead_letter(self, copy, ok):
        if copy.owner is not self.intake:
            return      # its channel closed: the original is back in the queue
        # Dropped (not ok) is acknowledged too: rejected, the broker would
        # dead-letter it itself, without our reason (compute/dead_letters.py).
        self._settle(copy.message, True)
        if ok:
            self.stats["dead_lettered"] += 1
