"""The router service: ingress queue in, per-host exchanges out.

The service keeps a session running: router/session.py routes over one
connection, its publish side in router/delivery.py, its ingress lanes and
poison count in router/lanes.py, what it knows of hosts in
router/observer.py. An ingress message is acknowledged only after the
broker confirmed every copy it caused (host copies, a retry or a dead
letter). A session ends only when its connection is lost: messages it
held unacknowledged go back to the queue and are routed again
(at-least-once; waiters deduplicate).
"""

import collections
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Optional

from router import delivery, lanes, routing, stuck_watch
from router import journal as journal_
from router.bus import connection as bus_connection
from router.bus import contract, supervision
from router.bus.backoff import Backoff, Ready, Schedule
from router.bus.topology import Topology
from router.metrics import LatencyHistogram
from router.placement import DEFAULT_MAX_PER_HOST, PlacementTable
from router.session import Session

LOG = logging.getLogger(__name__)

# Re-exported: tests and tools read these headers off dead letters.
HEADER_REDELIVERIES = lanes.HEADER_REDELIVERIES
HEADER_HOST = delivery.HEADER_HOST


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
    # Longest wait for the agents' snapshots after (re)connecting
    # (router/readiness.py): meanwhile REST says "try again", not 404.
    resync_window: float = 5.0
    # Seconds a copy the broker refuses (or whose channel it closes) is
    # published again before it is dead-lettered instead (a dead letter:
    # dropped). Bounds how long a message holds its prefetch slot.
    refused_patience: float = 20.0
    # Seconds a refused host copy is published again in hand before it is
    # parked in a retry queue for its host (router/delivery.py): how long
    # one host's trouble may hold a prefetch slot every host shares.
    refused_hold: float = 2.0
    # Seconds an event with no host hint and no placement yet waits in hand
    # for its instance's placement (a lifecycle event or snapshot routes it
    # at once) before it is parked in the retry tiers; 0: parked at once.
    # At most prefetch // 4 such events are held (router/session.py).
    unplaced_hold: float = 2.0
    # Instances one compute host may claim in the placement table.
    max_instances_per_host: int = DEFAULT_MAX_PER_HOST
    reconnect: Schedule = Schedule()
    # An idle lane asks every this many seconds whether its queue is there
    # with its consumer (router/bus/consuming.py: RabbitMQ 3.10 does not
    # always cancel the consumers of a deleted quorum queue).
    consume_check: float = 5.0
    # The journal of hops (router/journal.py); None: no journal.
    journal: Optional[journal_.JournalSettings] = None
    # With the journal: follow it for the hosts' stuck waits (metrics).
    watch_stuck: bool = True


class RouterService:
    def __init__(self, settings, *, placement=None):
        self.settings = settings
        self.placement = placement if placement is not None else PlacementTable(
            max_per_host=settings.max_instances_per_host)
        self.stats = collections.Counter()
        # (message id, body hash) -> deliveries counted for a message routed
        # past a refusing probation queue (router/session.py _bypass): kept
        # across sessions, as the probation copy's header would have been.
        self.bypassed = collections.OrderedDict()
        self.latency = LatencyHistogram()
        self._stop = threading.Event()
        self.ready = Ready()     # set while consuming
        # Whether the broker's dead-lettering of the parking queues was
        # checked (topology.parking_refusal): once per process.
        self.parking_checked = False
        self.stuck = None       # the StuckWatch, while running
        self.journal = journal_.open_journal(settings.journal,
                                             f"router:{settings.name}")

    def stop(self):
        """Finish in-flight messages and return from run(). Signal-safe."""
        self._stop.set()

    def health(self):
        if self.ready.is_set():
            return True, "consuming"
        retrying = self.backoff.status() if self.backoff else ""
        if self.last_failure is not None:
            why = f"restarting after: {self.last_failure}"
        elif self.last_connect_error is not None:
            why = f"cannot connect to the broker: {self.last_connect_error}"
        else:
            why = "not connected to the broker"
        return False, f"{why}; {retrying}" if retrying else why

    last_failure = None
    last_connect_error = None
    backoff = None          # the current session loop's reconnect Backoff

    def _connect_failed(self, exc):
        self.last_connect_error = str(exc)[:300]

    def run(self):
        """Route until stop(). Supervised: a bug outside the per-message
        containment restarts the session (logged at ERROR, with backoff);
        whatever it held unacknowledged is redelivered, and counted."""
        self.journal.start()
        if self.settings.journal is not None and \
                self.settings.journal.stream and self.settings.watch_stuck:
            self.stuck = stuck_watch.StuckWatch(self.settings.journal,
                                                self.settings.policy).start()
        try:
            supervision.run_supervised(self._serve, self._stop,
                                       f"router {self.settings.name}",
                                       on_failure=self._failed)
        finally:
            if self.stuck is not None:
                self.stuck.stop()
            self.journal.stop()
        LOG.info("router %s stopped", self.settings.name)

    def _failed(self, exc):
        self.stats["failures"] += 1
        self.last_failure = f"{type(exc).__name__}: {exc}"[:300]

    def _serve(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url,
                                         heartbeat=s.heartbeat, ssl_opts=s.ssl)
        errors = conn.connection_errors + conn.channel_errors
        self.backoff = Backoff(s.reconnect)
        while not self._stop.is_set():
            try:
                Session(self, conn.clone()).run()
                return                      # stopped
            except errors as exc:
                LOG.debug("router %s: the session ended", s.name, exc_info=True)
                cause, up_since = exc, self.ready.since
                if up_since is None:
                    self._connect_failed(exc)
                else:
                    self.stats["reconnects"] += 1
            finally:
                self.ready.clear()
                self.placement.disconnected()
            if not self.backoff.wait(self._stop, f"router {s.name}", cause,
                                     up_since, conn):
                return

