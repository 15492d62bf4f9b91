"""One message, one fault (issue 19), at a host consumer on the real broker.

A failure costs no more than its blast radius: a message whose dead-letter
copy would not fit in a frame, a dead-letter exchange deleted under a
running consumer, a dead-letter queue that refuses everything, a message
that kills its session. In each, the good events keep flowing, the bad
message is set aside (or dropped, counted) a bounded number of times, and
the consumer's one session carries on: only a lost connection ends one.
"""

import socket
import subprocess
import time
import uuid

import kombu
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute import dead_letters
from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import contract, inbound
from tests.conftest import BROKER_URL, Bus, collect, wait_for
from tests.functional import poison
from tests.functional.conftest import node_ctl
from tests.functional.waiter_harness import HostEvents, get_dead_letter

pytestmark = pytest.mark.timeout(120)

KEY = "instance.network-vif-plugged"
FRAME_MAX = 131_072


@pytest.fixture
def raw(bus):
    p = poison.RawPublisher(bus.url)
    try:
        yield p
    finally:
        p.close()


def _header(message, name):
    value = message.headers.get(name)
    return value.decode() if isinstance(value, bytes) else value


def _good(host):
    return contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1", contract.COMPLETED,
        host), "faults-test")


def _publish_good(raw, exchange, host):
    good = _good(host)
    raw.publish(exchange, KEY, contract.encode(good), message_id=good.id)
    return good


def _send(raw, exchange, body, headers, raw_table, message_id):
    if raw_table is not None:
        raw.publish_raw(exchange, KEY, body, poison.raw_properties(
            message_id=message_id.encode(), headers=raw_table))
    else:
        raw.publish(exchange, KEY, body, message_id=message_id,
                    application_headers=headers)


def _one_session(consumer):
    """The session the consumer began with is the one it still runs."""
    assert consumer.stats["reconnects"] == 0, dict(consumer.stats)
    assert consumer.stats["failures"] == 0, dict(consumer.stats)
    assert consumer.stats["sessions"] == 1, dict(consumer.stats)
    assert consumer.ready.is_set()


def _no_more_dead_letters(bus):
    extra = collect(bus.url, bus.topology.dead_letter_queue_name, 10,
                    timeout=1.0)
    assert extra == [], [m.properties.get("message_id") for m in extra]


# --- 1. nothing the consumer sends can exceed what the broker accepts ----------

@pytest.mark.parametrize("case", poison.oversized_header_cases(),
                         ids=lambda c: c[0])
def test_an_oversized_header_is_cut_and_dead_lettered_once(bus, host, raw, case):
    """Issue 19: the copy with the reason headers exceeded frame_max, the
    broker closed the connection (501), the message came back forever."""
    name, headers, raw_table = case
    exchange = bus.topology.host_exchange_name(host.host)
    msg_id = f"oversized-{uuid.uuid4().hex[:8]}"
    _send(raw, exchange, b"{not json", headers, raw_table, msg_id)
    good = _publish_good(raw, exchange, host.host)
    wait_for(lambda: host.consumer.stats["held"] == 1, 20,
             what=f"the good event {good.id} after {name}")
    dead = get_dead_letter(bus, timeout=20)
    assert dead.properties.get("message_id") == msg_id
    assert _header(dead, contract.HEADER_REASON) == contract.REASON_MALFORMED
    # The broker vouches for who said so: the host's own user.
    assert dead.properties.get("user_id") == kombu.Connection(bus.url).userid
    cut = _header(dead, inbound.HEADER_CUT)
    assert cut and "1 header(s)" in cut, dict(dead.headers)
    assert dead.body == b"{not json"
    wait_for(lambda: host.consumer.stats["dead_lettered"] == 1, 10,
             what="the dead-letter copy confirmed")
    _no_more_dead_letters(bus)
    _one_session(host.consumer)
    wait_for(lambda: host.queue_depth() == 0, 10, what="an empty host queue")


# Header tables near and over the frame limit once py-amqp re-encodes them:
# arrays of 1-, 2- and 4-byte numbers (written back as 4 and 8 bytes),
# strings, nested tables. Each is at most what the broker accepts from us.
_ENTRY_KINDS = st.sampled_from([b"b", b"B", b"s", b"u", b"f", b"I", b"d",
                                "string", "nested"])
_MAX_RAW_TABLE = FRAME_MAX - 8 - 12 - 2 - 4 - 64


