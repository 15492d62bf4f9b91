"""Is a consumer still consuming its queue? Asked when the broker is silent.

RabbitMQ 3.10 does not always send basic.cancel to the consumers of a
deleted quorum queue (1 deletion in 10 on the test cluster, found by
tests/chaos/test_cluster_chaos.py). A consumer it forgot waits on a queue
that is gone, and nobody consumes the one declared in its place: that
queue's messages wait until the connection drops. So a consumer idle for
``interval`` seconds asks for its queue by name (one passive declare on a
channel of its own): gone, or there without a consumer twice in a row a
second apart (a quorum queue in the middle of an election may answer 0
once), it is told the consumer is lost, as a cancel would have told it.
A consumer that receives deliveries is not asked about: it is consuming.

Every ``interval``, busy or idle, the queue is also bound again to the
exchanges it reads (one queue.bind each, a no-op when the binding is
there; deliveries through one binding say nothing of another): an exchange
deleted and declared again (an operator, a redeploy, a router repairing the
central topology) comes back without its bindings, and the broker tells no
consumer. Gone altogether (404), an exchange the consumer may declare is
declared again first and that is logged; one it may not (the central hosts
exchange, for a host's user) is said at ERROR, once until it is back. So a
consumer cut off from an exchange hears from it again within ``interval``
of the exchange being there.
"""

import logging
import time

from amqp import spec
from amqp.exceptions import ConsumerCancelled

from router.bus.topology import queue_bindings

LOG = logging.getLogger(__name__)

RECHECK = 1.0       # seconds before a queue seen without consumers is asked again


class QueueWatch:
    """queue: a kombu Queue (bound again when idle, if it has an exchange
    of its own) or a queue name (only asked about)."""

    def __init__(self, conn, queue, interval):
        self.conn = conn
        self.queue_name = getattr(queue, "name", queue)
        self._bindings = queue_bindings(queue) if hasattr(queue, "bindings") \
            else []
        self._missing = set()       # exchanges said to be missing, not yet back
        self.interval = interval
        self._probe = None
        self._active = False
        self._suspect = False
        self._next = time.monotonic() + interval

    @property
    def next_due(self):
        """When check() next asks the broker (monotonic): a loop that
        sleeps until something is due wakes for it."""
        return self._next

    def delivered(self):
        """A delivery arrived: the consumer is consuming."""
        self._active = True

    def check(self, now=None):
        """Raise ConsumerCancelled if the consumer was lost without a
        cancel; otherwise return (cheaply, until the next check is due)."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        if self._active:
            self._active = self._suspect = False
            self._next = now + self.interval
            # Deliveries prove the consumer, not every binding: a host fed
            # through its own exchange lost its hosts-exchange binding all
            # the same (the review: never bound again while busy).
            return self._bind_all()
        try:
            if self._probe is None:
                self._probe = self.conn.channel()
            ok = self._probe.queue_declare(queue=self.queue_name, passive=True)
        except self.conn.channel_errors as exc:
            self._probe = None          # the 404 closed it
            raise ConsumerCancelled(
                f"queue {self.queue_name} is gone ({exc}) and the broker did "
                f"not cancel the consumer", spec.Basic.Cancel) from None
        if ok.consumer_count:
            self._suspect = False
            self._next = now + self.interval
            self._bind_all()
        elif not self._suspect:
            self._suspect = True
            self._next = now + RECHECK
        else:
            raise ConsumerCancelled(
                f"queue {self.queue_name} has no consumer: ours was lost "
                f"without a cancel", spec.Basic.Cancel)

    def _bind_all(self):
        for exchange, key in self._bindings:
            self._bind_again(exchange, key)

    def _bind_again(self, exchange, key):
        try:
            if self._probe is None:
                self._probe = self.conn.channel()
            self._probe.queue_bind(queue=self.queue_name,
                                   exchange=exchange.name, routing_key=key)
            if exchange.name in self._missing:
                self._missing.discard(exchange.name)
                LOG.warning("exchange %s is back: queue %s bound to it again",
                            exchange.name, self.queue_name)
            return
        except self.conn.channel_errors as exc:
            self._probe = None          # the error closed it
            if getattr(exc, "reply_code", None) != 404:
                LOG.warning("could not bind queue %s to exchange %s again: "
                            "%s", self.queue_name, exchange.name, exc)
                return
        if exchange.no_declare:
            # Not ours to declare (the central topology's): said once.
            if exchange.name not in self._missing:
                self._missing.add(exchange.name)
                LOG.error("exchange %s does not exist, so queue %s cannot be "
                          "bound to it: nothing routed there reaches this "
                          "queue until it is declared again (`evrouter "
                          "topology --declare`, or a router's start)",
                          exchange.name, self.queue_name)
            return
        try:
            self._probe = self.conn.channel()
            exchange(self._probe).declare()
            self._probe.queue_bind(queue=self.queue_name,
                                   exchange=exchange.name, routing_key=key)
        except self.conn.channel_errors as exc:
            self._probe = None
            LOG.warning("exchange %s is gone and could not be declared "
                        "again for queue %s: %s", exchange.name,
                        self.queue_name, exc)
            return
        LOG.warning("exchange %s was gone while queue %s was consumed: "
                    "declared again and bound", exchange.name, self.queue_name)

    def close(self):
        if self._probe is not None:
            try:
                self._probe.close()
            except self.conn.channel_errors + self.conn.connection_errors:
                pass
            self._probe = None
