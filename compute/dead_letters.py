"""A host consumer's dead-letter copies: bounded, confirmed, and each
refusal charged to the copy that caused it (issue 19: one message, one fault).

  failure                            blast radius       what happens
  copy larger than a frame (501)     the connection     cannot happen: every copy is
                                                        bounded (headers cut, body
                                                        truncated, each with a marker)
  nack, basic.return                 that copy          a refusal; sent again after a
                                                        delay (0.25 s doubling to 5 s)
  channel closed by the broker       the copies in      the channel is reopened; one
  (404 exchange deleted, 403, 406)   flight on it       copy in flight: its refusal;
                                                        several: none is charged, all
                                                        go again one at a time, so the
                                                        next fault has one culprit
  refusals for `patience` seconds    that message       dropped: ERROR line, counter
                                                        dropped:<reason>, the original
                                                        acknowledged
  connection lost                    the session        the session's business

So no message holds its prefetch slot much longer than `patience` (the
router's refused_patience, 20 s by default), and a refusal that ends
within it (a policy lifted, the exchange declared again) loses nothing: a
count of three quick tries (0.3 s) once dropped every bad message that
came during any short refusal (found by tests/chaos).

A dropped copy's original is acknowledged, not rejected: the host queue's
own dead-letter exchange is ours, so a rejection made the broker
dead-letter it there without an evrouter reason (or, as the exchange was
still refusing, lose it quietly), which says less than the ERROR line and
the counter do.

Broker callbacks only append to a list; the owning thread settles
outcomes in pump().
"""

import logging
import time
from dataclasses import dataclass

from router.bus import backoff, contract, inbound, publishing
from router.bus import connection as bus_connection

LOG = logging.getLogger(__name__)


HEADER_TRUNCATED_BODY = "x-evrouter-truncated-body"

