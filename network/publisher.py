"""The network side's publisher: instance events onto the ingress exchange.

One thread owns the broker connection (and the spool); ``publish`` hands an
event over through a queue and blocks until that thread says what became of
it. So request threads of a network service can call it concurrently, events
leave in the order they were handed over, and confirms are pipelined: a burst
from many threads costs one confirm round trip, not one each.

``publish`` returns normally only when the event is safe: the broker
confirmed it (persistent, mandatory, routed to a queue), or, with a spool,
it is fsync'd to the spool file. Broker trouble is retried for ``retry_for``
seconds; after that the event goes to the spool, and so does every later
event while the spool is not empty, so order holds. The owner thread drains
the spool, oldest first, whenever the broker answers again (and at start-up,
for what a previous process left behind). Without a spool, or with a full
one, ``publish`` raises: the caller learns the event was not accepted.

Connections follow the reconnect schedule of every evrouter service
(router.bus.backoff), across calls: a session that dropped (a lost broker,
a 403) is not replaced before its backoff ran out, and the backoff restarts
only after a session stayed up for a while. Until then calls do not
connect: they wait for the reconnect if it comes within their
``retry_for``, else they spool (or raise) at once. Retrying a batch the
broker nacked or returned, on a live session, has its own short pauses.

Messages carry the connection's login as ``user_id``, which RabbitMQ checks,
so the router knows the publisher for certain.
"""

import concurrent.futures
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import amqp.exceptions
import kombu.exceptions

from network.spool import Spool, SpoolFull
from router import journal as journal_
from router.bus import connection as bus_connection
from router.bus import contract, publishing, topology, tracecontext
from router.bus.backoff import Backoff, Schedule, describe
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

# Broker answers that retrying will not change: configuration, not weather.
_REFUSED = (amqp.exceptions.AccessRefused, amqp.exceptions.PreconditionFailed,
            amqp.exceptions.NotAllowed)
_TICK = 1.0
# Pauses before a batch the broker nacked or returned goes again (a live
# session: no reconnect), per call; and before the spool is tried again.
_RESEND = Schedule(first=0.1, cap=0.5)
_REDRAIN = Schedule(first=0.4, cap=5.0)
# Seconds a spooled record is returned as unroutable while the broker routes
# the records beside it before it is set aside (spool.set_aside; _single_out).
SET_ASIDE_AFTER = 60.0


class BrokerUnavailable(Exception):
    """Not confirmed by the broker in time, and no spool to keep it."""


class PublishRefused(Exception):
    """The broker refused the message for a reason retrying cannot fix."""


@dataclass(frozen=True)
class PublisherSettings:
    transport_url: str = bus_connection.DEFAULT_URL
    topology: Topology = field(default_factory=Topology)
    producer: str = field(default_factory=lambda: f"network@{socket.gethostname()}")
    spool_path: Optional[str] = None      # None: no spool, publish raises
    spool_max_records: int = 10_000
    spool_max_bytes: int = 16 * 1024 * 1024
    retry_for: float = 2.0                # seconds before an event is spooled
    confirm_timeout: float = 5.0
    connect_timeout: float = 2.0
    heartbeat: int = 30
    ssl: object = False
    max_batch: int = 256
    reconnect: Schedule = Schedule()
    # The journal of hops (router/journal.py): each event confirmed (or
    # spooled), with its host hint. None: no journal.
    journal: Optional[journal_.JournalSettings] = None


@dataclass(frozen=True)
class Receipt:
    """What became of a published event."""
    message_id: str
    spooled: bool


class _Job:
    __slots__ = ("routing_key", "body", "message_id", "future", "record",
                 "event", "settled", "traceparent", "sent_at", "outcome")

    def __init__(self, routing_key, body, message_id, future=None,
                 record=None, event=None, traceparent=None):
        self.routing_key = routing_key
        self.body = body
        self.message_id = message_id
        self.future = future
        self.record = record       # the spool record, when sent from the spool
        self.event = event
        self.settled = False
        # W3C trace context: sent as the traceparent header (kept in the
        # spool with the event)
        self.traceparent = traceparent
        self.sent_at = None         # wall clock, for the journal
        self.outcome = None         # the broker's answer to its last send


class _Unconfirmed(Exception):
    """The broker nacked or returned some messages of a batch."""


class _BackingOff(Exception):
    """Not connecting yet: the last session's backoff has not run out."""

    def __init__(self, seconds, cause):
        super().__init__(f"reconnecting in {seconds:.1f}s after: "
                         f"{describe(cause)}")
        self.cause = cause