def _raw_entry(i, kind, size):
    name = f"h{i}".encode()
    if kind == "string":
        return poison.raw_string_entry(name, "x" * size)
    if kind == "nested":
        inner = poison.raw_array_entry(b"n", b"b", [1] * (size // 2))
        return (poison._shortstr(name) + b"F"
                + len(inner).to_bytes(4, "big") + inner)
    width = {b"b": 2, b"B": 2, b"s": 3, b"u": 3, b"f": 5, b"I": 5, b"d": 9}[kind]
    return poison.raw_array_entry(name, kind, [1] * (size // width))


_header_shapes = st.lists(
    st.tuples(_ENTRY_KINDS, st.integers(1, 131_000)), min_size=1, max_size=4)


def test_header_shapes_near_the_frame_limit_are_bounded(bus, host, raw):
    exchange = bus.topology.host_exchange_name(host.host)
    sent = []

    @settings(max_examples=12, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(shapes=_header_shapes, fill=st.floats(0.6, 1.0))
    def run(shapes, fill):
        # Scale the entries so the raw table is `fill` of what the broker
        # accepts: near the limit, and over it once re-encoded.
        total = sum(size for _, size in shapes)
        scale = fill * _MAX_RAW_TABLE / total
        table = b"".join(_raw_entry(i, kind, max(1, int(size * scale) - 16))
                         for i, (kind, size) in enumerate(shapes))
        assert len(table) <= _MAX_RAW_TABLE
        msg_id = f"shape-{len(sent)}"
        sent.append(msg_id)
        raw.publish_raw(exchange, KEY, b"{not json", poison.raw_properties(
            message_id=msg_id.encode(), headers=table))
        good = _publish_good(raw, exchange, host.host)
        wait_for(lambda: host.consumer.stats["held"] == len(sent), 20,
                 what=f"the good event {good.id} after {shapes!r}")
        dead = get_dead_letter(bus, timeout=20)
        assert dead.properties.get("message_id") == msg_id
        assert _header(dead, contract.HEADER_REASON) == contract.REASON_MALFORMED

    run()
    wait_for(lambda: host.consumer.stats["dead_lettered"] == len(sent), 10,
             what="every copy confirmed")
    _no_more_dead_letters(bus)
    _one_session(host.consumer)


# --- 3. a refused dead-letter copy costs one message, not the session ------------

def _delete_exchange(bus, name):
    ch = bus.channel()
    try:
        ch.exchange_delete(name)
    finally:
        ch.close()


def test_dead_letter_exchange_deleted_under_the_consumer(bus, raw, caplog):
    bus.declare_central()
    host = HostEvents(bus, dead_letter_patience=1.0)
    exchange = bus.topology.host_exchange_name(host.host)
    _delete_exchange(bus, bus.topology.dead_letter_exchange_name)
    raw.publish(exchange, KEY, b"{bad", message_id="bad-1")
    goods = [_publish_good(raw, exchange, host.host) for _ in range(3)]
    wait_for(lambda: host.consumer.stats["held"] == len(goods), 20,
             what="the good events behind the bad one")
    wait_for(lambda: host.consumer.stats["dropped:malformed"] == 1, 20,
             what="the bad one dropped after its patience")
    assert host.consumer.stats["dead_letter_refusals"] >= 2
    assert any(r.levelname == "ERROR" and "bad-1" in r.getMessage()
               and "dropped" in r.getMessage() for r in caplog.records)
    _one_session(host.consumer)
    wait_for(lambda: host.queue_depth() == 0, 10, what="an empty host queue")

    # The exchange back: the same session's dead-letter channel works again.
    bus.declare_central()
    raw.publish(exchange, KEY, b"{bad", message_id="bad-2")
    dead = get_dead_letter(bus, timeout=20)
    assert dead.properties.get("message_id") == "bad-2"
    _one_session(host.consumer)
    host.stop()


def test_dead_letter_exchange_declared_after_the_consumer_started(bus, raw):
    """Found by the state machine (test_host_consumer_model.py): a session
    that began without the exchange rejected every bad message until it
    ended, the exchange long back."""
    h = HostEvents(bus)         # no central topology yet
    try:
        bus.declare_central()
        exchange = bus.topology.host_exchange_name(h.host)
        raw.publish(exchange, KEY, b"{bad", message_id="late-1")
        dead = get_dead_letter(bus, timeout=20)
        assert dead.properties.get("message_id") == "late-1"
        assert _header(dead, contract.HEADER_REASON) == contract.REASON_MALFORMED
        _one_session(h.consumer)
    finally:
        h.stop()


def _rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", *args], check=True, text=True,
                          capture_output=True, timeout=60).stdout


def _queue_policy(name):
    listed = _rabbitmqctl("list_queues", "name", "policy", "--quiet",
                          "--no-table-headers")
    for line in listed.splitlines():
        parts = line.split("\t")
        if parts[0] == name:
            return parts[1] if len(parts) > 1 else ""
    return None


@pytest.fixture
def refusing_dead_letter_queue(bus):
    """A max-length 0, reject-publish policy on this test's dead-letter
    queue only: the broker nacks every copy published to it. Yields
    lift(), which ends the refusal before the test does."""
    bus.declare_central()
    policy = f"{bus.prefix}-refuse"
    queue = bus.topology.dead_letter_queue_name
    _rabbitmqctl("set_policy", "--apply-to", "queues", "--priority", "100",
                 policy, f"^{queue.replace('.', '[.]')}$",
                 '{"max-length": 0, "overflow": "reject-publish"}')
    try:
        wait_for(lambda: _queue_policy(queue) == policy, 20,
                 what="the policy applied")
        lifted = []

        def lift():
            _rabbitmqctl("clear_policy", policy)
            lifted.append(True)
        yield lift
    finally:
        if not lifted:
            _rabbitmqctl("clear_policy", policy)


def test_dead_letter_queue_refusing_every_copy(bus, refusing_dead_letter_queue,
                                               raw, caplog):
    host = HostEvents(bus, dead_letter_patience=1.0)
    try:
        exchange = bus.topology.host_exchange_name(host.host)
        raw.publish(exchange, KEY, b"{bad", message_id="refused-1")
        goods = [_publish_good(raw, exchange, host.host) for _ in range(3)]
        wait_for(lambda: host.consumer.stats["held"] == len(goods), 20,
                 what="the good events behind the refused copy")
        wait_for(lambda: host.consumer.stats["dropped:malformed"] == 1, 20,
                 what="the copy dropped after its patience")
        assert host.consumer.stats["dead_letter_refusals"] >= 2
        assert any(r.levelname == "ERROR" and "refused-1" in r.getMessage()
                   for r in caplog.records)
        _one_session(host.consumer)
        wait_for(lambda: host.queue_depth() == 0, 10, what="an empty host queue")
        # Dropped is acknowledged: once the queue takes copies again, the
        # broker has no reasonless dead letter of its own to put there.
        refusing_dead_letter_queue()
        _no_more_dead_letters(bus)
    finally:
        host.stop()


def test_back_from_caution_the_consumer_takes_its_full_prefetch(
        bus, refusing_dead_letter_queue, raw):
    """After a lost session a consumer takes one message at a time, then
    goes back to its prefetch. RabbitMQ applies a basic.qos to consumers
    started after it only: found by tests/chaos, the consumer stayed at one
    for the whole session, and a bad message whose dead letter waited
    (here: refused) held every event behind it."""
    host = HostEvents(bus)
    try:
        consumer = host.consumer
        consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: consumer.stats["sessions"] == 2
                 and consumer.ready.is_set(), 20, what="the next session")
        wait_for(lambda: not consumer._cautious, 10,
                 what="back to the full prefetch")
        exchange = bus.topology.host_exchange_name(host.host)
        raw.publish(exchange, KEY, b"{bad", message_id="refused-1")
        wait_for(lambda: consumer.stats["dead_letter_refusals"] >= 1, 10,
                 what="the bad one's copy refused")
        goods = [_publish_good(raw, exchange, host.host) for _ in range(3)]
        wait_for(lambda: consumer.stats["held"] == len(goods), 5,
                 what="the good events past the waiting bad one")
    finally:
        host.stop()


def test_a_refusal_shorter_than_the_patience_loses_nothing(
        bus, refusing_dead_letter_queue, raw):
    """Found by tests/chaos: three quick tries (0.3 s) dropped every bad
    message that came while the dead-letter queue refused, however short
    the refusal. Within the patience the copy waits and goes through."""
    host = HostEvents(bus)
    try:
        exchange = bus.topology.host_exchange_name(host.host)
        raw.publish(exchange, KEY, b"{bad", message_id="refused-1")
        wait_for(lambda: host.consumer.stats["dead_letter_refusals"] >= 1, 20,
                 what="the copy refused")
        refusing_dead_letter_queue()
        dead = get_dead_letter(bus, timeout=20)
        assert dead.properties.get("message_id") == "refused-1"
        assert _header(dead, contract.HEADER_REASON) == contract.REASON_MALFORMED
        assert not any(k.startswith("dropped:") for k in host.consumer.stats)
        _one_session(host.consumer)
    finally:
        host.stop()


def test_a_soft_error_on_the_consuming_channel_reopens_that_channel_only(bus):
    """An acknowledgement the broker does not know (406 on basic.ack, what
    a bug of ours would send) closes the consuming channel: reopened, what
    was in flight on it comes back, the session carries on."""
    bus.declare_central()
    delivered = []

    def deliver(event, message_id, **kwargs):
        if not delivered:
            # On the consumer's own thread, on its consuming channel.
            conn = h.consumer.connection.connection
            [channel] = [c for c in conn.channels.values()
                         if getattr(c, "callbacks", None)]
            channel.basic_ack(999_999)
        delivered.append(message_id)
        return h.registry.deliver(event, message_id, **kwargs)

    h = HostEvents(bus, deliver=deliver)
    raw = poison.RawPublisher(bus.url)
    try:
        exchange = bus.topology.host_exchange_name(h.host)
        goods = [_publish_good(raw, exchange, h.host) for _ in range(5)]
        wait_for(lambda: h.consumer.stats["held"] == len(goods), 20,
                 what="every good event recorded")
        assert set(delivered) == {g.id for g in goods}
        _one_session(h.consumer)
        # What was taken before the close arrived came back: duplicates,
        # each recorded once (held == 5 above). At least the one in hand;
        # more when the broker's close came after the next deliveries were
        # handled (a busy machine: 2 in one run), their acks lost with the
        # channel.
        assert 1 <= h.consumer.stats["duplicate"] <= len(goods)
        assert h.consumer.stats["intake_channel_faults"] == 1
        wait_for(lambda: h.queue_depth() == 0, 10, what="an empty host queue")
        _no_more_dead_letters(bus)
    finally:
        h.stop()
        raw.close()


# A copy the broker refuses by its size closes the dead-letter channel (406
# on basic.publish). The max message size is node-wide: this runs on the
# node of our own (own_node, tests/functional/conftest.py).
SMALL_MAX = 1024 * 1024


def _max_message_size(size):
    # Read by each channel as it opens, so set before the consumer starts.
    node_ctl("eval",
          f"application:set_env(rabbit, max_message_size, {size}).")


@pytest.mark.parametrize("truncate", [False, True], ids=["refused", "truncated"])
def test_a_copy_over_the_max_message_size_costs_that_copy_alone(own_node,
                                                               truncate):
    """Its copies in flight beside it on the closed channel are sent again
    and dead-lettered; it alone is dropped after its refusals, or, when the
    consumer knows the broker's size, sent truncated with a marker."""
    b = Bus(own_node)
    b.declare_central()
    host = f"cmp-{uuid.uuid4().hex[:8]}"
    b.declare_host(host)
    raw = poison.RawPublisher(own_node)
    consumer = thread = None
    try:
        exchange = b.topology.host_exchange_name(host)
        small = [f"small-{i}" for i in range(3)]
        raw.publish(exchange, KEY, b"{bad", message_id=small[0])
        raw.publish(exchange, KEY, b"x" * 2_000_000, message_id="big")
        for msg_id in small[1:]:
            raw.publish(exchange, KEY, b"{bad", message_id=msg_id)
        _publish_good(raw, exchange, host)
        _max_message_size(SMALL_MAX)
        options = ({"max_message_bytes": SMALL_MAX} if truncate
                   else {"dead_letter_patience": 1.0})
        consumer = HostConsumer(HostConsumerSettings(
            host=host, transport_url=own_node, topology=b.topology, **options),
            InstanceEvents().deliver)
        thread = consumer.start()
        wait_for(lambda: consumer.stats["held"] == 1, 20, what="the good event")
        expected = set(small) | ({"big"} if truncate else set())
        wait_for(lambda: consumer.stats["dead_lettered"] == len(expected), 20,
                 what="the copies confirmed")
        dead = collect(b.url, b.topology.dead_letter_queue_name, 20, timeout=2)
        # Copies in flight on a channel that closed are sent again: one the
        # broker had taken before the close arrives twice (at least once).
        ours = {m.properties["message_id"] for m in dead
                if _header(m, contract.HEADER_REASON)}
        assert ours == expected
        big = [m for m in dead if m.properties["message_id"] == "big"]
        if truncate:
            assert len(big) == 1 and len(big[0].body) <= SMALL_MAX
            assert _header(big[0], dead_letters.HEADER_TRUNCATED_BODY)
            assert consumer.stats["dead_letter_refusals"] == 0
        else:
            wait_for(lambda: consumer.stats["dropped:too-large"] == 1, 20,
                     what="the big copy dropped")
            assert consumer.stats["dead_letter_refusals"] >= 2
            # Acknowledged, not rejected: no dead letter of the broker's
            # own, without our reason (before: one, with x-death only).
            later = collect(b.url, b.topology.dead_letter_queue_name, 1,
                            timeout=2)
            assert big + later == []
        _one_session(consumer)
    finally:
        _max_message_size(128 * 1024 * 1024)
        if consumer is not None:
            consumer.stop()
            thread.join(15)
        raw.close()
        b.cleanup()


# --- 2. a message that kills its session is set aside, alone --------------------

@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_deadly_message_with_an_oversized_header_is_poison_alone(queue_type):
    """It kills its session on every delivery, and its dead-letter copy
    would not fit in a frame: dead-lettered poison (cut) after the limit;
    the good events beside it are delivered, none dead-lettered."""
    b = Bus(BROKER_URL, queue_type=queue_type)
    b.declare_central()
    deadly = str(uuid.uuid4())
    delivered = []
    kills = []

    def deliver(event, message_id, **kwargs):
        if event.server_uuid == deadly:
            # What a message that crashes its consumer does: the connection
            # dies before the message is acknowledged.
            kills.append(1)
            h.consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
            return "delivered"
        delivered.append(message_id)
        return "delivered"

    h = HostEvents(b, deliver=deliver, redelivery_limit=3)
    raw = poison.RawPublisher(b.url)
    try:
        exchange = b.topology.host_exchange_name(h.host)
        bad = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, deadly, "port-1", contract.COMPLETED, h.host),
            "poison-test")
        goods = [_good(h.host) for _ in range(6)]
        for g in goods[:3]:
            raw.publish(exchange, KEY, contract.encode(g), message_id=g.id)
        raw.publish(exchange, KEY, contract.encode(bad), message_id=bad.id,
                    application_headers={"pad": "A" * 130_900})
        for g in goods[3:]:
            raw.publish(exchange, KEY, contract.encode(g), message_id=g.id)
        dead = get_dead_letter(b, timeout=60)
        assert _header(dead, contract.HEADER_REASON) == contract.REASON_POISON
        assert dead.properties["message_id"] == bad.id
        assert _header(dead, inbound.HEADER_CUT)
        wait_for(lambda: set(delivered) == {g.id for g in goods}, 30,
                 what="every good event delivered")
        wait_for(lambda: h.queue_depth() == 0, 10, what="an empty host queue")
        assert len(kills) == 3
        assert h.consumer.stats["dead_lettered"] == 1
        _no_more_dead_letters(b)
    finally:
        h.stop()
        raw.close()
        b.cleanup()


# --- a consumer the broker forgot to cancel -------------------------------------

@pytest.fixture
def cancels_lost(monkeypatch):
    """The broker's basic.cancel never reaches the consumer: what RabbitMQ
    3.10 does on 1 deletion of a quorum queue in 10 (seen by
    tests/chaos/test_cluster_chaos.py), made certain here."""
    from router.bus import transport
    monkeypatch.setattr(transport.Channel, "_on_basic_cancel",
                        lambda self, consumer_tag: None)


@pytest.mark.parametrize("declared_again", [True, False],
                         ids=["declared-again", "still-gone"])
def test_a_host_queue_deleted_without_a_cancel_is_consumed_again(
        bus, raw, cancels_lost, declared_again):
    """Its queue deleted (and maybe declared again by someone else) without
    a cancel, the consumer waited on the gone queue for the rest of its
    connection: the host's events waited in the new queue. Idle, it asks
    for its queue every consume_check seconds; while the queue is there
    with it consuming, its session carries on."""
    host = HostEvents(bus, consume_check=0.3)
    try:
        consumer = host.consumer
        exchange = bus.topology.host_exchange_name(host.host)
        time.sleep(1.5)                 # idle: checked, nothing ends
        _one_session(consumer)
        queue = bus.topology.host_queue_name(host.host)
        bus.channel().queue_delete(queue)
        if declared_again:
            bus.declare_host(host.host)
        wait_for(lambda: consumer.stats["sessions"] == 2
                 and consumer.ready.is_set(), 10,
                 what="a new session consuming the host's queue")
        _publish_good(raw, exchange, host.host)
        wait_for(lambda: consumer.stats["held"] == 1, 5,
                 what="the event after the deletion")
    finally:
        host.stop()
