"""How a compute thread waits for the instance events it prepared. Pure.

``EventWait`` is one ``wait_for_instance_event``: the events it expects,
one shared deadline, the error policy, the report when time runs out. The
registry (compute/events.py) resolves its ``PreparedEvent``s and wakes it
through its ``Wake``.

Only ``threading`` primitives, looked up when used: once the embedding
service has run ``eventlet.monkey_patch()`` they are green, otherwise they
are native. This module never patches anything and never imports eventlet.
"""

import math
import numbers
import threading
import uuid

from router.bus import contract

# How a prepared event was resolved (PreparedEvent.how); None while pending.
RECEIVED = "received"      # arrived from the bus while prepared
EARLY = "early"            # arrived before the prepare and was held
CLEARED = "cleared"        # the instance's events were cleared (delete, migrate)
CANCELLED = "cancelled"    # the registry was cancelled (service shutdown)

# A wait longer than this is done in slices: some lock implementations
# refuse huge timeouts (threading.TIMEOUT_MAX), and a deadline may be inf.
_LONGEST_BLOCK = 3600.0


class EventWaitError(Exception):
    """Base of what waiting for instance events raises."""


class RegistryClosed(EventWaitError):
    """The registry was cancelled (shutdown): no new prepares."""


class InstanceEventFailed(EventWaitError):
    """An expected event ended other than completed, and nobody handled it."""

    def __init__(self, instance_uuid, name, tag, status, how):
        why = {CANCELLED: " (cancelled: the service is shutting down)",
               CLEARED: " (cancelled: the instance's events were cleared)",
               None: " (refused: the service is shutting down)"}.get(how, "")
        super().__init__(f"instance {instance_uuid}: event {_label(name, tag)} "
                         f"ended with status {status}{why}")
        self.instance_uuid = instance_uuid
        self.name = name
        self.tag = tag
        self.status = status


class InstanceEventTimeout(EventWaitError, TimeoutError):
    """The timeout passed; ``states`` is [(name, tag, state text)].

    Shaped like Nova's: ``kwargs`` carries ``event_names`` and ``timeout``
    and ``msg_fmt`` is Nova's, so code written against Nova's exception
    reads it the same (the core does not import Nova; the Nova adapter
    raises Nova's own).
    """

    msg_fmt = "Timeout waiting for %(event_names)s after %(timeout)s seconds"

    def __init__(self, instance_uuid, timeout, states):
        report = "; ".join(f"{_label(n, t)}: {s}" for n, t, s in states)
        super().__init__(f"timed out after {timeout:g}s waiting for "
                         f"{len(states)} event(s) of instance "
                         f"{instance_uuid}: {report}")
        self.instance_uuid = instance_uuid
        self.timeout = timeout
        self.states = states
        self.kwargs = {"event_names": [f"{n}-{t}" if t is not None else n
                                       for n, t, _ in states],
                       "timeout": timeout, "code": 500}

    @property
    def deadline(self):
        """The old name of ``timeout``."""
        return self.timeout


def _label(name, tag):
    return name if tag is None else f"{name} (tag {tag})"


class Wake:
    """Wakes the one thread waiting for a group of prepared events.

    A gate lock instead of a threading.Condition: a Condition costs about
    1 KiB, a lock a few dozen bytes (an eventlet one about 700), and there
    can be 10,000 pending waits in a process. The gate is made only when the
    waiter first blocks, so events pending while the body runs cost no lock.
    ``lock`` is the registry's lock; ``arrived``, ``_gate`` and ``_blocked``
    are only touched while holding it. The gate is locked except between an
    ``_arrive`` that opens it and the waiter passing it.
    """

    __slots__ = ("arrived", "_lock", "_gate", "_blocked")

    def __init__(self, lock):
        self.arrived = []
        self._lock = lock
        self._gate = None
        self._blocked = False

    def _arm(self):
        """Make the gate, locked. Hold the registry lock."""
        if self._gate is None:
            gate = threading.Lock()
            gate.acquire()
            self._gate = gate

    def _arrive(self, prepared):
        """Called by the registry, holding its lock."""
        self.arrived.append(prepared)
        if self._blocked:
            self._blocked = False
            self._gate.release()

    def wait(self, end, clock):
        """Take the arrivals, blocking until there is one or `end` passes."""
        lock = self._lock
        with lock:
            while not self.arrived:
                left = end - clock()
                if left <= 0:
                    return []
                self._arm()
                self._blocked = True
                lock.release()
                try:
                    passed = self._gate.acquire(timeout=min(left, _LONGEST_BLOCK))
                finally:
                    lock.acquire()
                if self._blocked:       # timed out and nobody opened the gate
                    self._blocked = False
                elif not passed:        # opened just after our timeout: re-lock
                    self._gate.acquire()
            arrived, self.arrived = self.arrived, []
            return arrived


class PreparedEvent:
    """One expected event. Small on purpose: there may be 10,000 pending."""

    __slots__ = ("key", "prepared_at", "received_at", "event", "message_id",
                 "how", "wake")

    def __init__(self, key, prepared_at, wake):
        self.key = key
        self.prepared_at = prepared_at
        self.received_at = None
        self.event = None
        self.message_id = None
        self.how = None
        self.wake = wake

    def _resolve(self, event, message_id, now, how):
        """Called by the registry, holding its lock."""
        self.event = event
        self.message_id = message_id
        self.received_at = now
        self.how = how
        self.wake._arrive(self)

    def state(self):
        """How this event stands, for a timeout report."""
        if self.how is None:
            return "still missing"
        status = self.event.status
        if self.how == EARLY:
            return f"received early ({status})"
        if self.how == RECEIVED:
            return (f"received after {self.received_at - self.prepared_at:.1f}s "
                    f"({status})")
        return f"{self.how} ({status})"


