"""Nothing a sender does can stop a service: whole AMQP messages as input.

Against the real broker, for each consumer (router ingress, the router's
lifecycle observer, the host consumer): every hostile case and a
hypothesis search over properties x bodies, each bad message followed by a
good one. The consumer must stay alive, the good message must arrive, and
the bad one must be dead-lettered with a precise reason, never
internal-error for input that is merely bad.
"""

import datetime
import json
import socket
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import contract, topology
from router.placement import PlacementTable
from tests.conftest import RunningRouter, collect, queue_depth, report_fault, wait_for
from tests.functional import poison
from tests.functional.waiter_harness import HostEvents, get_dead_letter

pytestmark = pytest.mark.timeout(170)

KEY = "instance.network-vif-plugged"
# What bad input may be dead-lettered as; internal-error is not among them.
BAD_INPUT_REASONS = {contract.REASON_MALFORMED, contract.REASON_INVALID,
                     contract.REASON_TOO_LARGE,
                     contract.REASON_UNSUPPORTED_VERSION}


def _reason(message):
    value = message.headers.get(contract.HEADER_REASON)
    return value.decode() if isinstance(value, bytes) else value


@pytest.fixture
def raw(bus):
    p = poison.RawPublisher(bus.url)
    try:
        yield p
    finally:
        p.close()


def _send_case(raw, exchange, case):
    name, body, props, raw_props, _ = case
    if raw_props is not None:
        raw.publish_raw(exchange, KEY, body, raw_props)
    else:
        raw.publish(exchange, KEY, body, **props)


def _good(host):
    env = contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1", contract.COMPLETED,
        host), "poison-test")
    return env


def _drain_until(bus, queue, wanted_id, timeout=15.0):
    """Take messages from a queue until the one with `wanted_id` came."""
    got = []

    def seen():
        got.extend(collect(bus.url, queue, 50, timeout=0.3))
        return any(m.properties.get("message_id") == wanted_id for m in got)

    wait_for(seen, timeout, interval=0, what=f"message {wanted_id} in {queue}")
    return got


# --- router ingress -------------------------------------------------------------

def test_router_dead_letters_every_poison_case_and_the_next_event_flows(
        bus, router, raw):
    host = "cmp-poison"
    bus.declare_host(host)
    ingress = bus.topology.ingress_exchange_name
    goods, wrong = [], []
    for case in poison.cases(host):
        _send_case(raw, ingress, case)
        goods.append(_good(host))
        raw.publish(ingress, KEY, contract.encode(goods[-1]),
                    message_id=goods[-1].id, content_type="application/json")
        dead = get_dead_letter(bus)
        if _reason(dead) != case[4]:
            wrong.append((case[0], _reason(dead),
                          dead.headers.get(contract.HEADER_DETAIL)))
        assert dead.headers.get(contract.HEADER_DETAIL), case[0]
        assert router.thread.is_alive(), f"router died on: {case[0]}"
    assert wrong == []
    routed = collect(bus.url, bus.topology.host_queue_name(host), len(goods))
    assert [contract.decode(m.body).id for m in routed] == [g.id for g in goods]
    assert router.service.ready.is_set()
    assert router.service.stats[f"dead_lettered:{contract.REASON_INTERNAL}"] == 0
    report_fault("poison cases at the router (each followed by a good event)",
                 sent=len(goods), good_delivered=len(routed),
                 dead_lettered=len(goods), internal_errors=0)

    # A router started afterwards finds nothing poisonous on the same queues.
    router.stop()
    second = RunningRouter(bus)
    try:
        after = _good(host)
        raw.publish(ingress, KEY, contract.encode(after), message_id=after.id)
        [m] = collect(bus.url, bus.topology.host_queue_name(host), 1)
        assert m.properties["message_id"] == after.id
        assert second.thread.is_alive()
        assert queue_depth(bus.url, bus.topology.router_queue_name) == 0
    finally:
        second.stop()
    router.thread.join(0)     # the fixture's stop() is harmless now


def _placement_learned(bus, raw, routers, what):
    """A STARTED on the lifecycle fanout for a new instance on cmp-life;
    every router's placement has it. Returns the instance."""
    server = str(uuid.uuid4())
    started = contract.envelope(contract.LifecycleEvent(
        server, "cmp-life", "STARTED", 2, 0, 1), "agent")
    raw.publish(bus.topology.lifecycle_exchange_name, "", contract.encode(started),
                message_id=started.id)
    for r in routers:
        wait_for(lambda r=r: r.service.placement.hosts_for(server), 10,
                 what=f"placement learned {what}")
    return server


