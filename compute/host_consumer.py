"""The compute host's end of the bus: its own queue in, the waiter registry out.

One thread owns one connection, as in the router: broker callbacks only
append to lists, and the loop alone decodes, delivers, dead-letters and
acknowledges (compute/host_session.py, one session per connection). A
message is acknowledged only after the registry recorded it (delivered,
held or recognised as a duplicate) or after the broker confirmed its
dead-letter copy. Whatever is unacknowledged when the connection drops
comes back from the durable queue; the registry's message-id memory makes
that harmless.
"""

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from compute import wait_watch
from compute.delivery_ledger import DeliveryLedger
from compute.host_session import HEADER_HOST
from compute.host_session import HostSession as _Session
from compute.host_session import Lost as _Lost
from router import journal as journal_
from router.bus import connection as bus_connection
from router.bus import contract, supervision
from router.bus.backoff import Backoff, Ready, Schedule
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

__all__ = ["HEADER_HOST", "HostConsumer", "HostConsumerSettings"]


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
    reconnect: Schedule = Schedule()
    # Seconds one dead-letter copy is sent again while the broker refuses
    # it (nack, return, its channel closed) before it is dropped (ERROR,
    # dropped:<reason>) and its original acknowledged; as the router's
    # refused_patience. Bounds how long a bad message holds its slot.
    dead_letter_patience: float = 20.0
    # The broker's max_message_size (RabbitMQ 4's default; 3.x allows
    # 128 MiB): a larger dead-letter copy is sent truncated.
    max_message_bytes: int = 16 * 1024 * 1024
    # While no delivery arrives, every this many seconds the session asks
    # the broker whether its queue is there with a consumer (one passive
    # declare): RabbitMQ 3.10 does not always cancel the consumers of a
    # deleted quorum queue, and one left waiting on the gone queue would
    # never consume the queue declared in its place (router/bus/consuming.py).
    # 30 s, not the router's 5: every idle compute host asks, so 2,000 hosts
    # make 67 passive declares a second, and the case is rare (an operator
    # deleting a host queue, one deletion in ten on the test cluster).
    consume_check: float = 30.0
    # The journal of hops (router/journal.py): each event taken from the
    # queue and the waiter's outcome. None: no journal.
    journal: Optional[journal_.JournalSettings] = None
    # A wait pending this long is recorded stuck and logged (WARNING), with
    # waits=registry (compute/wait_watch.py). Nova's vif_plugging_timeout
    # is 300 s; a port is usually up in well under 10.
    stuck_after: float = wait_watch.DEFAULT_STUCK_AFTER


class HostConsumer:
    """Feeds ``deliver(event, message_id)`` (InstanceEvents.deliver) from
    this host's queue. Run ``run()`` on a thread of its own."""

    def __init__(self, settings, deliver, *, on_failure=None, waits=None):
        # A host that cannot have a queue says so now, not in every session.
        settings.topology.check_host(settings.host)
        self.settings = settings
        # deliver(event, message_id): the envelope's created_at (the
        # sender's clock) is deliberately not passed on (issue 19, item 6).
        self.deliver = deliver
        self.stats = collections.Counter()
        self.ready = Ready()                # set while consuming
        # The current session's kombu Connection, for diagnostics and fault
        # tests; None between sessions.
        self.connection = None
        # on_failure(exc): told each time the consumer failed unexpectedly
        # and is about to be restarted (the embedding service's hook).
        self.on_failure = on_failure
        self.last_failure = None            # (monotonic time, repr)
        self._stop = threading.Event()
        # Ends the session's wait for the broker when stop() is called.
        self.waker = bus_connection.Waker()
        # Unsettled deliveries of each message; survives sessions.
        self.ledger = DeliveryLedger()
        # After a session that ended badly, the next one takes one message
        # at a time until it has settled a prefetch's worth (or emptied the
        # queue): if one of them keeps killing the consumer, it is alone in
        # flight when it does, and the others are not counted with it.
        self._cautious = False
        self.journal = journal_.open_journal(settings.journal,
                                             f"host:{settings.host}")
        # waits: the registry whose waits this host records and watches
        # (its starts, ends and stuck ones); None: not watched.
        self.waits = None
        if waits is not None:
            self.waits = wait_watch.WaitWatch(self.journal, settings.host,
                                              settings.stuck_after,
                                              wake=self.waker.wake)
            waits.observe(self.waits)

    def stop(self):
        """Finish what is in hand and return from run(). Signal-safe."""
        self._stop.set()
        self.waker.wake()

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
        retrying = self.backoff.status() if self.backoff else ""
        if self.last_failure is not None:
            why = f"restarting after: {self.last_failure[1]}"
        elif self.last_connect_error is not None:
            why = f"cannot connect to the broker: {self.last_connect_error}"
        else:
            why = "not connected to the broker"
        return False, f"{why}; {retrying}" if retrying else why

    last_connect_error = None
    backoff = None          # the current consume loop's reconnect Backoff
    # The trace id of the event deliver() is handling (consumer's thread,
    # during the call only; None otherwise or when it came without one)
    current_trace = None

    def _connect_failed(self, exc):
        self.last_connect_error = str(exc)[:300]

    def run(self):
        """Consume until stop(): supervised, so a bug restarts the consumer
        (logged at ERROR, reported to on_failure) instead of ending it."""
        self.journal.start()
        try:
            supervision.run_supervised(self._consume, self._stop,
                                       f"host consumer {self.settings.host}",
                                       on_failure=self._failed)
        finally:
            self.journal.stop()

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
        self.backoff = Backoff(s.reconnect)
        while not self._stop.is_set():
            try:
                _Session(self, conn.clone(), errors).run()
                break                       # stopped
            except _Lost as lost:
                self._cautious = True
                self.stats["reconnects"] += 1
                cause, up_since = lost.__cause__, lost.up_since
            except errors as exc:
                self._connect_failed(exc)
                cause, up_since = exc, None
            if not self.backoff.wait(self._stop, what, cause, up_since, conn):
                break
        LOG.info("%s stopped", what)
