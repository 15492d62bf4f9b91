"""An event with no host yet is routed as soon as its placement arrives
(issue 22, item 4), on the real broker.

Before, an event with no host hint for an instance no compute host had
reported was parked in the retry tiers at once and came back at the end of
its tier (0.5 s, 1, 2, ... 16 s) whenever its placement arrived. Now the
router holds it in hand for `unplaced_hold` and routes it when the lifecycle
fanout names a host; past its time, over the cap or on stop it is parked as
before, never redelivered (a redelivery counts toward poison).
"""

import time
import uuid

import kombu
import pytest

from router.bus import contract
from tests.conftest import (
    REJECT_ALL,
    Bus,
    RunningRouter,
    collect,
    collect_ids,
    queue_depth,
    wait_for,
)
from tests.functional.test_router import instance_env, publish_env, publish_lifecycle

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def fast_bus(bus):
    b = Bus(bus.url, retry_delays_ms=(100, 200, 400))
    b.declare_central()
    b.declare_host("cmp-late")
    yield b
    b.cleanup()


def _host_queue(b):
    return b.topology.host_queue_name("cmp-late")


def _placed_then_delivered(b, server, env):
    """cmp-late's agent reports `server`; its event reaches cmp-late."""
    publish_lifecycle(b, "cmp-late", "STARTED", server)
    [msg] = collect(b.url, _host_queue(b), 1, timeout=10)
    assert contract.decode(msg.body).id == env.id
    return msg


def test_a_held_event_is_routed_when_its_placement_arrives(fast_bus):
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=30.0)
    try:
        server = str(uuid.uuid4())
        env = instance_env(server=server)       # no host hint
        publish_env(b, env)
        wait_for(lambda: r.service.stats["unplaced_held"] == 1, 10,
                 what="the event held")
        assert queue_depth(b.url, _host_queue(b)) == 0
        placed = time.monotonic()
        publish_lifecycle(b, "cmp-late", "STARTED", server)
        [msg] = collect(b.url, _host_queue(b), 1, timeout=10)
        took = time.monotonic() - placed
        assert contract.decode(msg.body).id == env.id
        assert msg.headers[contract.HEADER_PUBLISHER] == "guest"
        # routed from the hand, not from a retry tier
        assert r.service.stats["retried"] == 0, dict(r.service.stats)
        assert r.service.stats["unplaced_placed"] == 1
        assert took < 1.0, f"{took:.2f}s from placement to the host queue"
        # its ingress delivery settled: nothing left to redeliver
        wait_for(lambda: queue_depth(b.url, b.topology.router_queue_name) == 0,
                 10, what="the router queue empty")
    finally:
        r.stop()
    assert r.service.stats["redelivered"] == 0


@pytest.mark.parametrize("hold", [0.3, 0.0], ids=["held-then-parked", "off"])
def test_without_placement_it_is_parked_when_its_time_is_up(fast_bus, hold):
    """Past unplaced_hold (or at once with 0) the event takes the retry
    tiers, which still deliver it once placed."""
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=hold)
    try:
        server = str(uuid.uuid4())
        env = instance_env(server=server)
        publish_env(b, env)
        wait_for(lambda: r.service.stats["retried"] >= 1, 10,
                 what="the event parked")
        # (held once, on its first routing; never again from a tier)
        held = r.service.stats["unplaced_held"]
        assert held >= 1 if hold else held == 0, held
        assert r.service.stats["unplaced_placed"] == 0
        _placed_then_delivered(b, server, env)
    finally:
        r.stop()


def test_at_most_a_quarter_of_the_prefetch_is_held(fast_bus):
    """Held events keep prefetch slots every event shares: past the cap
    they are parked at once, and hinted events are never held (a hint is
    the sender's to make up)."""
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=30.0, prefetch=8)
    try:
        servers = [str(uuid.uuid4()) for _ in range(5)]
        for server in servers:
            publish_env(b, instance_env(server=server))
        publish_env(b, instance_env(host="no-such-host"))
        wait_for(lambda: r.service.stats["retried"] >= 4, 10,
                 what="the events over the cap parked")
        assert r.service.stats["unplaced_held"] == 2, dict(r.service.stats)
        # a routed event passes the held ones (their slots are theirs alone)
        bus_env = instance_env(host="cmp-late")
        publish_env(b, bus_env)
        got = collect(b.url, _host_queue(b), 1, timeout=10)
        assert [contract.decode(m.body).id for m in got] == [bus_env.id]
        for server in servers:
            publish_lifecycle(b, "cmp-late", "STARTED", server)
        got = collect(b.url, _host_queue(b), 5, timeout=15)
        assert len(got) == 5
    finally:
        r.stop()