# --- a routing key that is not UTF-8 ------------------------------------------------
# The broker routes it (the network user's topic permission ^instance\.
# matches b"instance.\xff"); py-amqp decoded it in the frame reader and
# raised there: the session failed before any decode of ours, on every
# delivery, every router; on quorum queues the good events beside it were
# charged the redeliveries and dead-lettered delivery_limit.

BAD_KEYS = [b"instance.\xff\xfe", b"instance.\xc3", b"instance." + b"\xff" * 200]


@pytest.mark.parametrize("key", BAD_KEYS, ids=["two-bytes", "cut-sequence", "long"])
def test_a_routing_key_that_is_not_utf8_is_dead_lettered_and_the_next_flows(
        bus, router, raw, key):
    host = "cmp-rk"
    bus.declare_host(host)
    ingress = bus.topology.ingress_exchange_name
    bad = _good(host)
    raw.publish(ingress, key, contract.encode(bad), message_id=bad.id,
                content_type="application/json")
    good = _good(host)
    raw.publish(ingress, KEY, contract.encode(good), message_id=good.id,
                content_type="application/json")
    dead = get_dead_letter(bus)
    assert dead.properties["message_id"] == bad.id
    assert _reason(dead) == contract.REASON_MALFORMED
    assert "routing key is not UTF-8" in dead.headers[contract.HEADER_DETAIL]
    routed = collect(bus.url, bus.topology.host_queue_name(host), 2, timeout=5)
    assert [m.properties["message_id"] for m in routed] == [good.id]
    stats = router.service.stats
    assert stats["sessions"] == 1 and not stats["failures"], dict(stats)
    assert stats["redelivered"] == 0


def test_a_lifecycle_routing_key_that_is_not_utf8_costs_the_routers_nothing(
        bus, raw):
    """A compromised host may write the lifecycle fanout: each such message
    cost every router's placement consumer its session."""
    bus.declare_central()
    bus.declare_host("cmp-life")
    routers = [RunningRouter(bus), RunningRouter(bus)]
    try:
        fanout = bus.topology.lifecycle_exchange_name
        for key in BAD_KEYS:
            raw.publish(fanout, key, b"{}")
        _placement_learned(bus, raw, routers, "after the bad keys")
        for r in routers:
            stats = r.service.stats
            assert stats["sessions"] == 1 and not stats["failures"], dict(stats)
            assert stats["lifecycle_invalid"] == len(BAD_KEYS), dict(stats)
    finally:
        for r in routers:
            r.stop()


# --- hypothesis over AMQP properties x bodies -----------------------------------

_text = st.text(max_size=40)
# No infinite floats: RabbitMQ 3.10 itself cannot parse a header table with
# one (function_clause in rabbit_binary_parser) and closes the publisher's
# channel with 541, so such a message never reaches a consumer. (Which is
# also why inbound.safe_headers drops them before a dead-letter copy.)
_header_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=20), _text,
    st.decimals(min_value=-10 ** 6, max_value=10 ** 6, places=2),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2),
                 max_value=datetime.datetime(2200, 1, 1)))
_headers = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.recursive(_header_scalars,
                 lambda inner: st.one_of(st.lists(inner, max_size=3),
                                         st.dictionaries(st.text(min_size=1, max_size=8),
                                                         inner, max_size=3)),
                 max_leaves=8),
    max_size=5)
_properties = st.fixed_dictionaries({}, optional={
    "content_type": st.one_of(st.sampled_from([
        "application/json", "application/data", "text/plain",
        "application/json; charset=utf-8", "application/x-msgpack",
        "application/json; charset=koi8-r", ""]), _text),
    "content_encoding": st.one_of(st.sampled_from([
        "utf-8", "binary", "gzip", "idna", "base64", "rot13", "UTF-8", ""]), _text),
    "application_headers": _headers,
    "message_id": _text,
    "correlation_id": _text,
    "type": _text,
    "app_id": _text,
    "priority": st.integers(0, 9),
    "timestamp": st.integers(0, 2 ** 40),
})


def _bodies(host):
    envelope = st.builds(lambda: json.loads(poison.event_body(host)))

    def mutate(doc, key, value):
        doc = dict(doc)
        doc[key] = value
        return json.dumps(doc).encode()

    return st.one_of(
        st.binary(max_size=200),
        st.just(b""),
        st.integers(1, 40_000).map(lambda n: b"[" * n + b"]" * n),
        st.builds(mutate, envelope,
                  st.sampled_from(["version", "id", "kind", "created_at",
                                   "payload", "producer"]),
                  st.one_of(st.none(), st.integers(), _text,
                            st.lists(st.integers(), max_size=3))),
        envelope.map(lambda d: json.dumps(d).encode()),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )


