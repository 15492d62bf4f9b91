"""The network side's publisher: instance events onto the ingress exchange.

One thread owns the broker connection (and the spool); ``publish`` hands an
event over through a queue and blocks until that thread says what became of
it. So request threads of a network service can call it concurrently, events
leave in the order they were handed over, and confirms are pipelined: a burst
from many threads costs one confirm round trip, not one each.

``publish`` returns normally only when the event is safe: the broker
confirmed it (persistent, mandatory, routed to a queue), or, with a spool,
it is fsync'd to the spool file. Broker trouble is retried with tenacity for
``retry_for`` seconds; after that the event goes to the spool, and so does
every later event while the spool is not empty, so order holds. The owner
thread drains the spool, oldest first, whenever the broker answers again
(and at start-up, for what a previous process left behind). Without a spool,
or with a full one, ``publish`` raises: the caller learns the event was not
accepted.

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
import tenacity

from network.spool import Spool, SpoolFull
from router.bus import connection as bus_connection
from router.bus import contract, publishing, topology
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

# Broker answers that retrying will not change: configuration, not weather.
_REFUSED = (amqp.exceptions.AccessRefused, amqp.exceptions.PreconditionFailed,
            amqp.exceptions.NotAllowed)
_TICK = 1.0


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


@dataclass(frozen=True)
class Receipt:
    """What became of a published event."""
    message_id: str
    spooled: bool


class _Job:
    __slots__ = ("routing_key", "body", "message_id", "future", "record",
                 "event", "settled")

    def __init__(self, routing_key, body, message_id, future=None,
                 record=None, event=None):
        self.routing_key = routing_key
        self.body = body
        self.message_id = message_id
        self.future = future
        self.record = record       # the spool record, when sent from the spool
        self.event = event
        self.settled = False


class _Unconfirmed(Exception):
    """The broker nacked or returned some messages of a batch."""


class InstanceEventPublisher:
    def __init__(self, settings):
        self.settings = settings
        self.stats = {"sent": 0, "spooled": 0, "drained": 0, "failed": 0}
        self._jobs = queue.Queue()
        self._stopping = threading.Event()
        self._thread = None
        self._spool = None
        self._conn = None           # base connection (failover list)
        self._session = None        # (connection, publisher, outcomes)
        self._drain_at = 0.0
        self._drain_backoff = 0.0
        self._drained = threading.Condition()

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
        self._thread.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def publish(self, event, *, timeout=None, message_id=None):
        """Publish one InstanceEvent; a Receipt once it is safe.

        `message_id` names the envelope; give one derived from the source
        event so that publishing it again (a redelivered notification, a
        retried command) makes a duplicate the waiter drops. Default: a new
        id. Raises ContractError (a ValueError) for an event or id the
        contract refuses, SpoolFull, BrokerUnavailable (no spool) or
        PublishRefused.
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
                            env.id, future, event=event))
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
        try:
            for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception(
                        lambda e: isinstance(e, retryable)
                        and not isinstance(e, _REFUSED)),
                    stop=tenacity.stop_after_delay(s.retry_for),
                    wait=tenacity.wait_exponential(multiplier=0.05, max=0.5)
                    + tenacity.wait_random(0, 0.05),
                    before_sleep=self._log_retry, reraise=True):
                with attempt:
                    self._send(jobs)
        except _REFUSED as exc:
            pending = [job for job in jobs if not job.settled]
            self._fail(pending, PublishRefused(f"broker refused: {exc}"))
        except retryable as exc:
            pending = [job for job in jobs if not job.settled]
            if self._spool is None:
                self._fail(pending, BrokerUnavailable(
                    f"not confirmed by {self._where()} within "
                    f"{s.retry_for:.1f}s: {_describe(exc)}"))
            else:
                LOG.warning("not confirmed within %.1fs (%s): spooling %d "
                            "event(s)", s.retry_for, _describe(exc),
                            len(pending))
                self._spool_jobs(pending)
                self._drain_backoff = 0.0
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
            self._spool.append([(j.routing_key, j.body) for j in jobs])
        except (SpoolFull, OSError) as exc:
            self._fail(jobs, exc)
            return
        for job in jobs:
            self.stats["spooled"] += 1
            LOG.warning("event %s %s %s for %s spooled (%d waiting in %s)",
                        job.message_id, job.event.name, job.event.status,
                        job.event.server_uuid, len(self._spool),
                        self._spool.path)
            job.future.set_result(Receipt(job.message_id, spooled=True))

    def _drain_once(self):
        records = self._spool.peek(self.settings.max_batch)
        jobs = [_Job(r.routing_key, r.body, _message_id(r.body), record=r)
                for r in records]
        try:
            self._send(jobs)
        except self._retryable() + _REFUSED as exc:
            self._schedule_drain(failed=True)
            LOG.warning("spool: %d event(s) still waiting (%s); next try in "
                        "%.1fs", len(self._spool), _describe(exc),
                        self._drain_backoff)
            return
        self._schedule_drain(failed=False)
        if not len(self._spool):
            LOG.info("spool %s drained", self._spool.path)
            with self._drained:
                self._drained.notify_all()

    def _schedule_drain(self, failed):
        if failed:
            self._drain_backoff = min(max(self._drain_backoff * 2, 0.2), 5.0)
        else:
            self._drain_backoff = 0.0
        self._drain_at = time.monotonic() + self._drain_backoff

    # --- the connection -----------------------------------------------------
    def _retryable(self):
        conn = self._conn
        return (conn.connection_errors + conn.channel_errors
                + (OSError, kombu.exceptions.OperationalError,
                   publishing.PublishError, _Unconfirmed))

    def _open_session(self):
        if self._session is None:
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
            LOG.info("network publisher connected to %s as %s",
                     bus_connection.display(conn), bus_connection.user_of(conn) or "-")
        return self._session

    def _drop_session(self):
        if self._session is not None:
            self._session = None
            self._conn.collect()

    def _where(self):
        return bus_connection.display(self._conn)

    def _send(self, jobs):
        """Publish the unsettled jobs on one channel and wait for confirms.

        Confirmed jobs are settled at once (even when the batch then fails);
        raises if any is left, for the caller to retry just those (same
        message ids, so a duplicate is one the waiter drops).
        """
        jobs = [job for job in jobs if not job.settled]
        outcomes = {}
        try:
            conn, publisher, outcomes = self._open_session()
            exchange = self.settings.topology.ingress_exchange_name
            for job in jobs:
                publisher.publish(exchange, job.routing_key, job.body, job,
                                  message_id=job.message_id)
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
        except BaseException:
            self._drop_session()
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
            outcome = outcomes.pop(job, None)
            if outcome != publishing.ACK:
                if outcome is not None:
                    others.append(outcome)
                continue
            job.settled = True
            if job.record is not None:
                confirmed_records.append(job.record)
                self.stats["drained"] += 1
                LOG.info("event %s sent from the spool", job.message_id)
            else:
                self.stats["sent"] += 1
                e = job.event
                LOG.info("event %s %s %s for %s tag %s host %s published",
                         job.message_id, e.name, e.status, e.server_uuid,
                         e.tag, e.host or "-")
                job.future.set_result(Receipt(job.message_id, spooled=False))
        if confirmed_records:
            self._spool.done(confirmed_records)
        return others

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
            LOG.warning("network publisher lost the broker while idle: %s",
                        _describe(exc))
            self._drop_session()

    @staticmethod
    def _log_retry(state):
        LOG.warning("publish not confirmed (%s), retrying in %.2fs",
                    _describe(state.outcome.exception()),
                    state.next_action.sleep)


def _message_id(body):
    # Spooled bodies were valid when spooled; a later release may judge them
    # otherwise, and that must not stop the owner thread. The router decides.
    try:
        message_id = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return None
    return message_id if isinstance(message_id, str) else None


def _describe(exc):
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
