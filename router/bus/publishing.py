"""The one publish module: persistent, mandatory, confirmed.

Free of service concepts. ``ConfirmedPublisher`` pipelines publisher
confirms: ``publish`` only writes, and the outcome of each message arrives
later through ``on_outcome(token, outcome)`` while the connection's owner
drains events. ``publish_and_wait`` is the blocking form for callers that
own their connection and publish a message at a time (CLI, agent, network
side).

RabbitMQ sends basic.return for an unroutable mandatory message before the
basic.ack for it; returns carry no delivery tag, so they are matched to
publishes by (exchange, routing key, message id) in publish order.
"""

import collections
import socket
import time

ACK = "ack"
NACK = "nack"
RETURNED = "returned"

PERSISTENT = 2


class PublishError(Exception):
    """The broker refused or could not route a message."""

    def __init__(self, outcome, detail):
        super().__init__(f"publish {outcome}: {detail}")
        self.outcome = outcome


class ConfirmTimeout(PublishError):
    def __init__(self, detail):
        super().__init__("timeout", detail)


class ConfirmedPublisher:
    """Publishes on one channel and reports each message's outcome.

    On py-amqp channels outcomes come from the broker's confirms. kombu's
    memory transport has neither confirms nor returns: there a message is
    acknowledged as soon as it is handed over, on the next ``pump``.
    """

    def __init__(self, channel, on_outcome, *, user_id=None):
        self._channel = channel
        self._on_outcome = on_outcome
        self._user_id = user_id
        self._seq = 0
        self._low = 1
        self._pending = {}        # delivery seq -> (token, return key)
        self._by_key = collections.defaultdict(collections.deque)
        self._returned = set()
        self._immediate = []
        self._confirms = hasattr(channel, "confirm_select") and hasattr(
            channel, "events")
        if self._confirms:
            channel.confirm_select()
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)

    @property
    def in_flight(self):
        return len(self._pending) + len(self._immediate)

    def publish(self, exchange, routing_key, body, token, *, message_id=None,
                headers=None, mandatory=True, user_id=None,
                content_type="application/json"):
        properties = {"delivery_mode": PERSISTENT}
        if message_id is not None:
            properties["message_id"] = message_id
        user_id = user_id or self._user_id
        if user_id:
            properties["user_id"] = user_id
        ch = self._channel
        message = ch.prepare_message(body, content_type=content_type,
                                     headers=headers, properties=properties)
        ch.basic_publish(message, exchange=exchange, routing_key=routing_key,
                         mandatory=mandatory)
        if not self._confirms:
            self._immediate.append(token)
            return
        self._seq += 1
        key = (exchange, routing_key, message_id) if mandatory else None
        self._pending[self._seq] = (token, key)
        if key is not None:
            self._by_key[key].append(self._seq)

    def pump(self):
        """Report outcomes that need no broker round trip (memory transport)."""
        if self._immediate:
            ready, self._immediate = self._immediate, []
            for token in ready:
                self._on_outcome(token, ACK)

    # --- broker callbacks (run inside drain_events, on the owning thread) ----
    def _settle(self, seq, confirmed):
        entry = self._pending.pop(seq, None)
        if entry is None:
            return
        token, key = entry
        if key is not None:
            seqs = self._by_key[key]
            if seqs and seqs[0] == seq:
                seqs.popleft()
            else:
                seqs.remove(seq)
            if not seqs:
                del self._by_key[key]
        if seq in self._returned:
            self._returned.discard(seq)
            outcome = RETURNED
        else:
            outcome = ACK if confirmed else NACK
        self._on_outcome(token, outcome)

    def _settle_upto(self, tag, multiple, confirmed):
        if multiple:
            for seq in range(self._low, tag + 1):
                self._settle(seq, confirmed)
            self._low = max(self._low, tag + 1)
        else:
            self._settle(tag, confirmed)
            if tag == self._low:
                self._low += 1

    def _on_ack(self, delivery_tag, multiple):
        self._settle_upto(delivery_tag, multiple, True)

    def _on_nack(self, delivery_tag, multiple):
        self._settle_upto(delivery_tag, multiple, False)

    def _on_return(self, exc, exchange, routing_key, message):
        message_id = message.properties.get("message_id")
        seqs = self._by_key.get((exchange, routing_key, message_id))
        if seqs:
            self._returned.add(seqs[0])


class BlockingPublisher:
    """Publish a message at a time and block until the broker confirmed it.

    For a connection whose owner consumes nothing (CLI, agent, network
    side): waiting drains the connection's events. Raises PublishError
    (nack, unroutable) or ConfirmTimeout; connection errors propagate as
    kombu raises them, for the caller's retry policy to judge.
    """

    def __init__(self, connection, *, user_id=None):
        self._connection = connection
        self._outcomes = {}
        self._publisher = ConfirmedPublisher(
            connection.channel(), self._outcomes.__setitem__, user_id=user_id)

    def publish(self, exchange, routing_key, body, *, timeout=10.0, **kwargs):
        token = object()
        self._publisher.publish(exchange, routing_key, body, token, **kwargs)
        self._publisher.pump()
        deadline = time.monotonic() + timeout
        while token not in self._outcomes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfirmTimeout(
                    f"no confirm from the broker within {timeout:.1f}s")
            try:
                self._connection.drain_events(timeout=min(remaining, 1.0))
            except socket.timeout:
                pass
        outcome = self._outcomes.pop(token)
        if outcome != ACK:
            raise PublishError(outcome,
                               f"to {exchange!r} key {routing_key!r}")