def _fuzz_consumer(bus, raw, exchange, host, data, alive, arrived):
    """Publish data's messages, each followed by a good event; check both."""
    props = data.draw(_properties, label="properties")
    body = data.draw(_bodies(host), label="body")
    raw.publish(exchange, KEY, body, **props)
    good = _good(host)
    raw.publish(exchange, KEY, contract.encode(good), message_id=good.id)
    wait_for(lambda: arrived(good.id), 30, interval=0.005,
             what=f"the good event after a fuzzed one: body {body[:80]!r}, "
                  f"properties {props!r}"[:600])
    assert alive()


def _check_dead_letters(bus):
    dead = collect(bus.url, bus.topology.dead_letter_queue_name, 10_000,
                   timeout=1.0)
    reasons = [_reason(m) for m in dead]
    assert set(reasons) <= BAD_INPUT_REASONS, reasons
    for m in dead:
        assert m.headers.get(contract.HEADER_DETAIL)
    return len(dead)


def test_router_survives_fuzzed_properties_and_bodies(bus, router, raw):
    host = "cmp-fuzz"
    bus.declare_host(host)
    queue = bus.topology.host_queue_name(host)
    seen_ids = set()
    examples = []

    def arrived(msg_id):
        for m in collect(bus.url, queue, 100, timeout=0.2):
            seen_ids.add(m.properties.get("message_id"))
        return msg_id in seen_ids

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        examples.append(1)
        _fuzz_consumer(bus, raw, bus.topology.ingress_exchange_name, host, data,
                       router.thread.is_alive, arrived)

    run()
    dead = _check_dead_letters(bus)
    assert router.service.stats[f"dead_lettered:{contract.REASON_INTERNAL}"] == 0
    report_fault("fuzzed AMQP properties x bodies at the router",
                 examples=len(examples), dead_lettered=dead,
                 internal_errors=0, router_alive=router.thread.is_alive())


# --- a message that keeps killing its router is set aside as poison -------------

class _DeadlyPlacement(PlacementTable):
    """Drops the router's connection whenever it routes one instance: what a
    message that crashes its router does, without a real crash."""

    def __init__(self, deadly):
        super().__init__()
        self.deadly = deadly
        self.hits = 0

    def hosts_for(self, instance_uuid):
        if instance_uuid == self.deadly:
            self.hits += 1
            raise ConnectionResetError("simulated crash while routing")
        return super().hosts_for(instance_uuid)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_message_that_keeps_killing_routers_is_dead_lettered_poison(queue_type):
    from tests.conftest import BROKER_URL, Bus
    b = Bus(BROKER_URL, queue_type=queue_type)
    b.declare_central()
    b.declare_host("cmp-ok")
    deadly = str(uuid.uuid4())
    placement = _DeadlyPlacement(deadly)
    from router.service import RouterService, RouterSettings
    svc = RouterService(RouterSettings(transport_url=b.url, topology=b.topology,
                                       redelivery_limit=3), placement=placement)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    raw = poison.RawPublisher(b.url)
    try:
        assert svc.ready.wait(15)
        bad = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, deadly, "port-1"), "poison-test")
        raw.publish(b.topology.ingress_exchange_name, KEY, contract.encode(bad),
                    message_id=bad.id)
        # innocents in flight beside it, each session it kills
        innocents = [_good("cmp-ok") for _ in range(20)]
        for good in innocents:
            raw.publish(b.topology.ingress_exchange_name, KEY,
                        contract.encode(good), message_id=good.id)
        dead = get_dead_letter(b, timeout=60)
        assert _reason(dead) == contract.REASON_POISON
        assert contract.decode(dead.body).id == bad.id
        got = _drain_until(b, b.topology.host_queue_name("cmp-ok"),
                           innocents[-1].id, 30)
        got_ids = {m.properties.get("message_id") for m in got}
        got_ids |= {m.properties.get("message_id") for m in collect(
            b.url, b.topology.host_queue_name("cmp-ok"), 20, timeout=3)}
        assert got_ids == {g.id for g in innocents}
        # and none of them was dead-lettered with it (quorum's own delivery
        # count, which the broker also enforces, counts them too)
        assert collect(b.url, b.topology.dead_letter_queue_name, 1, timeout=2) == []
        assert thread.is_alive()
        wait_for(svc.ready.is_set, 15, what="router consuming again")
        assert queue_depth(b.url, b.topology.router_queue_name) == 0
        report_fault(f"message killing its router every time ({queue_type} queue)",
                     deliveries_before_poison=placement.hits,
                     dead_lettered="poison", good_delivered=len(innocents),
                     innocents_dead_lettered=0, lost=0)
        assert placement.hits == 3
    finally:
        svc.stop()
        thread.join(20)
        raw.close()
        b.cleanup()


