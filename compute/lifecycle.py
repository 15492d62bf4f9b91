"""libvirt lifecycle events as the bus's lifecycle transitions. Pure.

No libvirt import and no I/O: the numbers below are libvirt's own constant
values (a unit test holds them equal to libvirt-python's), so the mapping,
the STOPPED debounce and the per-host numbering can be tested with plain
integers and an injected clock.

A hard reboot shows up as STOPPED then STARTED. OpenStack holds STOPPED
back for a while (15 s by default) and cancels it when any later event for
the same domain arrives; ``LifecycleTranslator`` does the same, so events
of one domain still leave in the order libvirt emitted them: a STOPPED is
either published before anything that follows it, or never.
"""

import itertools
import time

from router.bus.contract import HostAnnounce, LifecycleEvent

# virDomainEventType
EVENT_DEFINED = 0
EVENT_UNDEFINED = 1
EVENT_STARTED = 2
EVENT_SUSPENDED = 3
EVENT_RESUMED = 4
EVENT_STOPPED = 5
EVENT_SHUTDOWN = 6
EVENT_PMSUSPENDED = 7
EVENT_CRASHED = 8

# virDomainEventSuspendedDetailType
SUSPENDED_MIGRATED = 1
SUSPENDED_POSTCOPY = 7

# virDomainJobType
JOB_NONE = 0
JOB_COMPLETED = 3

# virDomainState
STATE_NOSTATE = 0
STATE_RUNNING = 1
STATE_BLOCKED = 2
STATE_PAUSED = 3
STATE_SHUTDOWN = 4
STATE_SHUTOFF = 5
STATE_CRASHED = 6
STATE_PMSUSPENDED = 7

STOPPED = "STOPPED"

_TRANSITION_OF_EVENT = {
    EVENT_DEFINED: "DEFINED",
    EVENT_UNDEFINED: "UNDEFINED",
    EVENT_STARTED: "STARTED",
    EVENT_SUSPENDED: "PAUSED",
    EVENT_RESUMED: "RESUMED",
    EVENT_STOPPED: STOPPED,
    EVENT_SHUTDOWN: "SHUTDOWN",
    EVENT_PMSUSPENDED: "PMSUSPENDED",
    EVENT_CRASHED: "CRASHED",
}

# A snapshot entry says what state a domain is in, as the transition that
# leads there and that transition's event type; its detail is always 0.
_SNAPSHOT_OF_STATE = {
    STATE_RUNNING: ("STARTED", EVENT_STARTED),
    STATE_BLOCKED: ("STARTED", EVENT_STARTED),
    STATE_PAUSED: ("PAUSED", EVENT_SUSPENDED),
    STATE_SHUTDOWN: ("SHUTDOWN", EVENT_SHUTDOWN),
    STATE_SHUTOFF: (STOPPED, EVENT_STOPPED),
    STATE_CRASHED: ("CRASHED", EVENT_CRASHED),
    STATE_PMSUSPENDED: ("PMSUSPENDED", EVENT_PMSUSPENDED),
}


def _never():
    return False


def transition_for(event, detail, migration_completed=_never):
    """The transition for a libvirt lifecycle event, or None if unknown.

    libvirt also sends SUSPENDED/MIGRATED when a live migration fails, so
    that one is MIGRATION_COMPLETED only if ``migration_completed()`` (which
    asks the domain's migration job, as OpenStack does) says so, and PAUSED
    otherwise. It is called for that case only.
    """
    if event == EVENT_SUSPENDED:
        if detail == SUSPENDED_POSTCOPY:
            return "POSTCOPY_STARTED"
        if detail == SUSPENDED_MIGRATED and migration_completed():
            return "MIGRATION_COMPLETED"
    return _TRANSITION_OF_EVENT.get(event)


def job_completed(job_type, active):
    """Whether a migration job finished, from its type and the domain's.

    ``active`` is whether the domain still runs here, None if it is gone.
    libvirt reports no job once a job has ended, either way: then a domain
    that stopped running (or vanished) migrated, one still running did not.
    """
    if job_type == JOB_COMPLETED:
        return True
    if job_type == JOB_NONE:
        return not active
    return False


