"""libvirt lifecycle events as the bus's lifecycle transitions. Pure.

No libvirt import and no I/O: the numbers below are libvirt's own constant
values (a unit test holds them equal to libvirt-python's), so the mapping,
the reboot debounce, the per-host numbering and the snapshot pacing can be
tested with plain integers and an injected clock.

A reboot shows up as (SHUTDOWN,) STOPPED then STARTED, and OpenStack's
hard reboot as STOPPED, UNDEFINED, DEFINED, STARTED. OpenStack holds
STOPPED back for a while (15 s by default) and cancels it when the domain
runs again; ``StoppedDebounce`` does the same for SHUTDOWN, STOPPED and
UNDEFINED, so a reboot shows on the fanout as neither a shutdown nor the
instance leaving its host. Events of one domain still leave in the order
libvirt emitted them: a held event is either published before anything
that follows it, or never.
"""

import itertools
import time

from router.bus.contract import HostSnapshot, LifecycleEvent

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


# What may be the first half of a reboot: held back, published only if the
# domain does not come back within the delay. A destroy shows SHUTDOWN (on
# QEMU) and STOPPED; OpenStack's hard reboot also undefines and defines the
# domain before it creates it again.
HELD = frozenset({"SHUTDOWN", STOPPED, "UNDEFINED"})
# The domain runs again: these cancel everything held. OpenStack's
# delayed STOPPED is cancelled by the events its driver emits, which are
# exactly these (it maps DEFINED, UNDEFINED, SHUTDOWN and CRASHED to none).
RUNNING_AGAIN = frozenset({"STARTED", "RESUMED", "PAUSED", "PMSUSPENDED",
                           "POSTCOPY_STARTED", "MIGRATION_COMPLETED"})
# The domain exists again: cancels a held UNDEFINED, not a STOPPED (a
# domain defined anew is still shut off).
DEFINED = "DEFINED"


class StoppedDebounce:
    """Holds back what may be half of a reboot, per domain.

    A SHUTDOWN, STOPPED or UNDEFINED starts a hold: from then on every
    event of that domain queues behind it (so a domain's events leave in
    libvirt's order) until either
    - an event that means it runs again (RUNNING_AGAIN) arrives: every held
      SHUTDOWN, STOPPED and UNDEFINED is cancelled, the rest leaves; or
    - ``delay`` seconds passed since the latest held SHUTDOWN, STOPPED or
      UNDEFINED: everything held leaves, in order.
    A DEFINED cancels a held UNDEFINED only. A held transition that comes
    again replaces the earlier one (and restarts the delay), as OpenStack's
    second STOPPED does.

    Values in, values out: ``offer`` an event, get what may leave now and
    what it cancelled; ``due`` returns what waited long enough. Time comes
    from the injected ``clock``.
    """

    def __init__(self, delay, clock=time.monotonic):
        self.delay = delay
        self._clock = clock
        self._held = {}         # domain -> [due, [(transition, item), ...]]

    def __len__(self):
        """How many domains have something held."""
        return len(self._held)

    def holds(self, domain):
        return domain in self._held

    def offer(self, domain, transition, item):
        """Returns (items to publish now, items this one cancelled)."""
        held = self._held.get(domain)
        if held is None:
            if transition in HELD and self.delay > 0:
                self._held[domain] = [self._clock() + self.delay,
                                      [(transition, item)]]
                return [], []
            return [item], []
        tail = held[1]
        if transition in RUNNING_AGAIN:
            del self._held[domain]
            return ([i for t, i in tail if t not in HELD] + [item],
                    [i for t, i in tail if t in HELD])
        if transition in HELD:
            cancels = {transition}
            held[0] = self._clock() + self.delay
        elif transition == DEFINED:
            cancels = {"UNDEFINED"}
        else:
            cancels = set()
        cancelled = [i for t, i in tail if t in cancels]
        tail[:] = [(t, i) for t, i in tail if t not in cancels]
        tail.append((transition, item))
        if not any(t in HELD for t, _ in tail):
            del self._held[domain]      # nothing left to wait for
            return [i for _, i in tail], cancelled
        return [], cancelled

    def due(self):
        now = self._clock()
        ready = sorted((due, d) for d, (due, _) in self._held.items()
                       if due <= now)
        return [i for _, d in ready for _, i in self._held.pop(d)[1]]

    def seconds_until_due(self):
        if not self._held:
            return None
        return max(0.0, min(due for due, _ in self._held.values())
                   - self._clock())

    def release_all(self):
        """Everything held, oldest first (on stop: the domains did stop)."""
        ready = sorted((due, d) for d, (due, _) in self._held.items())
        items = [i for _, d in ready for _, i in self._held[d][1]]
        self._held.clear()
        return items


