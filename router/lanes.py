"""The router's ingress lanes, and how a message that kills routers is found.

The main lane consumes the router queue with a wide prefetch. A message that
comes back redelivered (a router died, or lost its session, while holding
it) is not routed there again: it is copied to the probation queue with its
count (HEADER_REDELIVERIES), whatever it is and whoever sent it, before
anything else is done with it, and the original is acknowledged once the
copy is confirmed. The probation lane takes one message at a time
(prefetch 1), so a session that dies there died with one message in hand:
its count is its own. At ``redelivery_limit`` it is dead-lettered
``poison``; if even that keeps failing, it is dropped. The messages that
were merely in flight beside it are each counted once, routed alone, and
never dead-lettered for it.

Counting lives in the message, not in the router: it survives every router
restart, on classic queues (where the broker counts nothing) as on quorum
queues (whose x-delivery-count also counts the bystanders of the main lane,
so it is read on the probation lane only).
"""

from kombu import Consumer

from router.acks import AckWindow, send
from router.bus import consuming, inbound

HEADER_REDELIVERIES = "x-evrouter-redeliveries"
# A probation copy of a message that failed to decode carries the verdict:
# the copy's own properties (set by the router) would decode differently.
HEADER_VERDICT = "x-evrouter-verdict"
HEADER_VERDICT_DETAIL = "x-evrouter-verdict-detail"


class Lane:
    """One consuming channel, its acknowledgement window and its deliveries."""

    def __init__(self, name, queue, prefetch, *, memory, consume_check=5.0):
        self.name = name
        self.queue = queue
        self.prefetch = prefetch
        self.memory = memory
        self.consume_check = consume_check
        self.deliveries = []
        self.channel = self.consumer = self.window = self.queue_watch = None

    def open(self, conn, watch):
        """Consume on a new channel; `watch(channel)` has its broker-side
        close reported instead of raised."""
        self.channel = watch(conn.channel())
        self.window = AckWindow(multiple=not self.memory)
        self.deliveries.clear()
        self.consumer = Consumer(self.channel, [self.queue],
                                 on_message=self.deliveries.append)
        self.consumer.qos(prefetch_count=self.prefetch)
        self.consumer.consume()
        if self.queue_watch is not None:
            self.queue_watch.close()
        self.queue_watch = consuming.QueueWatch(conn, self.queue,
                                                self.consume_check)

    def cancel(self):
        self.consumer.cancel()

    def flush(self):
        send(self.channel, self.window.flush())

    def redeliveries(self, message, headers, ours):
        """Unsettled deliveries of this message before this one, or 0."""
        if self.memory:
            return 0
        info = message.delivery_info
        if not (type(info) is dict and info.get("redelivered")):
            return 0
        counted = (inbound.header(headers, HEADER_REDELIVERIES, int, 0)
                   if ours else 0)
        if self.name != "probation":
            return counted + 1
        return max(counted + 1, inbound.delivery_count(headers))
