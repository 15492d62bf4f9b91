"""The router on the real broker: routing, dead-letters, retries, placement."""

import json
import uuid

import kombu
import pytest

from router.bus import contract, topology
from router.bus.publishing import BlockingPublisher
from tests.conftest import (
    BROKER_URL,
    Bus,
    RunningRouter,
    collect,
    queue_depth,
    single_user_policy,
)

UUID = "0f5d3c1e-2b1a-4c9e-8f00-123456789abc"


def instance_env(host=None, name="network-vif-plugged", server=None, tag="port-1",
                 status="completed"):
    return contract.envelope(contract.InstanceEvent(
        name, server or str(uuid.uuid4()), tag, status, host), "test")


def publish_raw(bus, body, *, routing_key="instance.network-vif-plugged",
                exchange=None, message_id=None):
    """What any client does: a plain kombu Producer, no evrouter code."""
    with kombu.Connection(bus.url) as conn:
        producer = kombu.Producer(conn.channel())
        producer.publish(body, exchange=exchange or bus.topology.ingress_exchange_name,
                         routing_key=routing_key, delivery_mode=2,
                         message_id=message_id, user_id="guest",
                         content_type="application/json", content_encoding="utf-8",
                         retry=False)


def publish_env(bus, env, exchange=None):
    publish_raw(bus, contract.encode(env),
                routing_key=topology.instance_routing_key(env.payload.name),
                message_id=env.id, exchange=exchange)


def publish_lifecycle(bus, host, transition, server, detail=0, seq=0):
    env = contract.envelope(contract.LifecycleEvent(
        server, host, transition, 0, detail, seq), "agent")
    with kombu.Connection(bus.url) as conn:
        BlockingPublisher(conn, user_id=conn.userid).publish(
            bus.topology.lifecycle_exchange_name, "", contract.encode(env),
            mandatory=False)


def test_plain_kombu_event_lands_on_its_hosts_queue(bus, router):
    bus.declare_host("cmp-a")
    bus.declare_host("cmp-b")
    env = instance_env(host="cmp-a")
    publish_env(bus, env)
    [msg] = collect(bus.url, bus.topology.host_queue_name("cmp-a"), 1)
    assert contract.decode(msg.body) == env
    assert msg.delivery_info["exchange"] == bus.topology.hosts_exchange_name
    assert msg.delivery_info["routing_key"] == "cmp-a"
    assert msg.properties["message_id"] == env.id
    assert msg.properties["delivery_mode"] == 2
    assert msg.headers[contract.HEADER_PUBLISHER] == "guest"
    assert queue_depth(bus.url, bus.topology.host_queue_name("cmp-b")) == 0


BAD_INPUTS = [
    (b"{not json", contract.REASON_MALFORMED),
    (b"\xff\xfe\x00", contract.REASON_MALFORMED),
    (json.dumps({"version": "1.0"}).encode(), contract.REASON_INVALID),
    (json.dumps({**json.loads(contract.encode(instance_env("cmp-a"))),
                 "payload": {"name": "network-vif-exploded",
                             "server_uuid": UUID}}).encode(),
     contract.REASON_INVALID),
    (json.dumps({**json.loads(contract.encode(instance_env("cmp-a"))),
                 "version": "7.0"}).encode(), contract.REASON_UNSUPPORTED_VERSION),
    (b'{"pad": "' + b"x" * 70_000 + b'"}', contract.REASON_TOO_LARGE),
]


def test_bad_input_is_dead_lettered_with_a_reason_and_good_ones_flow(bus, router):
    bus.declare_host("cmp-a")
    goods = []
    for i, (body, _) in enumerate(BAD_INPUTS):
        publish_raw(bus, body, message_id=f"bad-{i}")
        goods.append(instance_env(host="cmp-a"))
        publish_env(bus, goods[-1])
    dead = collect(bus.url, bus.topology.dead_letter_queue_name, len(BAD_INPUTS))
    reasons = {m.properties["message_id"]: m.headers[contract.HEADER_REASON]
               for m in dead}
    assert reasons == {f"bad-{i}": reason for i, (_, reason) in enumerate(BAD_INPUTS)}
    for m in dead:
        assert m.headers[contract.HEADER_DETAIL]
        assert m.body in [b for b, _ in BAD_INPUTS], "dead letter keeps the body"
    routed = collect(bus.url, bus.topology.host_queue_name("cmp-a"), len(goods))
    assert [contract.decode(m.body).id for m in routed] == [g.id for g in goods]
    assert router.thread.is_alive()