class LifecycleTranslator:
    """libvirt values in, numbered contract payloads out, for one host.

    Every payload gets the next number of the host's sequence when it is
    released, so sequence numbers follow publish order. Sequences start at 1
    when the agent starts; a consumer that sees a gap or a restart resyncs
    from the host snapshot that follows.
    """

    def __init__(self, host, stopped_delay, clock=time.monotonic):
        self.host = host
        self.debounce = StoppedDebounce(stopped_delay, clock)
        self._seq = itertools.count(1)
        # domain -> position of its latest event in the hand-over order
        self._latest = {}
        # domain -> the last transition published for it (gone once its
        # UNDEFINED left): what a snapshot says of a domain mid-reboot
        self._published = {}

    def event(self, domain, event, detail, *, position=0,
              migration_completed=_never):
        """One libvirt lifecycle event.

        Returns (payloads to publish now, transition or None if the event is
        unknown and dropped, the held payloads it cancelled as
        [(domain, transition, event, detail)]).
        """
        transition = transition_for(event, detail, migration_completed)
        if transition is None:
            return [], None, []
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
        """One HostSnapshot of every domain: ``states`` is [(uuid, state)].

        It replaces what consumers knew of this host, so it names every
        domain that is here. A domain with something held (mid-reboot) or
        with an event handed over after position ``listed_after`` (when
        listing began; published before this snapshot, and maybe newer than
        the listed state) is reported as what was last published for it:
        its held events or its newer event tell the rest (the listed state
        if nothing was published for it yet). A domain held but
        no longer listed (undefined mid-reboot) is still reported as it was
        last published, until its UNDEFINED leaves.
        Returns (the HostSnapshot, number of domains reported from their
        last publication instead of their listed state).
        """
        instances = {}
        deferred = 0
        for domain, state in states:
            entry = snapshot_entry(state)
            if entry is None:
                continue
            if (self.debounce.holds(domain)
                    or self._latest.get(domain, 0) > listed_after):
                deferred += 1
                # Never published (the agent started mid-reboot): the
                # listed state is all there is, and leaving the domain out
                # would take it off this host.
                instances[domain] = self._published.get(domain, entry[0])
                continue
            instances[domain] = entry[0]
        for domain, last in self._published.items():
            if domain not in instances and self.debounce.holds(domain):
                instances[domain] = last
        # Older positions cannot matter to a later snapshot.
        self._latest = {d: p for d, p in self._latest.items()
                        if p > listed_after}
        return (HostSnapshot(self.host, next(self._seq),
                             tuple(sorted(instances.items()))), deferred)

    def _number(self, item):
        domain, transition, event, detail = item
        if transition == "UNDEFINED":
            self._published.pop(domain, None)
        else:
            self._published[domain] = transition
        return LifecycleEvent(domain, self.host, transition, event, detail,
                              next(self._seq))


class SnapshotPacer:
    """At most one snapshot per ``interval`` seconds; requests coalesce.

    Every router that (re)connects asks every agent for a snapshot; ten
    routers starting together must cost one snapshot, not ten. A request
    inside the interval is not dropped: it is answered once the interval
    has passed, by one snapshot for all requests that came in meanwhile.
    """

    def __init__(self, interval=1.0, clock=time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last = None           # when the last snapshot was taken
        self._pending = False

    def request(self):
        """A snapshot is wanted: True if it should be taken now."""
        now = self._clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            self._pending = False
            return True
        self._pending = True
        return False

    def taken(self):
        """A snapshot was taken for another reason (start, reconnect)."""
        self._last = self._clock()
        self._pending = False

    def due(self):
        """True once, when a coalesced request's interval has passed."""
        if self._pending and self._clock() - self._last >= self.interval:
            self._last = self._clock()
            self._pending = False
            return True
        return False

    def seconds_until_due(self):
        if not self._pending:
            return None
        return max(0.0, self._last + self.interval - self._clock())
