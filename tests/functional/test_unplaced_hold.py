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

import pytest

from router.bus import contract
from tests.conftest import Bus, RunningRouter, collect, queue_depth, wait_for
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


def test_a_held_event_is_routed_when_its_placement_arrives(fast_bus):
    b = fast_bus
    r = RunningRouter(b, unplaced_hold=30.0)
    try:
        server = str(uuid.uuid4()).upper()      # placement's lookup is by lower case
        env = instance_env(server=server)       # no host hint
        publish_env(b, env)
        wait_for(lambda: r.service.stats["unplaced_held"] == 1, 10,
                 what="the event held")
        assert queue_depth(b.url, _host_queue(b)) == 0
        placed = time.monotonic()
        publish_lifecycle(b, "cmp-late", "STARTED", server.lower())
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
        # (back from its tier, it is held again: once or more)
        held = r.service.stats["unplaced_held"]
        assert held >= 1 if hold else held == 0, held
        assert r.service.stats["unplaced_placed"] == 0
        publish_lifecycle(b, "cmp-late", "STARTED", server)
        [msg] = collect(b.url, _host_queue(b), 1, timeout=10)
        assert contract.decode(msg.body).id == env.id
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
        wait_for(lambda: r2.service.stats["unplaced_held"] >= 1, 10,
                 what="the parked event back, held by the next router")
        publish_lifecycle(b, "cmp-late", "STARTED", server)
        [msg] = collect(b.url, _host_queue(b), 1, timeout=10)
        assert contract.decode(msg.body).id == env.id
    finally:
        r2.stop()
    assert r2.service.stats["redelivered"] == 0