def snapshot_entry(state):
    """(transition, event type) for a domain state, or None (no state)."""
    return _SNAPSHOT_OF_STATE.get(state)


class StoppedDebounce:
    """Holds STOPPED back; any later event of the same domain cancels it.

    Values in, values out: ``offer`` an event, get what may leave now;
    ``due`` returns the STOPPEDs whose delay has passed. Time comes from the
    injected ``clock``.
    """

    def __init__(self, delay, clock=time.monotonic):
        self.delay = delay
        self._clock = clock
        self._held = {}         # domain -> (due, item), oldest first

    def __len__(self):
        return len(self._held)

    def holds(self, domain):
        return domain in self._held

    def offer(self, domain, transition, item):
        """Returns (items to publish now, the item this one cancelled)."""
        cancelled = self._held.pop(domain, (None, None))[1]
        if transition == STOPPED and self.delay > 0:
            self._held[domain] = (self._clock() + self.delay, item)
            return [], cancelled
        return [item], cancelled

    def due(self):
        now = self._clock()
        ready = [d for d, (due, _) in self._held.items() if due <= now]
        return [self._held.pop(d)[1] for d in ready]

    def seconds_until_due(self):
        if not self._held:
            return None
        return max(0.0, min(due for due, _ in self._held.values())
                   - self._clock())

    def release_all(self):
        """Every held STOPPED, oldest first (on stop: the domains did stop)."""
        items = [item for _, item in self._held.values()]
        self._held.clear()
        return items


class LifecycleTranslator:
    """libvirt values in, numbered contract payloads out, for one host.

    Every payload gets the next number of the host's sequence when it is
    released, so sequence numbers follow publish order. Sequences start at 1
    when the agent starts; a consumer that sees a gap or a restart resyncs
    from the snapshot that follows every HostAnnounce.
    """

    def __init__(self, host, stopped_delay, clock=time.monotonic):
        self.host = host
        self.debounce = StoppedDebounce(stopped_delay, clock)
        self._seq = itertools.count(1)
        # domain -> position of its latest event in the hand-over order
        self._latest = {}

    def event(self, domain, event, detail, *, position=0,
              migration_completed=_never):
        """One libvirt lifecycle event.

        Returns (payloads to publish now, transition or None if the event is
        unknown and dropped, the held STOPPED it cancelled or None).
        """
        transition = transition_for(event, detail, migration_completed)
        if transition is None:
            return [], None, None
        self._latest[domain] = max(position, self._latest.get(domain, 0))
        item = (domain, transition, event, detail)
        ready, cancelled = self.debounce.offer(domain, transition, item)
        return [self._number(i) for i in ready], transition, cancelled

    def due(self):
        return [self._number(i) for i in self.debounce.due()]

    def release_all(self):
        return [self._number(i) for i in self.debounce.release_all()]

    def seconds_until_due(self):
        return self.debounce.seconds_until_due()

    def snapshot(self, states, *, listed_after=0):
        """HostAnnounce, then an entry per domain: ``states`` is (uuid, state).

        A domain whose STOPPED is held is left to the debounce (the snapshot
        would defeat it mid-reboot). So is one with an event handed over
        after position ``listed_after`` (when listing began): that event is
        published before this snapshot and may be newer than its state.
        Returns (payloads, number of domains left out).
        """
        payloads = [HostAnnounce(self.host, next(self._seq))]
        withheld = 0
        for domain, state in states:
            entry = snapshot_entry(state)
            if entry is None:
                continue
            if (self.debounce.holds(domain)
                    or self._latest.get(domain, 0) > listed_after):
                withheld += 1
                continue
            transition, event = entry
            payloads.append(LifecycleEvent(domain, self.host, transition,
                                           event, 0, next(self._seq),
                                           snapshot=True))
        # Older positions cannot matter to a later snapshot.
        self._latest = {d: p for d, p in self._latest.items()
                        if p > listed_after}
        return payloads, withheld

    def _number(self, item):
        domain, transition, event, detail = item
        return LifecycleEvent(domain, self.host, transition, event, detail,
                              next(self._seq))