def test_a_stopping_router_parks_what_it_holds(fast_bus):
    """Not given back to the queue (a redelivery, counted toward poison):
    parked, and the next router routes it once placed."""
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=30.0)
    server = str(uuid.uuid4())
    env = instance_env(server=server)
    try:
        publish_env(b, env)
        wait_for(lambda: r.service.stats["unplaced_held"] == 1, 10,
                 what="the event held")
    finally:
        started = time.monotonic()
        r.stop()
    assert time.monotonic() - started < 5, "the held event delayed the stop"
    assert r.service.stats["retried"] == 1, dict(r.service.stats)
    r2 = RunningRouter(b, unplaced_hold=30.0)
    try:
        # back from its tier: parked again, not held (held once is enough)
        wait_for(lambda: r2.service.stats["retried"] >= 1, 10,
                 what="the parked event back at the next router")
        assert r2.service.stats["unplaced_held"] == 0
        _placed_then_delivered(b, server, env)
    finally:
        r2.stop()
    assert r2.service.stats["redelivered"] == 0


def test_a_redelivered_event_routed_past_a_refusing_probation_queue_is_not_held(
        fast_bus, policy):
    """The hostile review of this change: routed past a refusing probation
    queue (its fallback), an unplaced event was held, and the fallback's
    caller then acknowledged its delivery: never routed, parked or
    dead-lettered. Only the first routing of a delivery may hold it."""
    b = fast_bus
    policy(b.topology.probation_queue_name, REJECT_ALL)
    server = str(uuid.uuid4())
    env = instance_env(server=server)
    publish_env(b, env)             # no router yet: it waits in the queue
    with kombu.Connection(b.url) as conn:      # taken, given back unsettled
        assert conn.channel().basic_get(b.topology.router_queue_name,
                                        no_ack=False) is not None
    r = RunningRouter(b, unplaced_hold=30.0, refused_hold=0.5)
    try:
        stats = r.service.stats
        wait_for(lambda: stats["probation_bypassed"] >= 1, 15,
                 what="routed past the probation queue")
        wait_for(lambda: stats["retried"] >= 1, 10, what="parked")
        publish_lifecycle(b, "cmp-late", "STARTED", server)
        [msg] = collect(b.url, _host_queue(b), 1, timeout=15)
        assert contract.decode(msg.body).id == env.id
        assert stats["unplaced_held"] == 0, dict(stats)
    finally:
        r.stop()


def test_a_host_whose_copy_came_back_gets_its_held_events_at_once(fast_bus):
    """A copy for cmp-new came back (no queue bound for it yet) and its
    event waits in the retry tiers. Nothing about that is remembered against the host: once its
    queue is declared, an event held for its placement reaches it the
    moment the lifecycle event names it (with a cached "missing", the
    review's run kept it held for the whole unplaced_hold), and the parked
    copy arrives too."""
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=8.0)
    try:
        stats = r.service.stats
        early = instance_env(host="cmp-new")
        publish_env(b, early)
        wait_for(lambda: stats["returned"] >= 1, 10,
                 what="cmp-new's copy returned")
        b.declare_host("cmp-new")
        server = str(uuid.uuid4())
        env = instance_env(server=server)
        publish_env(b, env)
        wait_for(lambda: stats["unplaced_held"] == 1, 10, what="held")
        placed = time.monotonic()
        publish_lifecycle(b, "cmp-new", "STARTED", server)
        got = collect_ids(b.url, b.topology.host_queue_name("cmp-new"),
                          [env.id], timeout=15)
        took = time.monotonic() - placed
        assert env.id in {m.properties.get("message_id") for m in got}
        assert took < 1.5, f"{took:.2f}s from placement to the host queue"
        assert stats["unplaced_placed"] == 1, dict(stats)
        if early.id not in {m.properties.get("message_id") for m in got}:
            assert collect_ids(b.url, b.topology.host_queue_name("cmp-new"),
                               [early.id], timeout=10)
    finally:
        r.stop()
