"""The instance events a compute host waits for: one registry per process.

Pure: no kombu, no eventlet. A compute service prepares the events it
expects, does the work that causes them, then waits (``wait_for_instance_event``);
the host consumer (compute/host_consumer.py) delivers what the bus brings.
Events are keyed (instance uuid, name, tag), as in OpenStack.

Decisions an operator should know:
- An event nobody prepared is held for ``hold_seconds`` and satisfies a
  later prepare at once (OpenStack drops it, and the waiter times out).
  Held events are bounded in number and bytes; the oldest are dropped with
  a warning and ``stats["early_dropped"]``. A newer event for the same key
  replaces a held one: the latest word on a port is the one that counts.
- A message id seen before is a redelivery and is ignored: it can neither
  wake a second waiter nor be held to satisfy a later prepare. The memory
  of seen ids is bounded (``max_seen_ids``, oldest forgotten first).
- A prepared event is resolved by the first event for its key, whatever its
  status. Only ``completed`` satisfies it; ``failed`` and ``in-progress``
  go to the waiter's error callback, as OpenStack treats them.
- ``clear(instance)`` and ``cancel_all()`` resolve pending events as failed,
  so their waiters stop at once instead of running into their deadline.
- Whether an event is out of date is decided by what this host observed,
  never by the envelope's ``created_at`` (the sender's wall clock):
  compute/staleness.py. A held event is valid for ``hold_seconds`` after it
  ARRIVED, on this host's monotonic clock, however old it was then. When a
  wait for a key ends without its event (timeout, error, exit early,
  clear), the first event for that key that arrives while nobody waits is
  that wait's late event: neither held nor handed on (``STALE``,
  ``stats["stale"]``). An event whose source revision is not above one
  already heard for its port (and family: a plug older than a heard unplug)
  is ``STALE`` too, whoever waits. The case no receiver can decide alone: a
  late event of a timed-out wait that arrives after the retry prepared, with
  nothing newer heard, wakes the retry (so would OpenStack's own).
"""

import collections
import logging
import sys
import threading
import time

from compute import staleness, waiting
from router.bus import contract

LOG = logging.getLogger(__name__)

# What deliver() did with an event; the host consumer acks on all but CLOSED.
DELIVERED = "delivered"
HELD = "held"
DUPLICATE = "duplicate"
STALE = "stale"
CLOSED = "closed"

DEFAULT_HOLD_SECONDS = 300.0
# Longer than a host queue's message TTL (600 s) plus a hold: an event can
# reach the host no later than that after it was created.
DEFAULT_ENDED_MEMORY_SECONDS = 900.0
# Rough cost of a held event beyond its strings: the held record, the
# InstanceEvent, the key tuple and the dict entry.
_HELD_OVERHEAD = 400


class _Held:
    __slots__ = ("event", "message_id", "held_at", "size")

    def __init__(self, event, message_id, held_at):
        self.event = event
        self.message_id = message_id
        self.held_at = held_at      # when it arrived, on this host's clock
        self.size = _HELD_OVERHEAD + sum(
            sys.getsizeof(s) for s in (event.server_uuid, event.tag,
                                       message_id) if s is not None)


def _key(instance_uuid, name, tag):
    # The contract accepts upper-case hex; OpenStack writes lower case.
    if not instance_uuid.islower():
        instance_uuid = instance_uuid.lower()
    return (instance_uuid, name, tag)