# --- the router's lifecycle observer ---------------------------------------------

def test_lifecycle_fanout_poison_does_not_stop_routers(bus, raw):
    bus.declare_central()
    bus.declare_host("cmp-life")
    routers = [RunningRouter(bus), RunningRouter(bus)]
    try:
        fanout = bus.topology.lifecycle_exchange_name
        for case in poison.cases("cmp-life"):
            _send_case(raw, fanout, case)
        # Placement still works afterwards: a lifecycle event teaches the
        # routers where an instance is, and a hint-less event gets there.
        server = _placement_learned(bus, raw, routers, "after the poison")
        for r in routers:
            assert r.thread.is_alive() and r.service.ready.is_set()
            assert r.service.stats["lifecycle_invalid"] == len(poison.cases("cmp-life"))
        hintless = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, "port-1"), "poison-test")
        raw.publish(bus.topology.ingress_exchange_name, KEY,
                    contract.encode(hintless), message_id=hintless.id)
        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-life"), 1)
        assert m.properties["message_id"] == hintless.id
    finally:
        for r in routers:
            r.stop()


# --- the host consumer -------------------------------------------------------------

def test_host_consumer_dead_letters_every_poison_case_and_keeps_consuming(
        bus, host, raw):
    exchange = bus.topology.host_exchange_name(host.host)
    wrong = []
    for n, case in enumerate(poison.cases(host.host), 1):
        _send_case(raw, exchange, case)
        good = _good(host.host)
        raw.publish(exchange, KEY, contract.encode(good), message_id=good.id)
        dead = get_dead_letter(bus)
        if _reason(dead) != case[4]:
            wrong.append((case[0], _reason(dead)))
        wait_for(lambda n=n: host.consumer.stats["held"] == n, 10,
                 what=f"the good event after {case[0]!r}")
        assert host.thread.is_alive() and host.consumer.ready.is_set(), case[0]
    assert wrong == []
    assert host.consumer.stats["failures"] == 0
    report_fault("poison cases at a host consumer (each followed by a good event)",
                 sent=len(poison.cases(host.host)),
                 good_delivered=len(poison.cases(host.host)), internal_errors=0)


def test_host_consumer_survives_fuzzed_properties_and_bodies(bus, host, raw):
    exchange = bus.topology.host_exchange_name(host.host)
    delivered = set()
    original = host.registry.deliver

    def deliver(event, message_id, **kwargs):
        delivered.add(message_id)
        return original(event, message_id, **kwargs)

    host.consumer.deliver = deliver
    examples = []

    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        examples.append(1)
        _fuzz_consumer(bus, raw, exchange, host.host, data,
                       lambda: host.thread.is_alive() and host.consumer.ready.is_set(),
                       lambda msg_id: msg_id in delivered)

    run()
    dead = _check_dead_letters(bus)
    assert host.consumer.stats["failures"] == 0
    report_fault("fuzzed AMQP properties x bodies at a host consumer",
                 examples=len(examples), dead_lettered=dead, internal_errors=0)


# --- supervision: a consumer that fails anyway is restarted, never silent ----------

class _FlakyTopology(topology.Topology):
    """Raises (a bug, not a broker error) the first `failures` times."""

    def __init__(self, failures, **kwargs):
        super().__init__(**kwargs)
        self.failures = failures

    def for_host(self, host):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("simulated bug in the consumer")
        return super().for_host(host)


