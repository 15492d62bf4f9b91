"""Acknowledging ingress deliveries in order, coalesced. Pure.

Deliveries on a channel have increasing tags. A delivery is settled once
every copy it caused was confirmed (ok) or one failed (requeue). ``flush``
turns the settled prefix into as few frames as possible: one multiple-ack
for a run of successes, a reject for each failure. A settled delivery behind
an unsettled one waits; the wait is one broker confirm, not a retry.
"""

import collections

_ACK, _REQUEUE, _DROP = "ack", "requeue", "drop"


class AckWindow:
    def __init__(self, multiple=True):
        self._order = collections.deque()
        self._settled = {}
        self._multiple = multiple

    def __len__(self):
        return len(self._order)

    def holds(self, tag):
        """True until `tag`'s acknowledgement or reject has been flushed."""
        return tag in self._settled or tag in self._order

    def open(self, tag):
        self._order.append(tag)

    def settle(self, tag, ok, requeue=True):
        """ok: acknowledge; otherwise reject, requeued or not."""
        self._settled[tag] = _ACK if ok else (_REQUEUE if requeue else _DROP)

    def flush(self):
        """Frames to send now: ("ack", tag, multiple) or ("reject", tag, requeue)."""
        frames = []
        order, settled = self._order, self._settled
        last_ok = None
        while order and order[0] in settled:
            tag = order.popleft()
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
        return frames


def send(channel, frames):
    """Put flush()'s frames on the wire."""
    for frame in frames:
        if frame[0] == "ack":
            channel.basic_ack(frame[1], multiple=frame[2])
        else:
            channel.basic_reject(frame[1], requeue=frame[2])