class InstanceEvents:
    """Prepared events, held early events and seen message ids. Thread-safe."""

    def __init__(self, *, hold_seconds=DEFAULT_HOLD_SECONDS, max_held=10_000,
                 max_held_bytes=8 << 20, max_seen_ids=20_000,
                 ended_memory_seconds=DEFAULT_ENDED_MEMORY_SECONDS,
                 max_ended=20_000, clock=time.monotonic):
        self.hold_seconds = hold_seconds
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self.max_seen_ids = max_seen_ids
        self.clock = clock
        self.stats = collections.Counter()
        self._lock = threading.Lock()
        self._pending = {}      # key -> PreparedEvent, or a list if shared
        self._held = collections.OrderedDict()     # key -> _Held, oldest first
        self._held_bytes = 0
        self._seen = set()
        self._seen_order = collections.deque()
        self._late = staleness.LateEvents(memory_seconds=ended_memory_seconds,
                                          max_owed=max_ended,
                                          max_heard=max_ended)
        self._closed = False
        # Told of every wait's start and end and of held events that go
        # unused, under the lock (compute/wait_watch.py): it must not block.
        self.observer = _NO_OBSERVER

    def observe(self, observer):
        """Report waits to `observer` (started, ended, unused; called with
        the registry's lock held, which ``observer.lock`` is set to; its
        ``clock`` is set to the registry's). It must never raise: it runs
        inside prepare() and deliver()."""
        observer.lock, observer.clock = self._lock, self.clock
        self.observer = observer

    # --- the waiting side -----------------------------------------------------
    def new_wake(self):
        return waiting.Wake(self._lock)

    def prepare(self, instance_uuid, name, tag=None, *, wake=None,
                deadline=None):
        """Expect an event; a held early one resolves it at once.

        `deadline` (seconds after the caller's work, if it knows) is only
        said to the observer. Raises waiting.RegistryClosed after
        cancel_all().
        """
        key = _key(instance_uuid, name, tag)
        wake = wake or self.new_wake()
        with self._lock:
            if self._closed:
                raise waiting.RegistryClosed(
                    f"no new events: shutting down ({name} for {instance_uuid})")
            now = self.clock()
            self._expire(now)
            prepared = waiting.PreparedEvent(key, now, wake)
            held = self._held.pop(key, None)
            if held is None:
                present = self._pending.get(key)
                if present is None:
                    self._pending[key] = prepared
                elif type(present) is list:
                    present.append(prepared)
                else:
                    self._pending[key] = [present, prepared]
                self.observer.started(prepared, deadline)
                return prepared
            self._held_bytes -= held.size
            prepared._resolve(held.event, held.message_id, now, waiting.EARLY)
            self.stats["early_used"] += 1
            self.observer.started(prepared, deadline)
            self.observer.ended(prepared)
        LOG.info("event %s %s for instance %s (tag %s) had arrived %.1fs "
                 "before it was prepared: satisfied at once", held.message_id,
                 name, instance_uuid, tag, now - held.held_at)
        return prepared

    def discard(self, prepared, why="ended without it"):
        """Forget a prepared event nobody waits for any more.

        If it was still pending, its wait ended without it (`why`, for the
        observer): remembered, so that a late event of that wait cannot
        satisfy a later one.
        """
        with self._lock:
            present = self._pending.get(prepared.key)
            if present is prepared:
                del self._pending[prepared.key]
            elif type(present) is list and prepared in present:
                present.remove(prepared)
                if not present:
                    del self._pending[prepared.key]
            else:
                return
            now = self.clock()
            self._end(prepared.key, now)
            self.observer.ended(prepared, why, now)

    def wait_for_instance_event(self, instance, events, timeout=300.0,
                                error_callback=None, *, deadline=None):
        """Context manager: prepare `events`, run the body, wait for them.

        `instance` is an object with ``uuid`` or a uuid string; `events`
        are (name, tag) pairs or bare names. One deadline (seconds, counted
        after the body) covers all. A status other than completed calls
        ``error_callback((name, tag), instance)``: False stops waiting,
        anything else keeps waiting for the rest, raising propagates;
        without a callback waiting.InstanceEventFailed is raised. When the
        deadline passes, waiting.InstanceEventTimeout lists every event's
        state. The body gets the waiting.EventWait (see ``exit_early``).
        """
        if deadline is not None:
            timeout = deadline
        return _Waiting(waiting.EventWait(self, instance, events, timeout,
                                          error_callback))

    # --- the bus side ---------------------------------------------------------
    def deliver(self, event, message_id):
        """Hand an InstanceEvent from the bus to whoever prepared it.

        Returns DELIVERED, HELD, DUPLICATE, STALE or CLOSED (after
        cancel_all: the caller should leave the message to the next process).
        """
        key = _key(event.server_uuid, event.name, event.tag)
        dropped = ()
        with self._lock:
            if self._closed:
                return CLOSED
            if message_id in self._seen:
                self.stats["duplicates"] += 1
                outcome = DUPLICATE
            else:
                self._remember(message_id)
                now = self.clock()
                self._expire(now)
                outcome, dropped = self._judge(key, event, message_id, now)
        LOG.info("event %s %s for instance %s (tag %s, %s): %s", message_id,
                 event.name, event.server_uuid, event.tag, event.status,
                 _SAID[outcome])
        for held in dropped:
            LOG.warning("event %s %s for instance %s (tag %s) dropped unused: "
                        "too many early events held", held.message_id,
                        held.event.name, held.event.server_uuid, held.event.tag)
        return outcome

    def first_sight(self, message_id):
        """True, and remembered, if `message_id` was not seen before.

        For events a service handles itself rather than waits for (Nova's
        network-changed, for one): dedup without holding.
        """
        with self._lock:
            if message_id in self._seen:
                self.stats["duplicates"] += 1
                return False
            self._remember(message_id)
            return True

    def clear(self, instance_uuid):
        """Cancel every pending and held event of an instance (delete, migrate)."""
        prefix = _key(instance_uuid, "", None)[0]
        with self._lock:
            now = self.clock()
            keys = [k for k in self._pending if k[0] == prefix]
            for key in keys:
                self._fail(key, self._pending.pop(key), now, waiting.CLEARED)
                self._end(key, now)
            for key in [k for k in self._held if k[0] == prefix]:
                held = self._held.pop(key)
                self._held_bytes -= held.size
                self.observer.unused(key, held, "cleared with its instance")
            self.stats["cleared"] += len(keys)
        if keys:
            LOG.info("instance %s: %d pending event(s) cleared", instance_uuid,
                     len(keys))
        return len(keys)

    def cancel_all(self):
        """Shutdown: every pending waiter ends failed; new prepares refused."""
        with self._lock:
            self._closed = True
            now = self.clock()
            pending, self._pending = self._pending, {}
            for key, present in pending.items():
                self._fail(key, present, now, waiting.CANCELLED)
            self._held.clear()
            self._held_bytes = 0
            self.stats["cancelled"] += len(pending)
        LOG.info("instance events cancelled: %d pending event(s) failed",
                 len(pending))
        return len(pending)

    def expire(self):
        """Drop held events past their time (also done on every call)."""
        with self._lock:
            self._expire(self.clock())

    @property
    def pending(self):
        with self._lock:
            return sum(len(p) if type(p) is list else 1
                       for p in self._pending.values())

    @property
    def held(self):
        with self._lock:
            return len(self._held)

    # --- under the lock -------------------------------------------------------
    def _judge(self, key, event, message_id, now):
        """What a new message does (see the module doc): outcome, dropped."""
        late = self._late
        if late.superseded(event, key, now):
            self.stats["stale"] += 1
            return STALE, ()
        self._drop_superseded_held(key, event.revision)
        present = self._pending.pop(key, None)
        if present is not None:
            waiters = present if type(present) is list else (present,)
            late.paid(key, waiters)
            for prepared in waiters:
                prepared._resolve(event, message_id, now, waiting.RECEIVED)
                self.observer.ended(prepared)
            self.stats["delivered"] += 1
            return DELIVERED, ()
        if late.paid(key):
            self.stats["stale"] += 1
            return STALE, ()
        return HELD, self._hold(key, event, message_id, now)

    def _drop_superseded_held(self, key, revision):
        """Held events of the same port family older than `revision`."""
        if revision is None or not self._held:
            return
        for name in staleness.family(key[1]):
            other = (key[0], name, key[2])
            held = self._held.get(other)
            if held is not None and self._late.older_than_heard(
                    other, held.event.revision):
                del self._held[other]
                self._held_bytes -= held.size
                self.stats["early_superseded"] += 1
                self.observer.unused(other, held, "superseded by a newer "
                                     "revision")

    def _fail(self, key, present, now, how):
        failed = contract.InstanceEvent(key[1], key[0], key[2], contract.FAILED)
        for prepared in present if type(present) is list else (present,):
            prepared._resolve(failed, None, now, how)
            self.observer.ended(prepared)

    def _remember(self, message_id):
        self._seen.add(message_id)
        self._seen_order.append(message_id)
        if len(self._seen_order) > self.max_seen_ids:
            self._seen.discard(self._seen_order.popleft())

    def _end(self, key, now):
        """A wait for `key` ended without its event."""
        others = self._pending.get(key, ())
        self._late.ended(key, now, others if type(others) is list else (others,))

    def _hold(self, key, event, message_id, now):
        old = self._held.pop(key, None)
        if old is not None:
            self._held_bytes -= old.size
            self.stats["early_replaced"] += 1
            self.observer.unused(key, old, "replaced by a newer event")
        held = self._held[key] = _Held(event, message_id, now)
        self._held_bytes += held.size
        self.stats["early_held"] += 1
        dropped = []
        while self._held and (len(self._held) > self.max_held or
                              self._held_bytes > self.max_held_bytes):
            oldest_key, oldest = self._held.popitem(last=False)
            self._held_bytes -= oldest.size
            dropped.append(oldest)
            self.observer.unused(oldest_key, oldest, "dropped: too many held")
        self.stats["early_dropped"] += len(dropped)
        return dropped

    def _expire(self, now):
        # Oldest first: a replaced key moves to the end with its new time.
        self._late.forget(now)
        limit = now - self.hold_seconds
        held = self._held
        while held:
            key, oldest = next(iter(held.items()))
            if oldest.held_at > limit:
                break
            del held[key]
            self._held_bytes -= oldest.size
            self.stats["early_expired"] += 1
            self.observer.unused(key, oldest, f"expired: held "
                                 f"{now - oldest.held_at:.0f}s, nobody "
                                 f"prepared it")


class _NoObserver:
    lock = None

    def started(self, prepared, deadline=None):
        pass

    def ended(self, prepared, why=None, now=None):
        pass

    def unused(self, key, held, why):
        pass


_NO_OBSERVER = _NoObserver()

_SAID = {DELIVERED: "woke its waiter",
         HELD: "nobody waits yet, held",
         DUPLICATE: "duplicate message id, ignored",
         STALE: "out of date (late for a wait that ended, or older than a "
                "revision heard): stale, ignored",
         CLOSED: "not taken: shutting down"}


class _Waiting:
    """The context manager of wait_for_instance_event.

    Every event is prepared before the body runs, so an event caused by the
    body cannot slip past; whatever way the block ends, events still pending
    are taken out of the registry.
    """

    __slots__ = ("_wait",)

    def __init__(self, wait):
        self._wait = wait

    def __enter__(self):
        try:
            self._wait.prepare()
        except BaseException:
            self._wait.abandon()
            raise
        return self._wait

    def __exit__(self, exc_type, exc, tb):
        why = ("the wait stopped early (its error callback)" if exc_type is None
               else f"the work raised {exc_type.__name__}")
        try:
            if exc_type is None:
                self._wait.wait()
        finally:
            self._wait.abandon(why)
        return False
