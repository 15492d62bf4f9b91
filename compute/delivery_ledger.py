"""How often each message came back unsettled, across a consumer's sessions. Pure.

A message that kills or fails its session is redelivered; counted here, it
is set aside as poison after a bounded number of deliveries, on any queue
type (a classic queue counts nothing; a quorum queue's x-delivery-count is
taken too, and also covers restarts of the whole process).
"""

import collections

from router.bus import inbound


class DeliveryLedger:
    """Unsettled deliveries of each message, across one consumer's sessions.

    Only this host reads its queue, so its consumer can count for itself
    what a classic queue does not; a quorum queue's x-delivery-count also
    covers restarts of the whole process. A message leaves the ledger when
    it is settled; beyond `size` entries the oldest go first.
    """

    def __init__(self, size=10_000):
        self._counts = collections.OrderedDict()
        self._size = size

    @staticmethod
    def key(message, props):
        return (inbound.safe_shortstr(props.get("message_id")),
                hash(inbound.raw_body(message.body)))

    def delivered(self, key, redelivered, broker_count=0):
        """Deliveries of this message before this one that were not settled."""
        if not redelivered:
            return 0
        seen = self._counts.pop(key, 0) + 1
        self._counts[key] = seen
        if len(self._counts) > self._size:
            self._counts.popitem(last=False)
        return max(seen, broker_count)

    def settled(self, key):
        self._counts.pop(key, None)

    def __len__(self):
        return len(self._counts)
