"""Acknowledging ingress deliveries in order, coalesced. Pure.

Deliveries on a channel have increasing tags. A delivery is settled once
every copy it caused was confirmed (ok) or one failed (requeue). ``flush``
turns the settled prefix into as few frames as possible: one multiple-ack
for a run of successes, a reject for each failure. A settled delivery behind
an unsettled one waits; the wait is one broker confirm, not a retry.
"""

import collections


class AckWindow:
    def __init__(self, multiple=True):
        self._order = collections.deque()
        self._settled = {}
        self._multiple = multiple

    def __len__(self):
        return len(self._order)

    def open(self, tag):
        self._order.append(tag)

    def settle(self, tag, ok):
        self._settled[tag] = ok

    def flush(self):
        """Frames to send now: ("ack", tag, multiple) or ("reject", tag)."""
        frames = []
        order, settled = self._order, self._settled
        last_ok = None
        while order and order[0] in settled:
            tag = order.popleft()
            if settled.pop(tag):
                if self._multiple:
                    last_ok = tag
                else:
                    frames.append(("ack", tag, False))
            else:
                if last_ok is not None:
                    frames.append(("ack", last_ok, True))
                    last_ok = None
                frames.append(("reject", tag))
        if last_ok is not None:
            frames.append(("ack", last_ok, True))
        return frames