def test_a_failing_host_consumer_is_restarted_and_says_so(bus, caplog):
    bus.declare_central()
    host = f"cmp-{uuid.uuid4().hex[:8]}"
    bus.declare_host(host)
    flaky = _FlakyTopology(2, prefix=bus.topology.prefix)
    failures = []
    consumer = HostConsumer(HostConsumerSettings(
        host=host, transport_url=bus.url, topology=flaky),
        lambda event, message_id: "held", on_failure=failures.append)
    thread = consumer.start()
    try:
        wait_for(consumer.ready.is_set, 15, what="the consumer after restarts")
        assert [str(e) for e in failures] == ["simulated bug in the consumer"] * 2
        assert consumer.stats["failures"] == 2
        assert consumer.health() == (True, "consuming")
        errors = [r for r in caplog.records
                  if r.levelname == "ERROR" and "restarting" in r.getMessage()]
        assert len(errors) == 2 and errors[0].exc_info is not None
    finally:
        consumer.stop()
        thread.join(15)
    assert not thread.is_alive()


class _FlakyPlacement(PlacementTable):
    """Fails (a bug, not a broker error) while a session starts, twice."""

    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    def connected(self, window):
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("simulated bug in the router")
        return super().connected(window)


def test_a_failing_router_session_is_restarted_and_says_so(bus, caplog):
    from router.service import RouterService, RouterSettings
    bus.declare_central()
    bus.declare_host("cmp-sup")
    svc = RouterService(RouterSettings(transport_url=bus.url, topology=bus.topology),
                        placement=_FlakyPlacement(2))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        wait_for(svc.ready.is_set, 20, what="the router after restarts")
        assert svc.stats["failures"] == 2
        assert svc.health() == (True, "consuming")
        errors = [r for r in caplog.records
                  if r.levelname == "ERROR" and "restarting" in r.getMessage()]
        assert len(errors) == 2 and errors[0].exc_info is not None
        good = _good("cmp-sup")
        raw = poison.RawPublisher(bus.url)
        try:
            raw.publish(bus.topology.ingress_exchange_name, KEY,
                        contract.encode(good), message_id=good.id)
        finally:
            raw.close()
        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-sup"), 1)
        assert m.properties["message_id"] == good.id
    finally:
        svc.stop()
        thread.join(20)
    assert not thread.is_alive()


def test_a_message_that_keeps_killing_a_host_consumer_is_poison_alone(bus, raw):
    """The messages in flight beside it are not counted with it: after a
    session that ended badly the consumer takes one message at a time."""
    bus.declare_central()
    deadly = str(uuid.uuid4())
    delivered = []

    def deliver(event, message_id, **kwargs):
        if event.server_uuid == deadly:
            # What a message that kills its consumer does, without a crash:
            # the connection dies before the message is acknowledged.
            h.consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
            return "delivered"
        delivered.append(message_id)
        return "delivered"

    h = HostEvents(bus, deliver=deliver, redelivery_limit=3)
    try:
        exchange = bus.topology.host_exchange_name(h.host)
        bad = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, deadly, "port-1", contract.COMPLETED, h.host),
            "poison-test")
        raw.publish(exchange, KEY, contract.encode(bad), message_id=bad.id)
        goods = [_good(h.host) for _ in range(5)]
        for g in goods:
            raw.publish(exchange, KEY, contract.encode(g), message_id=g.id)
        dead = get_dead_letter(bus, timeout=60)
        assert _reason(dead) == contract.REASON_POISON
        assert dead.properties["message_id"] == bad.id
        wait_for(lambda: set(delivered) == {g.id for g in goods}, 30,
                 what="every good event delivered")
        assert h.consumer.stats["dead_lettered"] == 1
        wait_for(lambda: h.queue_depth() == 0, 10, what="an empty host queue")
    finally:
        h.stop()


def test_router_lifecycle_observer_survives_fuzzed_properties_and_bodies(bus, router, raw):
    """The lifecycle fanout: anyone with write on it (every compute host)."""
    fanout = bus.topology.lifecycle_exchange_name
    examples = []

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        examples.append(1)
        props = data.draw(_properties, label="properties")
        body = data.draw(_bodies("cmp-life"), label="body")
        raw.publish(fanout, "", body, **props)
        server = str(uuid.uuid4())
        good = contract.envelope(contract.LifecycleEvent(
            server, "cmp-life", "STARTED", 2, 0, len(examples)), "agent")
        raw.publish(fanout, "", contract.encode(good), message_id=good.id)
        wait_for(lambda: router.service.placement.hosts_for(server), 15,
                 interval=0.005, what="placement learned after a fuzzed message")
        assert router.thread.is_alive() and router.service.ready.is_set()

    run()
    assert router.service.stats["lifecycle_errors"] == 0
    report_fault("fuzzed AMQP properties x bodies on the lifecycle fanout",
                 examples=len(examples),
                 ignored=router.service.stats["lifecycle_invalid"],
                 router_alive=router.thread.is_alive())
