"""ConfirmedPublisher's bookkeeping of confirms and returns, without a broker."""

import collections
import types

from router.bus import publishing


class FakeChannel:
    def __init__(self):
        self.events = collections.defaultdict(set)
        self.published = []

    def confirm_select(self):
        pass

    def prepare_message(self, body, content_type=None, headers=None,
                        properties=None):
        return types.SimpleNamespace(body=body, properties=dict(properties))

    def basic_publish(self, message, exchange, routing_key, mandatory):
        self.published.append((exchange, routing_key, message))

    def broker(self, method, *args):
        for callback in list(self.events[method]):
            callback(*args)


def publisher():
    ch, outcomes = FakeChannel(), []
    pub = publishing.ConfirmedPublisher(
        ch, lambda token, outcome: outcomes.append((token, outcome)),
        open_channel=FakeChannel)
    return ch, pub, outcomes


def test_a_return_marks_the_oldest_message_in_flight_with_its_key():
    ch, pub, outcomes = publisher()
    # two messages with one key (same exchange, routing key and message id)
    # and one with another: RabbitMQ returns before it acks, in order
    for token, mid in (("a1", "m"), ("b", "n"), ("a2", "m")):
        pub.publish("ex", "rk", b"{}", token, message_id=mid)
    ch.broker("basic_return", None, "ex", "rk", ch.published[0][2])
    ch.broker("basic_ack", 1, False)
    ch.broker("basic_ack", 3, True)
    assert outcomes == [("a1", publishing.RETURNED), ("b", publishing.ACK),
                        ("a2", publishing.ACK)]
    assert pub.in_flight == 0


def test_the_second_message_of_a_key_can_be_returned_after_the_first_settled():
    ch, pub, outcomes = publisher()
    pub.publish("ex", "rk", b"{}", "first", message_id="m")
    pub.publish("ex", "rk", b"{}", "second", message_id="m")
    pub.publish("ex", "rk", b"{}", "third", message_id="m")
    ch.broker("basic_ack", 1, False)
    ch.broker("basic_return", None, "ex", "rk", ch.published[1][2])
    ch.broker("basic_ack", 3, True)
    assert outcomes == [("first", publishing.ACK),
                        ("second", publishing.RETURNED),
                        ("third", publishing.ACK)]
    # and the key is free again: a later message with it is matched alone
    pub.publish("ex", "rk", b"{}", "fourth", message_id="m")
    ch.broker("basic_return", None, "ex", "rk", ch.published[3][2])
    ch.broker("basic_ack", 4, False)
    assert outcomes[-1] == ("fourth", publishing.RETURNED)


def test_out_of_order_single_acks_and_a_nack():
    ch, pub, outcomes = publisher()
    for i in range(3):
        pub.publish("ex", "rk", b"{}", i, message_id="same")
    ch.broker("basic_ack", 2, False)
    ch.broker("basic_nack", 1, False)
    ch.broker("basic_return", None, "ex", "rk", ch.published[2][2])
    ch.broker("basic_ack", 3, False)
    assert outcomes == [(1, publishing.ACK), (0, publishing.NACK),
                        (2, publishing.RETURNED)]
    assert pub.in_flight == 0


def test_a_return_for_nothing_in_flight_is_ignored():
    ch, pub, outcomes = publisher()
    pub.publish("ex", "rk", b"{}", "t", message_id="m")
    ch.broker("basic_return", None, "ex", "other", ch.published[0][2])
    ch.broker("basic_ack", 1, False)
    assert outcomes == [("t", publishing.ACK)]
