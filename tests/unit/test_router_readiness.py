"""When the router's placement may say "unknown" (issue 19, item 5). Pure:
an injected clock, the PlacementTable the service and REST share."""

from hypothesis import given, settings
from hypothesis import strategies as st

from router.bus import contract
from router.placement import PlacementTable
from router.readiness import NOT_CONNECTED_RETRY_AFTER, Readiness
from tests.unit.clock import Clock

UUID = "0f5d3c1e-2b1a-4c9e-8f00-123456789abc"


def table(clock):
    return PlacementTable(readiness=Readiness(clock=clock))


def test_never_connected_is_not_ready_however_long_it_lasts():
    clock = Clock()
    t = table(clock)
    for _ in range(5):
        assert t.unready() == ("the router is not connected to the broker",
                               NOT_CONNECTED_RETRY_AFTER)
        clock.now += 3600
    assert t.is_warming()


def test_a_fresh_router_warms_for_the_window_after_it_connected():
    clock = Clock()
    t = table(clock)
    clock.now += 100            # an outage first: the window starts at connect
    t.connected(5.0)
    t.replace_host("cmp-1", [(UUID, "STARTED")])
    why, retry_after = t.unready()
    assert "warming up" in why and retry_after == 5
    clock.now += 4.2
    assert t.unready()[1] == 1
    clock.now += 0.8
    assert t.ready() and not t.is_warming()


def test_a_reconnect_is_warm_once_every_host_heard_of_has_snapshotted():
    clock = Clock()
    t = table(clock)
    t.connected(60.0)
    t.replace_host("cmp-1", [(UUID, "STARTED")])
    t.observe(contract.LifecycleEvent(UUID, "cmp-2", "STARTED", 0, 0, 1))
    clock.now += 60
    assert t.ready()
    t.disconnected()
    assert t.unready()[0] == "the router is not connected to the broker"
    t.connected(60.0)
    assert "2 of 2 hosts" in t.unready()[0]
    t.replace_host("cmp-2", [])
    assert "1 of 2 hosts" in t.unready()[0]
    t.replace_host("cmp-1", [(UUID, "STARTED")])
    assert t.ready()            # well before the 60 s window
    # A host that never answers holds it up for the window only.
    t.disconnected()
    t.connected(60.0)
    t.replace_host("cmp-1", [])
    clock.now += 59.9
    assert not t.ready()
    clock.now += 0.1
    assert t.ready()


_steps = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.sampled_from([0.0, 2.0, 5.0])),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("snapshot"), st.sampled_from(["h1", "h2", "h3"])),
    st.tuples(st.just("lifecycle"), st.sampled_from(["h1", "h2", "h3"])),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 5.0, 100.0])),
), max_size=30)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_ready_only_while_connected_and_never_past_the_window(steps):
    """After every step, exactly: ready iff connected and either the window
    since the connect has passed or every host heard of before the connect
    (at least one) has sent a snapshot since."""
    clock = Clock()
    t = table(clock)
    connected_at = window = None
    expected, since = set(), set()
    heard = set()
    for step in steps:
        kind = step[0]
        if kind == "connect":
            t.connected(step[1])
            connected_at, window = clock.now, step[1]
            expected, since = set(heard), set()
        elif kind == "disconnect":
            t.disconnected()
            connected_at = None
        elif kind == "snapshot":
            t.replace_host(step[1], [])
            heard.add(step[1])
            since.add(step[1])
        elif kind == "lifecycle":
            t.observe(contract.LifecycleEvent(UUID, step[1], "STARTED", 0, 0, 1))
            heard.add(step[1])
        else:
            clock.now += step[1]
        if connected_at is None:
            assert not t.ready()
        elif clock.now - connected_at >= window or (expected and expected <= since):
            assert t.ready()
        else:
            assert 1 <= t.unready()[1] <= max(1, window)