def expected_events(events):
    """(name, tag) pairs from pairs or bare names, in order, without repeats.

    Checked before anything is prepared (and before the caller's body runs):
    a name is a str, a tag a str or None; a bare string for `events` would
    be one wait per character, waiting for what never comes."""
    if isinstance(events, (str, bytes)):
        raise TypeError(f"events: a list of event names or (name, tag) "
                        f"pairs, not the string {events!r}")
    pairs = []
    for event in events:
        if isinstance(event, str):
            pair = (event, None)
        elif isinstance(event, (tuple, list)):
            pair = tuple(event)
        else:
            pair = None
        if pair is None or len(pair) != 2:
            raise ValueError(f"expected an event name or a (name, tag) pair, "
                             f"not {event!r}")
        if type(pair[0]) is not str or not (pair[1] is None or type(pair[1]) is str):
            raise TypeError(f"an event name is a str and its tag a str or None, "
                            f"not {pair!r}")
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def checked_timeout(timeout):
    """`timeout` as a float: a real number, not NaN (every comparison with
    NaN is false: a wait that never ends, or ends at once, by accident);
    inf waits for ever, as does an int too large for a float. Raised when
    the wait is made, before the caller's body runs."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout: seconds as a number, not {timeout!r}")
    try:
        timeout = float(timeout)
    except OverflowError:
        return math.inf
    if math.isnan(timeout):
        raise ValueError("timeout: seconds as a number, not NaN")
    return timeout


class EventWait:
    """One wait_for_instance_event, as handed to its body.

    The body may call ``exit_early`` to say some events are already
    satisfied (for instance ports found active), so nobody waits for them.
    """

    __slots__ = ("instance", "instance_uuid", "expected", "timeout",
                 "_registry", "_callback", "_wake", "_prepared", "_skipped",
                 "_stopped")

    def __init__(self, registry, instance, events, timeout, error_callback):
        self.instance = instance
        self.instance_uuid = getattr(instance, "uuid", instance)
        if isinstance(self.instance_uuid, uuid.UUID):
            self.instance_uuid = str(self.instance_uuid)
        self.expected = expected_events(events)
        self.timeout = checked_timeout(timeout)
        self._registry = registry
        self._callback = error_callback
        self._wake = registry.new_wake()
        # Parallel to `expected` (None: refused). Lists, not a dict and a
        # set: a wait holds a handful of events and 10,000 waits may pend.
        self._prepared = []
        self._skipped = ()
        self._stopped = False

    def prepare(self):
        """Register every expected event; judge the refused ones at once."""
        refused = []
        for name, tag in self.expected:
            try:
                prepared = self._registry.prepare(self.instance_uuid, name, tag,
                                                  wake=self._wake,
                                                  deadline=self.timeout)
            except RegistryClosed:
                prepared = None
                refused.append((name, tag))
            self._prepared.append(prepared)
        # As OpenStack does: a prepare refused at shutdown is a failed event,
        # judged before the body runs so a fatal policy stops the work.
        for name, tag in refused:
            failed = contract.InstanceEvent(name, self.instance_uuid, tag,
                                            contract.FAILED)
            if not self._judge(name, tag, failed, None):
                self._stopped = True

    def exit_early(self, *events):
        """Declare events (all if none given) satisfied: do not wait for them."""
        pairs = expected_events(events) if events else self.expected
        for pair in pairs:
            if pair not in self.expected:
                raise ValueError(f"{_label(*pair)} is not an expected event")
        self._skipped = {*self._skipped, *pairs}
        for pair in pairs:
            prepared = self._prepared[self.expected.index(pair)]
            if prepared is not None:
                self._registry.discard(prepared, "satisfied by the caller "
                                                 "(exit early)")

    def wait(self):
        """Wait for every expected event under one deadline, from now."""
        clock = self._registry.clock
        end = clock() + self.timeout
        todo = {pair for pair, prepared in zip(self.expected, self._prepared, strict=True)
                if prepared is not None and pair not in self._skipped}
        while todo and not self._stopped:
            arrived = self._wake.wait(end, clock)
            if not arrived:
                raise self._timeout()
            for prepared in arrived:
                pair = prepared.key[1:]
                if pair not in todo or pair in self._skipped:
                    continue
                todo.discard(pair)
                if not self._judge(*pair, prepared.event, prepared.how):
                    return

    def abandon(self, why="the wait ended without it"):
        """Take the events still pending out of the registry."""
        for prepared in self._prepared:
            if prepared is not None:
                self._registry.discard(prepared, why)

    def _judge(self, name, tag, event, how):
        """True to keep waiting for the others; False to stop; or raise."""
        if event.status == contract.COMPLETED:
            return True
        if self._callback is None:
            raise InstanceEventFailed(self.instance_uuid, name, tag,
                                      event.status, how)
        # OpenStack's convention: only an explicit False stops the wait.
        return self._callback((name, tag), self.instance) is not False

    def _timeout(self):
        # no more resolutions: the states below are final
        self.abandon(f"timed out after {self.timeout:g}s")
        states = []
        for pair, prepared in zip(self.expected, self._prepared, strict=True):
            if pair in self._skipped:
                state = "satisfied by the caller (exit early)"
            elif prepared is None:
                state = "refused (shutting down)"
            else:
                state = prepared.state()
            states.append((*pair, state))
        return InstanceEventTimeout(self.instance_uuid, self.timeout, states)

    @property
    def deadline(self):
        """The old name of ``timeout``."""
        return self.timeout
