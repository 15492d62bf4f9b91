"""Whether an instance event is out of date, from what this host observed. Pure.

The registry (compute/events.py) asks this module before an event may wake a
waiter or be held. Everything here is the receiver's own observation: the
order in which prepares, ends of waits and arrivals happened, timed on the
receiving host's monotonic clock, and the revision the source stamped on an
event (``InstanceEvent.revision``: the network side's port revision number,
which only grows). The envelope's ``created_at`` is never read: it is the
sender's wall clock, and no comparison of it with ours survives a skewed or
stepped clock on either side (issue 19, item 6).

Two memories, both bounded in number and forgotten after ``memory_seconds``
(longer than a host queue's TTL plus a hold: no event can still be on its way
after that):

- **Owed events.** A wait that ended without its event (timeout, exit early,
  clear) may still have one on the way. The first event for that key that
  arrives while nobody waits for it is that late one: stale. An event that
  wakes a waiter prepared before the end pays the debt too (they shared it).
  One that wakes only waiters prepared after the end (a retry) cannot be told
  from the retry's own, so it wakes the retry and the debt stands.
- **Revisions heard.** Per (instance, tag, family) the highest revision seen.
  An event whose revision is not above it says something older than what was
  already heard: stale, whoever waits. The plug-state events of a port
  (plugged, unplugged, deleted) are one family: a plug older than an unplug
  already heard describes a plug since undone. Other names are each their own.
  Events without a revision (older senders) are judged by order alone.
"""

import collections

from router.bus.contract import VIF_DELETED, VIF_PLUGGED, VIF_UNPLUGGED

_PORT_STATE = (VIF_PLUGGED, VIF_UNPLUGGED, VIF_DELETED)


def family(name):
    """The names whose revisions are compared with `name`'s."""
    return _PORT_STATE if name in _PORT_STATE else (name,)


class LateEvents:
    """Owed events and revisions heard. Not thread-safe: the registry locks."""

    def __init__(self, *, memory_seconds, max_owed=20_000, max_heard=20_000):
        self.memory_seconds = memory_seconds
        self.max_owed = max_owed
        self.max_heard = max_heard
        # key -> (clock time the wait ended, waiters of the key pending then)
        self._owed = collections.OrderedDict()
        # (instance, tag, family's first name) -> (clock time heard, revision)
        self._heard = collections.OrderedDict()

    def __len__(self):
        return len(self._owed) + len(self._heard)

    def ended(self, key, now, others=()):
        """A wait for `key` ended without its event: it may still come.

        `others` are the waiters of `key` still pending: prepared before
        this end, so they wait for the same event.
        """
        self._owed.pop(key, None)
        self._owed[key] = (now, tuple(others))
        self.forget(now)

    def superseded(self, event, key, now):
        """True if `event` is older than a revision already heard.

        Otherwise its revision (if any) is remembered as the newest.
        """
        revision = event.revision
        if revision is None:
            return False
        fkey = (key[0], key[2], family(key[1])[0])
        heard = self._heard.get(fkey)
        if heard is not None and revision <= heard[1]:
            return True
        self._heard.pop(fkey, None)
        self._heard[fkey] = (now, revision)
        self.forget(now)
        return False

    def older_than_heard(self, key, revision):
        """Whether a held event of `key` with `revision` is now out of date."""
        if revision is None:
            return False
        heard = self._heard.get((key[0], key[2], family(key[1])[0]))
        return heard is not None and revision < heard[1]

    def paid(self, key, waiters=None):
        """An event for `key` arrived: True if it was the owed one (forgotten).

        With `waiters` (the prepared events it wakes), only if one of them was
        pending when the wait that owes it ended (arrival order, not time: a
        retry prepared in the same clock tick is still a retry).
        """
        owed = self._owed.get(key)
        if owed is None:
            return False
        if waiters is not None and not any(
                p is q for p in waiters for q in owed[1]):
            return False
        del self._owed[key]
        return True

    def forget(self, now):
        limit = now - self.memory_seconds
        for memory, bound in ((self._owed, self.max_owed),
                              (self._heard, self.max_heard)):
            while memory and (len(memory) > bound or _when(memory) <= limit):
                memory.popitem(last=False)


def _when(memory):
    return next(iter(memory.values()))[0]