def test_event_for_an_unplaced_instance_waits_for_placement(bus):
    bus_fast = Bus(bus.url, retry_delays_ms=(100, 200, 400))
    try:
        bus_fast.declare_central()
        bus_fast.declare_host("cmp-late")
        # the retry tiers (holding it for its placement: test_unplaced_hold)
        r = RunningRouter(bus_fast, unplaced_hold=0.0)
        try:
            server = str(uuid.uuid4())
            env = instance_env(server=server)           # no host hint
            publish_env(bus_fast, env)
            assert collect(bus_fast.url, bus_fast.topology.host_queue_name("cmp-late"),
                           1, timeout=0.5) == []
            assert r.service.stats["retried"] >= 1
            publish_lifecycle(bus_fast, "cmp-late", "STARTED", server)
            [msg] = collect(bus_fast.url,
                            bus_fast.topology.host_queue_name("cmp-late"), 1)
            assert contract.decode(msg.body).id == env.id
            assert msg.headers[contract.HEADER_PUBLISHER] == "guest", \
                "the original publisher survives the retry path"
        finally:
            r.stop()
    finally:
        bus_fast.cleanup()


def test_no_host_is_dead_lettered_after_the_bounded_wait(bus):
    bus_fast = Bus(bus.url, retry_delays_ms=(100, 200))
    try:
        bus_fast.declare_central()
        r = RunningRouter(bus_fast, policy=single_user_policy(no_host_timeout=1.0))
        try:
            env = instance_env()
            hinted = instance_env(host="no-such-host")
            publish_env(bus_fast, env)
            publish_env(bus_fast, hinted)
            dead = collect(bus_fast.url, bus_fast.topology.dead_letter_queue_name, 2)
            reasons = {contract.decode(m.body).id: m.headers[contract.HEADER_REASON]
                       for m in dead}
            assert reasons == {env.id: contract.REASON_NO_HOST,
                               hinted.id: contract.REASON_UNKNOWN_HOST}
            assert r.service.stats["retried"] >= 4
        finally:
            r.stop()
    finally:
        bus_fast.cleanup()


def test_placement_from_the_fanout_covers_both_hosts_of_a_migration(bus, router):
    for h in ("src", "dst"):
        bus.declare_host(h)
    server = str(uuid.uuid4())
    publish_lifecycle(bus, "src", "STARTED", server, seq=1)
    publish_lifecycle(bus, "dst", "STARTED", server, detail=1, seq=1)
    from tests.conftest import wait_for
    wait_for(lambda: len(router.service.placement.hosts_for(server)) == 2,
             what="both hosts placed")
    env = instance_env(server=server)
    publish_env(bus, env)
    for h in ("src", "dst"):
        [m] = collect(bus.url, bus.topology.host_queue_name(h), 1)
        assert contract.decode(m.body).id == env.id


def test_a_host_copy_with_no_queue_is_parked_then_dead_lettered_unknown_host(bus):
    bus.declare_central()
    bus.declare_host("cmp-gone")
    with kombu.Connection(bus.url) as conn:
        conn.channel().queue_delete(bus.topology.host_queue_name("cmp-gone"))
    r = RunningRouter(bus, policy=single_user_policy(bus.url, no_host_timeout=1.0))
    try:
        env = instance_env(host="cmp-gone")
        publish_env(bus, env)
        [m] = collect(bus.url, bus.topology.dead_letter_queue_name, 1)
        assert m.headers[contract.HEADER_REASON] == contract.REASON_UNKNOWN_HOST
        assert "cmp-gone" in m.headers[contract.HEADER_DETAIL]
        assert contract.decode(m.body).id == env.id
        assert r.service.stats["returned"] >= 1
    finally:
        r.stop()


@pytest.mark.parametrize("queue_type", ["quorum"])
def test_quorum_queues_route_the_same(queue_type):
    b = Bus(BROKER_URL, queue_type=queue_type)
    try:
        b.declare_central()
        b.declare_host("cmp-q")
        r = RunningRouter(b)
        try:
            env = instance_env(host="cmp-q")
            publish_env(b, env)
            publish_raw(b, b"garbage", message_id="bad")
            [m] = collect(b.url, b.topology.host_queue_name("cmp-q"), 1)
            assert contract.decode(m.body).id == env.id
            [d] = collect(b.url, b.topology.dead_letter_queue_name, 1)
            assert d.headers[contract.HEADER_REASON] == contract.REASON_MALFORMED
        finally:
            r.stop()
    finally:
        b.cleanup()