class InstanceEventPublisher:
    def __init__(self, settings):
        self.settings = settings
        self.stats = {"sent": 0, "spooled": 0, "drained": 0, "failed": 0,
                      "set_aside": 0}
        # spooled body -> when the broker first refused it alone (_single_out)
        self._refused_since = {}
        self._jobs = queue.Queue()
        self._stopping = threading.Event()
        self._thread = None
        self._spool = None
        self._conn = None           # base connection (failover list)
        self._session = None        # (connection, publisher, outcomes)
        self._drain_at = 0.0
        self._redrain = Backoff(_REDRAIN)
        self._drained = threading.Condition()
        self.backoff = Backoff(settings.reconnect)
        self._reconnect_at = 0.0    # no connect attempt before this
        self._last_cause = None     # why the last session ended
        self._up_since = None       # when the current session connected
        self.journal = journal_.open_journal(settings.journal,
                                             f"publisher:{settings.producer}")

    # --- caller side (any thread) -------------------------------------------
    def start(self):
        s = self.settings
        if s.spool_path:
            self._spool = Spool(s.spool_path, max_records=s.spool_max_records,
                                max_bytes=s.spool_max_bytes)
        self._conn = bus_connection.connection(
            s.transport_url, heartbeat=s.heartbeat, ssl_opts=s.ssl).clone(
                connect_timeout=s.connect_timeout)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="network-publisher")
        self.journal.start()
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def publish(self, event, *, timeout=None, message_id=None,
                traceparent=None):
        """Publish one InstanceEvent; a Receipt once it is safe.

        `message_id` names the envelope; give one derived from the source
        event so that publishing it again (a redelivered notification, a
        retried command) makes a duplicate the waiter drops. Default: a new
        id. Raises ContractError (a ValueError) for an event or id the
        contract refuses, SpoolFull, BrokerUnavailable (no spool) or
        PublishRefused (with a spool, only what a 403 is not: a vhost it
        may not use, a message the broker will never take; a 403 spools
        the event). `traceparent` (W3C) is the publishing context's:
        the event goes as a new span of its trace; without one (or with
        an invalid one), of the current OpenTelemetry span's, or of a new
        trace.
        """
        owner = self._thread
        if owner is None or self._stopping.is_set():
            raise RuntimeError("publisher is not running")
        env = contract.envelope(event, self.settings.producer,
                                message_id=message_id)
        body = contract.encode(env)
        contract.decode(body)       # refuse here what the router would refuse
        future = concurrent.futures.Future()
        self._jobs.put(_Job(topology.instance_routing_key(event.name), body,
                            env.id, future, event=event,
                            traceparent=tracecontext.for_publish(traceparent)))
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = _TICK if deadline is None else min(
                _TICK, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(wait)
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if not owner.is_alive() and not future.done():
                    raise RuntimeError("publisher stopped before event "
                                       f"{env.id} was handled") from None

    @property
    def connected(self):
        """Whether a broker session is open now (for health and tests)."""
        return self._session is not None

    @property
    def spooled(self):
        """Events waiting in the spool."""
        return len(self._spool) if self._spool is not None else 0

    def wait_drained(self, timeout):
        """Block until the spool is empty; False if it is not by `timeout`."""
        with self._drained:
            return self._drained.wait_for(lambda: not self.spooled, timeout)

    def close(self, timeout=30.0):
        """Finish handed-over events, then close. Spooled events stay spooled."""
        if self._thread is None:
            return
        self._stopping.set()
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            LOG.error("network publisher did not stop within %.0fs", timeout)
            return
        self._thread = None
        self.journal.stop()

    # --- the owner thread ---------------------------------------------------
    def _run(self):
        next_keepalive = 0.0
        try:
            while True:
                jobs, stop = self._take()
                try:
                    self._handle(jobs)
                except Exception as exc:
                    # A bug or a failing disk: say so, fail this batch's
                    # unsettled callers, keep serving the others.
                    LOG.exception("network publisher: unexpected error")
                    self._drop_session()
                    self._fail([j for j in jobs if not j.future.done()], exc)
                    self._schedule_drain(failed=True)
                if stop:
                    return
                if time.monotonic() >= next_keepalive:
                    self._keepalive()
                    next_keepalive = time.monotonic() + _TICK
        finally:
            self._drop_session()
            for job in self._take_all():
                job.future.set_exception(RuntimeError("publisher closed"))
            if self._spool is not None:
                if len(self._spool):
                    LOG.warning("network publisher closed with %d events "
                                "spooled in %s; they are sent on next start",
                                len(self._spool), self._spool.path)
                self._spool.close()

    def _handle(self, jobs):
        if self._spool is not None and len(self._spool):
            self._spool_jobs(jobs)
            if time.monotonic() >= self._drain_at:
                self._drain_once()
        elif jobs:
            self._send_or_spool(jobs)

    def _take(self):
        """The next batch of handed-over jobs (waits up to a tick for one)."""
        wait = _TICK
        if self._spool is not None and len(self._spool):
            wait = max(0.0, min(wait, self._drain_at - time.monotonic()))
        jobs, stop = [], False
        try:
            item = self._jobs.get(timeout=wait) if wait > 0 else \
                self._jobs.get_nowait()
            while True:
                if item is None:
                    stop = True
                else:
                    jobs.append(item)
                if len(jobs) >= self.settings.max_batch:
                    break
                item = self._jobs.get_nowait()
        except queue.Empty:
            pass
        return jobs, stop

    def _take_all(self):
        jobs = []
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return jobs
            if item is not None:
                jobs.append(item)

    def _send_or_spool(self, jobs):
        s = self.settings
        retryable = self._retryable()
        deadline = time.monotonic() + s.retry_for
        resend = Backoff(_RESEND)           # per call: no state leaks
        while True:
            try:
                self._send(jobs)
                return
            except _REFUSED as exc:
                refused = exc
                break
            except _BackingOff as exc:
                if isinstance(exc.cause, _REFUSED):
                    refused = exc.cause     # what trying again would get
                    break
                last = exc
            except retryable as exc:
                last = exc
            now = time.monotonic()
            wait = max(self._reconnect_at - now, 0.0 if self._session is None
                       else resend.failed(last))
            if now + wait > deadline:
                return self._give_up(jobs, last)
            if self._session is not None:   # a reconnect logged its own line
                LOG.warning("publish not confirmed (%s), retrying in %.2fs",
                            _describe(last), wait)
            # Bounded by retry_for: close() finishes what it was handed.
            time.sleep(wait)
        pending = [job for job in jobs if not job.settled]
        if self._spool is not None and isinstance(refused, amqp.exceptions.AccessRefused):
            # 403: a permission or a password, usually fixed within minutes
            # (a credential rotation, `evrouter permissions --apply` run
            # late). Kept, as a spooled event refused the same way is,
            # rather than lost; the spool's drain sends it once allowed.
            LOG.error("broker refused %d event(s) (%s): spooled until it "
                      "takes them; check the network user's permissions and "
                      "password", len(pending), refused)
            self._spool_jobs(pending)
            self._schedule_drain(failed=True)
            return
        self._fail(pending, PublishRefused(f"broker refused: {refused}"))

    def _give_up(self, jobs, exc):
        s = self.settings
        pending = [job for job in jobs if not job.settled]
        if self._spool is None:
            self._fail(pending, BrokerUnavailable(
                f"not confirmed by {self._where()} within "
                f"{s.retry_for:.1f}s: {_describe(exc)}"))
            return
        LOG.warning("not confirmed within %.1fs (%s): spooling %d event(s)",
                    s.retry_for, _describe(exc), len(pending))
        self._spool_jobs(pending)
        self._schedule_drain(failed=True)

    def _fail(self, jobs, exc):
        for job in jobs:
            self.stats["failed"] += 1
            LOG.error("event %s %s for %s not published: %s", job.message_id,
                      job.event.name, job.event.server_uuid, exc)
            job.future.set_exception(exc)

    def _spool_jobs(self, jobs):
        if not jobs:
            return
        try:
            self._spool.append([(j.routing_key, j.body, j.traceparent)
                                for j in jobs])
        except (SpoolFull, OSError) as exc:
            self._fail(jobs, exc)
            return
        for job in jobs:
            self.stats["spooled"] += 1
            LOG.warning("event %s %s %s for %s spooled (%d waiting in %s)",
                        job.message_id, job.event.name, job.event.status,
                        job.event.server_uuid, len(self._spool),
                        self._spool.path)
            self._record(job, "spooled")
            job.future.set_result(Receipt(job.message_id, spooled=True))

    def _drain_once(self):
        records = self._spool.peek(self.settings.max_batch)
        # What this release could never send, whoever wrote it (another
        # release, a hand, a disk): set aside before anything is sent, so it
        # cannot close the channel (a topic permission's 403, a size the
        # broker refuses) for the records beside it, or raise while encoded.
        unsendable = [(r, why) for r in records
                      for why in [_unsendable(r)] if why is not None]
        if unsendable:
            if self._spool.set_aside([r for r, _ in unsendable],
                                     f"(the first: {unsendable[0][1]})"):
                self.stats["set_aside"] += len(unsendable)
            # else they stay in the file (the ERROR line says so), unsent
            aside = {id(r) for r, _ in unsendable}
            records = [r for r in records if id(r) not in aside]
        jobs = [_Job(r.routing_key, r.body, _message_id(r.body), record=r,
                     traceparent=r.traceparent) for r in records]
        try:
            self._send(jobs)
        except self._retryable() + _REFUSED as exc:
            if isinstance(exc, _Unconfirmed):
                self._single_out(jobs, exc)
            self._schedule_drain(failed=True)
            if not isinstance(exc, _BackingOff):
                LOG.warning("spool: %d event(s) still waiting (%s); next try "
                            "in %.1fs", len(self._spool), _describe(exc),
                            self._drain_at - time.monotonic())
            return
        self._schedule_drain(failed=False)
        if not len(self._spool):
            LOG.info("spool %s drained", self._spool.path)
            with self._drained:
                self._drained.notify_all()

    def _single_out(self, jobs, exc):
        """Records the broker returned as unroutable while it routed others
        of the same batch: the key is the trouble (a binding gone for that
        event alone, a release's event this broker does not route), not the
        broker. Its clock starts then; after SET_ASIDE_AFTER seconds of
        being singled out so, it is set aside (spool.set_aside), so that it
        cannot hold the spool, and every event after it, for ever. A nack
        blames no record (a queue at its length limit, a quorum queue
        without a leader: the queue's state, and a partial batch is what a
        queue with room for one gives), nor does a batch refused whole."""
        now = time.monotonic()
        since = self._refused_since
        for job in jobs:
            if job.settled or job.outcome != publishing.RETURNED:
                since.pop(job.record.body, None)
        if not any(job.settled for job in jobs):
            return
        returned = [j.record for j in jobs if j.outcome == publishing.RETURNED]
        for r in returned:
            since.setdefault(r.body, now)
        stale = [r for r in returned if now - since[r.body] >= SET_ASIDE_AFTER]
        if stale and self._spool.set_aside(
                stale, f"(returned as unroutable for {SET_ASIDE_AFTER:.0f}s "
                       f"while the broker routed the events beside it: {exc})"):
            for r in stale:
                del since[r.body]
                self.stats["set_aside"] += 1
                LOG.error("event %s set aside: the broker kept returning it "
                          "as unroutable", _message_id(r.body))

    def _schedule_drain(self, failed):
        now = time.monotonic()
        if failed:
            # Not before the reconnect is due: a drain that finds the
            # backoff still running would only try again at once.
            self._drain_at = max(now + self._redrain.failed("not drained"),
                                 self._reconnect_at)
        else:
            self._redrain = Backoff(_REDRAIN)
            self._drain_at = now

    # --- the connection -----------------------------------------------------
    def _retryable(self):
        conn = self._conn
        return (conn.connection_errors + conn.channel_errors
                + (OSError, kombu.exceptions.OperationalError,
                   publishing.PublishError, _Unconfirmed, _BackingOff))

    def _open_session(self):
        if self._session is None:
            wait = self._reconnect_at - time.monotonic()
            if wait > 0:
                raise _BackingOff(wait, self._last_cause)
            conn = self._conn
            try:
                # Each failover host once, without kombu's 2 s pause between
                # attempts: the retry policy is ours (retry_for, spool).
                conn.ensure_connection(
                    max_retries=max(len(conn.alt), 1) - 1, interval_start=0,
                    interval_step=0, interval_max=0)
                ch = conn.channel()
            except BaseException:
                conn.collect()
                raise
            outcomes = {}
            publisher = publishing.ConfirmedPublisher(
                ch, outcomes.__setitem__,
                user_id=bus_connection.user_of(conn))
            self._session = (conn, publisher, outcomes)
            self._up_since = time.monotonic()
            LOG.info("network publisher connected to %s as %s",
                     bus_connection.display(conn), bus_connection.user_of(conn) or "-")
        return self._session

    def _drop_session(self):
        if self._session is not None:
            self._session = None
            self._conn.collect()

    def _lost(self, cause):
        """The session (or the attempt to open one) failed: drop it, and
        connect again only after the backoff."""
        if isinstance(cause, _BackingOff):
            return                  # nothing was tried
        up_since = self._up_since if self._session is not None else None
        self._drop_session()
        self._up_since = None
        self._last_cause = cause
        self._reconnect_at = time.monotonic() + self.backoff.retry_in(
            "network publisher", cause, up_since, self._conn)

    def _where(self):
        return bus_connection.display(self._conn)

    def _send(self, jobs):
        """Publish the unsettled jobs on one channel and wait for confirms.

        Confirmed jobs are settled at once (even when the batch then fails);
        raises if any is left, for the caller to retry just those (same
        message ids, so a duplicate is one the waiter drops).
        """
        jobs = [job for job in jobs if not job.settled]
        if not jobs:
            return
        outcomes = {}
        try:
            conn, publisher, outcomes = self._open_session()
            exchange = self.settings.topology.ingress_exchange_name
            sent_at = time.time()
            for job in jobs:
                job.sent_at = sent_at
                publisher.publish(exchange, job.routing_key, job.body, job,
                                  message_id=job.message_id,
                                  headers={tracecontext.HEADER: job.traceparent}
                                  if job.traceparent else None)
            publisher.pump()
            deadline = time.monotonic() + self.settings.confirm_timeout
            while any(job not in outcomes for job in jobs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise publishing.ConfirmTimeout(
                        f"no confirm within {self.settings.confirm_timeout:.1f}s")
                try:
                    conn.drain_events(timeout=min(remaining, _TICK))
                except socket.timeout:
                    pass
        except BaseException as exc:
            self._lost(exc)
            self._settle(jobs, outcomes)
            raise
        refused = self._settle(jobs, outcomes)
        if refused:
            why = ("returned as unroutable (no queue bound)"
                   if refused[0] == publishing.RETURNED else "nacked")
            raise _Unconfirmed(
                f"{len(refused)} message(s) to "
                f"{self.settings.topology.ingress_exchange_name} {why}")

    def _settle(self, jobs, outcomes):
        """Settle the confirmed jobs; the other outcomes seen, if any."""
        confirmed_records, others = [], []
        for job in jobs:
            outcome = job.outcome = outcomes.pop(job, None)
            if outcome != publishing.ACK:
                if outcome is not None:
                    others.append(outcome)
                continue
            job.settled = True
            if job.record is not None:
                confirmed_records.append(job.record)
                self.stats["drained"] += 1
                self.journal.record(journal_.PUBLISHED, job.message_id, None,
                                    None, None, None, None,
                                    "sent from the spool", at=job.sent_at)
                LOG.info("event %s sent from the spool", job.message_id)
            else:
                self.stats["sent"] += 1
                e = job.event
                LOG.info("event %s %s %s for %s tag %s host %s published",
                         job.message_id, e.name, e.status, e.server_uuid,
                         e.tag, e.host or "-")
                self._record(job, "confirmed")
                job.future.set_result(Receipt(job.message_id, spooled=False))
        if confirmed_records:
            self._spool.done(confirmed_records)
        return others

    def _record(self, job, how):
        e = job.event
        self.journal.record(
            journal_.PUBLISHED, job.message_id,
            job.traceparent and job.traceparent[3:35], e.server_uuid, e.tag,
            e.name, e.status, f"{how}; host hint {e.host or '-'}",
            at=job.sent_at,
            span_id=job.traceparent and job.traceparent[36:52])

    def _keepalive(self):
        session = self._session
        if session is None or bus_connection.is_memory(session[0]):
            return
        conn = session[0]
        try:
            try:
                conn.drain_events(timeout=0.01)
            except socket.timeout:
                pass
            conn.heartbeat_check()
        except self._retryable() as exc:
            self._lost(exc)


def _message_id(body):
    # Spooled bodies were valid when spooled; a later release may judge them
    # otherwise, and that must not stop the owner thread. The router decides
    # what the body is worth; here only the id, as AMQP can carry it.
    try:
        message_id = json.loads(body).get("id")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(message_id, str) or not message_id:
        return None
    try:
        if len(message_id.encode("utf-8")) <= 255:  # an AMQP short string
            return message_id
    except UnicodeEncodeError:
        pass
    return None


_INSTANCE_KEYS = frozenset(topology.instance_routing_key(name)
                           for name in contract.EVENT_NAMES)


def _unsendable(record):
    """Why this release will never send a spooled record, or None. The key
    is one this release publishes (another one closed the channel for the
    whole batch on a topic permission's 403, for ever); the body within
    what the router takes (a larger one is refused by size, here or there);
    a traceparent that is not the W3C form was dropped when read."""
    if record.routing_key not in _INSTANCE_KEYS:
        return f"a routing key this release never publishes: {record.routing_key[:80]!r}"
    if len(record.body) > contract.DEFAULT_MAX_BODY_BYTES:
        return f"a body of {len(record.body)} bytes, over the router's limit"
    return None


def _describe(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
