"""Early events of a finished wait must not satisfy a later one (issue 11, 7a).

The registry with an injected clock used for both its monotonic and wall
time: no broker, no threads.
"""

import uuid

import pytest

from compute import events, waiting
from compute.events import InstanceEvents
from router.bus.contract import COMPLETED, VIF_PLUGGED, InstanceEvent
from tests.unit.clock import Clock


@pytest.fixture
def clock():
    return Clock(1_800_000_000.0)


@pytest.fixture
def registry(clock):
    return InstanceEvents(hold_seconds=300.0, max_clock_skew=2.0,
                          clock=clock, wall_clock=clock)


def server():
    return str(uuid.uuid4())


def ev(server_uuid, tag="port-1"):
    return InstanceEvent(VIF_PLUGGED, server_uuid, tag, COMPLETED)


def timed_out_wait(registry, clock, inst, seconds=300.0):
    """A wait for (vif-plugged, port-1) that runs into its timeout."""
    with pytest.raises(waiting.InstanceEventTimeout):
        with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "port-1")],
                                              timeout=0):
            clock.now += seconds


def test_late_event_of_a_timed_out_wait_does_not_satisfy_the_retry(registry, clock):
    inst = server()
    sent_at = clock.now + 10            # the port went up during the first wait
    timed_out_wait(registry, clock, inst)
    clock.now += 30                     # the event reaches the host late
    assert registry.deliver(ev(inst), "m-late", created_at=sent_at) == events.STALE
    assert registry.held == 0
    prepared = registry.prepare(inst, VIF_PLUGGED, "port-1")
    assert prepared.how is None         # the retry waits for its own event
    assert registry.stats["stale"] == 1


def test_late_event_does_not_wake_a_retry_already_prepared(registry, clock):
    inst = server()
    sent_at = clock.now + 10
    timed_out_wait(registry, clock, inst)
    clock.now += 5
    retry = registry.prepare(inst, VIF_PLUGGED, "port-1")
    clock.now += 30
    assert registry.deliver(ev(inst), "m-late", created_at=sent_at) == events.STALE
    assert retry.how is None and registry.pending == 1
    # The retry's own event, created after it started, wakes it.
    assert registry.deliver(ev(inst), "m-new",
                            created_at=clock.now) == events.DELIVERED
    assert retry.how == waiting.RECEIVED


def test_event_before_prepare_after_the_end_still_satisfies(registry, clock):
    # The race OpenStack suffers: the new operation's event before its prepare.
    inst = server()
    timed_out_wait(registry, clock, inst)
    clock.now += 20
    assert registry.deliver(ev(inst), "m-new", created_at=clock.now) == events.HELD
    clock.now += 1
    assert registry.prepare(inst, VIF_PLUGGED, "port-1").how == waiting.EARLY


def test_clock_skew_within_tolerance_is_not_stale(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    ended = clock.now
    clock.now += 1
    # The publisher's clock is 1.5 s behind: its fresh event looks older.
    assert registry.deliver(ev(inst), "m-new", created_at=ended - 1.5) == events.HELD


def test_exit_early_ends_the_wait_so_the_late_event_is_stale(registry, clock):
    inst = server()
    sent_at = clock.now
    clock.now += 1
    with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "port-1")],
                                          timeout=10) as wait:
        clock.now += 5
        wait.exit_early()               # the port was found active already
    clock.now += 5
    assert registry.deliver(ev(inst), "m", created_at=sent_at) == events.STALE


def test_clear_ends_the_waits_of_that_instance(registry, clock):
    inst = server()
    registry.prepare(inst, VIF_PLUGGED, "port-1")
    sent_at = clock.now + 1
    clock.now += 5
    registry.clear(inst)
    assert registry.deliver(ev(inst), "m", created_at=sent_at) == events.STALE


def test_other_tags_and_instances_are_not_affected(registry, clock):
    inst, other = server(), server()
    sent_at = clock.now + 1
    timed_out_wait(registry, clock, inst)
    assert registry.deliver(ev(inst, "port-2"), "m1", created_at=sent_at) == events.HELD
    assert registry.deliver(ev(other), "m2", created_at=sent_at) == events.HELD


def test_without_created_at_events_are_held_as_before(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    assert registry.deliver(ev(inst), "m") == events.HELD


def test_a_waiter_prepared_before_the_end_still_gets_its_event(registry, clock):
    inst = server()
    first = registry.prepare(inst, VIF_PLUGGED, "port-1")
    second = registry.prepare(inst, VIF_PLUGGED, "port-1")
    sent_at = clock.now + 1
    clock.now += 5
    registry.discard(second)            # one of two waits ends
    assert registry.deliver(ev(inst), "m", created_at=sent_at) == events.DELIVERED
    assert first.how == waiting.RECEIVED


def test_memory_of_ended_waits_is_bounded(clock):
    registry = InstanceEvents(max_ended=3, ended_memory_seconds=100.0,
                              clock=clock, wall_clock=clock)
    for _ in range(5):
        registry.discard(registry.prepare(server(), VIF_PLUGGED, "p"))
    assert len(registry._ended) == 3
    clock.now += 101
    registry.discard(registry.prepare(server(), VIF_PLUGGED, "p"))
    assert len(registry._ended) == 1


def test_ended_memory_expires(registry, clock):
    inst = server()
    sent_at = clock.now + 1
    timed_out_wait(registry, clock, inst)
    clock.now += registry.ended_memory_seconds + 1
    assert registry.deliver(ev(inst), "m", created_at=sent_at) == events.HELD
