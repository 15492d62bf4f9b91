"""Every wait of a compute service, in the journal; the stuck ones said.

The waiter registry (compute/events.py) tells its observer when a wait
starts and ends, and when an event it held goes unused; this observer
turns each into a journal record (router/journal.py) and, once a wait has
been pending ``stuck_after`` seconds, records it as stuck (once) and logs a
WARNING. ``evrouter stuck`` (router/stuck_cmd.py) reads these records back
and explains each stuck wait from the other hops of its port and instance.

A wait here is one prepared event (instance, event name, tag): Nova and
the library's ``wait_for_instance_event`` alike prepare through the
registry. Each gets a wait id, the message id of its records.

started(), ended() and unused() run under the registry's lock, on whatever
thread prepared or delivered: they only touch dicts and append to the
journal's deque (which never blocks). check() runs on the host consumer's
thread, when the oldest open wait comes due (no polling).
"""

import collections
import itertools
import logging
import os

from compute import waiting
from router import journal as journal_

LOG = logging.getLogger(__name__)

DEFAULT_STUCK_AFTER = 30.0

_ENDED = {waiting.CLEARED: "cleared (the instance was deleted or moved)",
          waiting.CANCELLED: "cancelled (the service is stopping)"}


class _Wait:
    __slots__ = ("wid", "started", "deadline")

    def __init__(self, wid, started, deadline):
        self.wid = wid
        self.started = started
        self.deadline = deadline


class WaitWatch:
    """The registry's observer (``registry.observe(watch)``)."""

    lock = None             # set by registry.observe: the registry's lock

    def __init__(self, journal, host, stuck_after=DEFAULT_STUCK_AFTER, *,
                 wake=None):
        self.journal = journal
        # wake(): the host consumer's loop sleeps until the next thing due;
        # a first open wait is a new thing due (a self-pipe: never blocks)
        self.wake = wake
        self.host = host
        self.stuck_after = stuck_after
        self.clock = None   # set by registry.observe: the registry's clock
        self.stats = collections.Counter()
        # prepared -> _Wait, oldest first; a stuck one moves to _stuck
        self._open = collections.OrderedDict()
        self._stuck = {}
        self._ids = itertools.count(1)
        self._prefix = f"w-{os.urandom(4).hex()}-"

    @property
    def stuck(self):
        """How many waits are stuck now."""
        return len(self._stuck)

    def due_in(self):
        """Seconds until the oldest open wait becomes stuck (None: none
        open), counted on the registry's clock, which may not be the
        caller's (a test's injected clock)."""
        due = self.next_due
        return None if due is None else max(0.0, due - self.clock())

    @property
    def next_due(self):
        """When (registry clock) the oldest open wait becomes stuck."""
        if self.lock is None:
            return None
        with self.lock:
            for w in self._open.values():
                return w.started + self.stuck_after
        return None

    # --- under the registry's lock ----------------------------------------------
    def started(self, prepared, deadline=None):
        try:
            self._started(prepared, deadline)
        except Exception:       # never into prepare(): counted, logged once
            self._failed("started")

    def ended(self, prepared, why=None, now=None):
        try:
            self._ended(prepared, why, now)
        except Exception:       # never into deliver()
            self._failed("ended")

    def unused(self, key, held, why):
        try:
            self._unused(key, held, why)
        except Exception:
            self._failed("unused")

    def _failed(self, what):
        self.stats["errors"] += 1
        if self.stats["errors"] == 1:
            LOG.exception("wait watch on host %s: %s failed (said once; the "
                          "waits themselves are not affected)", self.host,
                          what)

    def _started(self, prepared, deadline):
        w = _Wait(f"{self._prefix}{next(self._ids)}", prepared.prepared_at,
                  deadline)
        first = not self._open
        self._open[prepared] = w
        if first and self.wake is not None:
            self.wake()
        self.stats["started"] += 1
        self._record(journal_.WAIT_STARTED, w, prepared, None,
                     "" if deadline is None else
                     f"deadline {deadline:g}s after the work")

    def _ended(self, prepared, why, now):
        w = self._open.pop(prepared, None)
        was_stuck = w is None and prepared in self._stuck
        if was_stuck:
            w = self._stuck.pop(prepared)
        if w is None:
            return
        self.stats["ended"] += 1
        event, how = prepared.event, prepared.how
        status = event.status if event is not None else None
        if how == waiting.RECEIVED:
            said = (f"woken by {prepared.message_id} after "
                    f"{prepared.received_at - w.started:.1f}s ({status})")
        elif how == waiting.EARLY:
            said = (f"satisfied at once by {prepared.message_id}, which had "
                    f"come early ({status})")
        elif how in _ENDED:
            said = _ENDED[how]
        else:
            took = "" if now is None else f" after {now - w.started:.1f}s"
            said = f"{why or 'ended without its event'}{took}"
            status = None
        if was_stuck:
            self.stats["stuck_ended"] += 1
            said = f"was stuck; {said}"
        self._record(journal_.WAIT_ENDED, w, prepared, status, said)

    def _unused(self, key, held, why):
        self.stats["unused"] += 1
        event = held.event
        self.journal.record(journal_.UNUSED, held.message_id, None, key[0],
                            key[2], key[1], event.status,
                            f"{why} (host {self.host})")

    # --- the host consumer's thread ---------------------------------------------
    def check(self):
        """Record the waits that became stuck; returns how many did. Never
        raises: the host consumer's loop calls it."""
        try:
            return self._check()
        except Exception:
            self._failed("check")
            return 0

    def _check(self):
        if self.lock is None or not self._open:
            return 0
        newly = []
        with self.lock:
            limit = self.clock() - self.stuck_after
            while self._open:
                prepared, w = next(iter(self._open.items()))
                if w.started > limit:
                    break
                del self._open[prepared]
                self._stuck[prepared] = w
                newly.append((prepared, w))
                self._record(journal_.WAIT_STUCK, w, prepared, None,
                             f"pending {limit + self.stuck_after - w.started:.1f}s"
                             + ("" if w.deadline is None else
                                f" (deadline {w.deadline:g}s after the work)"))
            self.stats["stuck"] += len(newly)
        for prepared, w in newly:
            instance, name, tag = prepared.key
            LOG.warning("wait %s on host %s: %s (tag %s) for instance %s "
                        "still missing after %gs; `evrouter stuck` says "
                        "why", w.wid, self.host, name, tag, instance,
                        self.stuck_after)
        return len(newly)

    def _record(self, hop, w, prepared, status, detail):
        instance, name, tag = prepared.key
        self.journal.record(hop, w.wid, None, instance, tag, name, status,
                            f"{detail} (host {self.host})" if detail
                            else f"host {self.host}")