def bounded_copy(body, ours, theirs, frame_max, max_message_bytes):
    """(body, headers, cut) of a copy the broker accepts whole.

    `ours` (the dead-letter reason...) go on top and are never cut;
    `theirs`, the original's untrusted headers, are made safe and cut
    (inbound.bounded_headers) to what fits beside them. The body is
    truncated if it is larger than the broker's max message size, less a
    frame for the properties (in case the broker counts them).
    """
    budget = inbound.header_budget(frame_max)
    body = inbound.raw_body(body)
    ours = dict(ours)
    limit = max(0, max_message_bytes - frame_max)
    if len(body) > limit:
        ours[HEADER_TRUNCATED_BODY] = f"{len(body)} bytes; the first {limit} kept"
        body = body[:limit]
    detail = ours.get(contract.HEADER_DETAIL)
    if type(detail) is str and inbound.encoded_size(ours) > budget // 2:
        # Only with a frame_max near AMQP's minimum (4096).
        ours[contract.HEADER_DETAIL] = inbound.clip(detail, budget // 16)
    headers, cut = inbound.bounded_beside(theirs, ours, frame_max)
    return body, headers, cut


@dataclass(eq=False)
class Copy:
    message: object         # the original delivery
    owner: object           # what it was delivered on (the session's intake)
    msg_id: object
    reason: str
    body: bytes
    headers: dict
    content_type: object
    refusals: int = 0
    first_refused: float = None
    due: float = 0.0


class DeadLetters:
    """Publishes copies to the dead-letter exchange on a channel of its own.

    on_settled(copy, ok): the copy was confirmed (ok) or dropped after its
    refusals; the caller settles the original accordingly.
    """

    def __init__(self, conn, exchange, host, *, patience, max_message_bytes,
                 on_settled, stats):
        self._conn = conn
        self.exchange = exchange
        self.host = host
        self.patience = patience
        self.frame_max = inbound.frame_max_of(conn)
        self.max_message_bytes = max_message_bytes
        self._on_settled = on_settled
        self.stats = stats
        self._outcomes = []
        self._in_flight = {}            # Copy -> True, in publish order
        self._waiting = []              # copies to (re)publish once due
        self._one_at_a_time = False
        self._generation = 0
        self._channel = None
        self._open()

    def _open(self):
        self._generation += 1
        generation = self._generation
        self._channel = self._conn.channel()
        # An outcome from an older channel says nothing about this one.
        # With the host's user_id, which the broker vouches for: a reader of
        # the dead-letter queue trusts x-evrouter-* from evrouter's users.
        self._publisher = publishing.ConfirmedPublisher(
            self._channel, lambda copy, outcome:
            self._outcomes.append((generation, copy, outcome)),
            user_id=bus_connection.user_of(self._conn))

    @property
    def busy(self):
        return bool(self._in_flight or self._waiting or self._outcomes)

    def next_due(self):
        """When the earliest waiting copy may go (None: nothing waits)."""
        return min((c.due for c in self._waiting), default=None)

    def send(self, message, owner, msg_id, reason, ours, theirs, content_type):
        """Queue a copy of `message`; returns the cut note (None: whole)."""
        body, headers, cut = bounded_copy(message.body, ours, theirs,
                                          self.frame_max,
                                          self.max_message_bytes)
        self._waiting.append(Copy(message, owner, msg_id, reason, body,
                                  headers, content_type))
        self._publish_due()
        return cut

    def pump(self):
        self._publisher.pump()
        for generation, copy, outcome in bus_connection.take(self._outcomes):
            if generation != self._generation or \
                    self._in_flight.pop(copy, None) is None:
                continue
            if outcome == publishing.ACK:
                self._on_settled(copy, True)
            else:
                self._refused(copy, outcome)
        self._publish_due()

    def forget(self, owner):
        """Drop the copies of messages delivered on `owner`, a consumer
        channel that closed: those messages are back in their queue."""
        self._waiting = [c for c in self._waiting if c.owner is not owner]
        for copy in [c for c in self._in_flight if c.owner is owner]:
            del self._in_flight[copy]

    def channel_failed(self, exc):
        """The broker closed our channel (a soft error of a publish)."""
        in_flight = list(self._in_flight)
        self._in_flight.clear()
        old = self._channel
        # py-amqp reopened the closed channel in place, without confirms;
        # a fresh one keeps this class's view of it simple.
        try:
            old.close()
        except self._conn.channel_errors:
            pass
        self._open()        # a failure here is the session's: it ends it
        self.stats["dead_letter_channel_faults"] += 1
        LOG.warning("host consumer %s: the broker closed the dead-letter "
                    "channel (%s) with %d copies in flight; reopened",
                    self.host, exc, len(in_flight))
        if len(in_flight) == 1:
            self._refused(in_flight[0], f"channel closed: {exc}")
        elif in_flight:
            # Which of them the broker refused is unknown: none is charged.
            self._one_at_a_time = True
            self._waiting[:0] = in_flight

    def _refused(self, copy, why):
        now = time.monotonic()
        copy.refusals += 1
        if copy.first_refused is None:
            copy.first_refused = now
        self.stats["dead_letter_refusals"] += 1
        msg_id = inbound.loggable(copy.msg_id)
        if now - copy.first_refused >= self.patience:
            LOG.error("event %s on host %s: dead-letter copy refused %d "
                      "times over %.1fs (last: %s); dropped (%s)", msg_id,
                      self.host, copy.refusals, now - copy.first_refused, why,
                      copy.reason)
            self.stats[f"dropped:{copy.reason}"] += 1
            self._on_settled(copy, False)
            return
        delay = backoff.refused_copy_delay(copy.refusals)
        LOG.warning("event %s on host %s: dead-letter copy refused (%s); "
                    "again in %.1fs", msg_id, self.host, why, delay)
        copy.due = now + delay
        self._waiting.append(copy)

    def _publish_due(self):
        now = time.monotonic()
        for copy in [c for c in self._waiting if c.due <= now]:
            if self._one_at_a_time and self._in_flight:
                break
            self._waiting.remove(copy)
            self._in_flight[copy] = True
            self._publisher.publish(
                self.exchange, copy.reason, copy.body, copy,
                message_id=copy.msg_id, headers=copy.headers,
                content_type=copy.content_type)
        if self._one_at_a_time and not (self._in_flight or self._waiting):
            self._one_at_a_time = False
