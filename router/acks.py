"""Acknowledging ingress deliveries, coalesced. Pure (the clock is given).

Deliveries on a channel have increasing tags. A delivery is settled once
every copy it caused was confirmed (ok) or one failed (requeue). ``flush``
turns the settled prefix into as few frames as possible: one multiple-ack
for a run of successes, a reject for each failure.

A settled delivery behind an unsettled one waits, usually one broker
confirm. But a delivery may stay unsettled for seconds (a copy the broker
refuses, held in hand with backoff), and the broker counts every delivery
not yet acknowledged against the prefetch window all hosts share: behind
one held copy the whole window filled and the router took in nothing (the
review of 2026-12-04: one refusing host cut everyone's throughput from
2,451 to 168 events/s). So while the head was delivered more than
``stuck`` seconds ago, what is settled behind it is acknowledged one by
one, out of order; a later multiple-ack passes over those (the broker
acknowledges only what is still outstanding). A delivery settled behind a
head that old waits no longer than the next flush, whatever holds the head;
in the usual flow the head is younger than ``stuck`` and acks stay coalesced.
"""

import collections
import time

from router.bus import connection as bus_connection

STUCK = 0.1     # seconds a head may hold back deliveries settled behind it

_ACK, _REQUEUE, _DROP = "ack", "requeue", "drop"


class AckWindow:
    def __init__(self, multiple=True, stuck=STUCK, clock=time.monotonic):
        self._order = collections.deque()
        self._opened = collections.deque()      # when each of _order came
        self._settled = {}
        self._done = set()          # flushed out of order, still in _order
        self._multiple = multiple
        self._stuck = stuck
        self._clock = clock

    def __len__(self):
        return len(self._order) - len(self._done)

    def holds(self, tag):
        """True until `tag`'s acknowledgement or reject has been flushed."""
        return tag in self._settled or (tag in self._order
                                        and tag not in self._done)

    def open(self, tag):
        self._order.append(tag)
        self._opened.append(self._clock())

    def settle(self, tag, ok, requeue=True):
        """ok: acknowledge; otherwise reject, requeued or not."""
        self._settled[tag] = _ACK if ok else (_REQUEUE if requeue else _DROP)

    def flush(self):
        """Frames to send now: ("ack", tag, multiple) or ("reject", tag, requeue)."""
        frames = []
        order, settled, done = self._order, self._settled, self._done
        last_ok = None
        while order and (order[0] in settled or order[0] in done):
            tag = order.popleft()
            self._opened.popleft()
            if done and tag in done:
                done.discard(tag)       # acknowledged already: passed over
                continue
            verdict = settled.pop(tag)
            if verdict is _ACK:
                if self._multiple:
                    last_ok = tag
                else:
                    frames.append(("ack", tag, False))
            else:
                if last_ok is not None:
                    frames.append(("ack", last_ok, True))
                    last_ok = None
                frames.append(("reject", tag, verdict is _REQUEUE))
        if last_ok is not None:
            frames.append(("ack", last_ok, True))
        if settled and order and self._clock() - self._opened[0] >= self._stuck:
            self._behind(frames)        # held back by a head that old
        return frames

    def _behind(self, frames):
        for tag, verdict in self._settled.items():
            frames.append(("ack", tag, False) if verdict is _ACK
                          else ("reject", tag, verdict is _REQUEUE))
            self._done.add(tag)
        self._settled.clear()


def send(channel, frames):
    """Put flush()'s frames on the wire: sent when this returns, not held
    in a corked transport (the probation lane routes its message only once
    the acknowledgements of its originals have left: router/session.py)."""
    for frame in frames:
        if frame[0] == "ack":
            channel.basic_ack(frame[1], multiple=frame[2])
        else:
            channel.basic_reject(frame[1], requeue=frame[2])
    if frames:
        bus_connection.flush(channel)
