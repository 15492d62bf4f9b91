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

from router.bus import transport as buffered

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


# Channels that were refused on and still wait for confirms, at most: past
# this many, publishing stays on the current channel (see ConfirmedPublisher).
MAX_RETIRED_CHANNELS = 4


class _ChannelConfirms:
    """One channel in confirm mode: delivery tags are per channel."""

    def __init__(self, channel, on_outcome):
        self.channel = channel
        self.refused = False        # the broker nacked a message sent here
        self._on_outcome = on_outcome
        self._seq = 0
        self._low = 1
        self.pending = {}           # delivery seq -> (token, return key)
        # return key -> the seq of the one message in flight with that key,
        # or a deque of seqs in publish order when there are several (rare:
        # the key holds the message id). No deque per message.
        self._by_key = {}
        self._returned = set()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)

    def sent(self, token, key):
        self._seq = seq = self._seq + 1
        self.pending[seq] = (token, key)
        if key is not None:
            earlier = self._by_key.get(key)
            if earlier is None:
                self._by_key[key] = seq
            elif type(earlier) is int:
                self._by_key[key] = collections.deque((earlier, seq))
            else:
                earlier.append(seq)

    # --- broker callbacks (run inside drain_events, on the owning thread) ----
    def _settle(self, seq, confirmed):
        entry = self.pending.pop(seq, None)
        if entry is None:
            return
        token, key = entry
        if key is not None:
            seqs = self._by_key[key]
            if type(seqs) is int:
                del self._by_key[key]
            else:
                if seqs[0] == seq:
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
            self.refused = self.refused or not confirmed
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
        if seqs is not None:
            self._returned.add(seqs if type(seqs) is int else seqs[0])


def _memory_routes(channel, exchange, routing_key):
    """Whether kombu's memory transport has a queue for this message."""
    try:
        return bool(channel.typeof(exchange).lookup(
            channel.get_table(exchange), exchange, routing_key, None))
    except KeyError:                # no such exchange
        return False


class ConfirmedPublisher:
    """Publishes on one channel at a time and reports each message's outcome.

    On py-amqp channels outcomes come from the broker's confirms. kombu's
    memory transport has neither confirms nor returns: there a message is
    acknowledged as soon as it is handed over, on the next ``pump``, or
    returned then if, mandatory, no queue is bound for it (kombu would
    put it in its own undeliverable queue, unsaid).

    A channel the broker refused a message on (nack) is not published on
    again: the next message goes on a new channel, and the old one is
    closed once its last confirm came back. The refusal can belong to the
    channel itself: RabbitMQ 3.10 builds a channel's client of a quorum
    queue on the first publish to it, and if the queue's record then still
    names a leader whose node died, that client asks the dead node, is
    refused, and never asks again: every later publish on the channel to
    that queue is nacked until the dead node is back (README, "Queue type
    and placement on a cluster"). A new channel reads the record again.
    """

    def __init__(self, channel, on_outcome, *, user_id=None, open_channel=None):
        self._on_outcome = on_outcome
        self._user_id = user_id
        self._channel = channel     # without confirms (memory transport)
        self._immediate = []
        self._retired = []          # refused-on channels still owed confirms
        self.channels_replaced = 0
        self._current = None
        if hasattr(channel, "confirm_select") and hasattr(channel, "events"):
            self._current = _ChannelConfirms(channel, on_outcome)
            self._open_channel = open_channel or channel.connection.channel

    def _confirms(self):
        """Every channel still in use, the oldest first."""
        return self._retired + [self._current] if self._current else []

    @property
    def in_flight(self):
        return (sum(len(c.pending) for c in self._confirms())
                + len(self._immediate))

    @property
    def channel(self):
        """The channel the next message goes on."""
        return self._current.channel if self._current else self._channel

    def publish(self, exchange, routing_key, body, token, *, message_id=None,
                headers=None, mandatory=True, user_id=None,
                content_type="application/json"):
        properties = {"delivery_mode": PERSISTENT}
        if message_id is not None:
            properties["message_id"] = message_id
        user_id = user_id or self._user_id
        if user_id:
            properties["user_id"] = user_id
        current = self._current
        if current is not None and current.refused:
            self._replace_channel()
            current = self._current
        ch = self._channel if current is None else current.channel
        if current is not None and isinstance(ch, buffered.Channel):
            buffered.publish(ch, exchange, routing_key, body,
                             mandatory=mandatory, content_type=content_type,
                             headers=headers, **properties)
            current.sent(token, (exchange, routing_key, message_id)
                         if mandatory else None)
            return
        message = ch.prepare_message(body, content_type=content_type,
                                     headers=headers, properties=properties)
        if current is None:
            if mandatory and exchange and not _memory_routes(
                    ch, exchange, routing_key):
                self._immediate.append((token, RETURNED))
                return
            ch.basic_publish(message, exchange=exchange,
                             routing_key=routing_key)
            self._immediate.append((token, ACK))
            return
        ch.basic_publish(message, exchange=exchange, routing_key=routing_key,
                         mandatory=mandatory)
        current.sent(token, (exchange, routing_key, message_id)
                     if mandatory else None)

    def owns(self, channel):
        """Whether `channel` is one this publisher still publishes on or
        is owed confirms on."""
        if self._current is None:
            return channel is self._channel
        return any(c.channel is channel for c in self._confirms())

    def take_pending(self):
        """Tokens of every message not settled yet, oldest channel first and
        in publish order, and forget them: for an owner whose channel the
        broker closed, so no outcome will come. The publisher is done: its
        other channels are closed (a no-op on the one the broker closed)."""
        confirms = self._confirms()
        tokens = [c.pending[seq][0] for c in confirms for seq in sorted(c.pending)]
        tokens += [token for token, _ in self._immediate]
        self._immediate, self._retired = [], []
        # All forgotten before any close: a close waits for its close-ok,
        # and confirms read meanwhile must find nothing to settle.
        for c in confirms:
            c.pending.clear()
        for c in confirms:
            c.channel.close()
        return tokens

    def pump(self):
        """Report outcomes that need no broker round trip (memory transport)
        and close the refused-on channels that have nothing in flight.
        Called by the connection's owner, never from a broker callback."""
        if self._immediate:
            ready, self._immediate = self._immediate, []
            for token, outcome in ready:
                self._on_outcome(token, outcome)
        if not self._retired:
            return
        for done in [c for c in self._retired if not c.pending]:
            self._retired.remove(done)
            done.channel.close()

    def _replace_channel(self):
        # Bounded: a broker that refuses everything (a full queue with
        # reject-publish) must not cost a channel per message.
        if len(self._retired) >= MAX_RETIRED_CHANNELS:
            return
        fresh = _ChannelConfirms(self._open_channel(), self._on_outcome)
        self._retired.append(self._current)
        self._current = fresh
        self.channels_replaced += 1


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
