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
"""

import time

from amqp import spec
from amqp.exceptions import ConsumerCancelled

RECHECK = 1.0       # seconds before a queue seen without consumers is asked again


class QueueWatch:
    def __init__(self, conn, queue_name, interval):
        self.conn = conn
        self.queue_name = queue_name
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
            return
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
        elif not self._suspect:
            self._suspect = True
            self._next = now + RECHECK
        else:
            raise ConsumerCancelled(
                f"queue {self.queue_name} has no consumer: ours was lost "
                f"without a cancel", spec.Basic.Cancel)

    def close(self):
        if self._probe is not None:
            try:
                self._probe.close()
            except self.conn.channel_errors + self.conn.connection_errors:
                pass
            self._probe = None
