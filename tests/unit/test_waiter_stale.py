"""Late events of a finished wait must not satisfy a later one (issue 11, 7a),
judged by what the receiving host observed (issue 19, item 6).

The registry with an injected monotonic clock: no broker, no threads. No
test here gives the registry a sender's timestamp: it takes none.
"""

import uuid

import pytest

from compute import events, waiting
from compute.events import InstanceEvents
from router.bus.contract import (
    COMPLETED,
    NETWORK_CHANGED,
    VIF_PLUGGED,
    VIF_UNPLUGGED,
    InstanceEvent,
)
from tests.unit.clock import Clock


@pytest.fixture
def clock():
    return Clock(5000.0)


@pytest.fixture
def registry(clock):
    return InstanceEvents(hold_seconds=300.0, clock=clock)


def server():
    return str(uuid.uuid4())


def ev(server_uuid, tag="port-1", name=VIF_PLUGGED, revision=None):
    return InstanceEvent(name, server_uuid, tag, COMPLETED, revision=revision)


def mid():
    return uuid.uuid4().hex


def timed_out_wait(registry, clock, inst, seconds=300.0):
    """A wait for (vif-plugged, port-1) that runs into its timeout."""
    with pytest.raises(waiting.InstanceEventTimeout):
        with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "port-1")],
                                              timeout=0):
            clock.now += seconds


def test_late_event_before_the_retry_prepares_is_stale(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    clock.now += 30                     # the event reaches the host late
    assert registry.deliver(ev(inst), "m-late") == events.STALE
    assert registry.held == 0
    prepared = registry.prepare(inst, VIF_PLUGGED, "port-1")
    assert prepared.how is None         # the retry waits for its own event
    assert registry.deliver(ev(inst), "m-new") == events.DELIVERED
    assert prepared.how == waiting.RECEIVED
    assert registry.stats["stale"] == 1


def test_retrys_own_event_wakes_it(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    clock.now += 5
    retry = registry.prepare(inst, VIF_PLUGGED, "port-1")
    clock.now += 1
    assert registry.deliver(ev(inst), "m-new") == events.DELIVERED
    assert retry.how == waiting.RECEIVED


def test_late_event_after_the_retry_woke_is_not_held_for_a_third_wait(registry,
                                                                      clock):
    # Without revisions the first event after the retry prepared cannot be
    # told from the late one; it wakes the retry, and the debt stands.
    inst = server()
    timed_out_wait(registry, clock, inst)
    retry = registry.prepare(inst, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(inst), "m-1") == events.DELIVERED
    assert retry.how == waiting.RECEIVED
    assert registry.deliver(ev(inst), "m-2") == events.STALE
    assert registry.prepare(inst, VIF_PLUGGED, "port-1").how is None


def test_late_event_after_the_retrys_own_is_stale_by_revision(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    first = registry.prepare(inst, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(inst, revision=9), "m-new") == events.DELIVERED
    registry.discard(first)
    second = registry.prepare(inst, VIF_PLUGGED, "port-1")
    # The first wait's plug, revision 5, arrives with a third wait pending.
    assert registry.deliver(ev(inst, revision=5), "m-late") == events.STALE
    assert second.how is None


def test_a_plug_older_than_an_unplug_heard_is_stale_whoever_waits(registry,
                                                                   clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    retry = registry.prepare(inst, VIF_PLUGGED, "port-1")
    # The retry replugs: the unplug (revision 6) overtakes the old plug (5).
    assert registry.deliver(ev(inst, name=VIF_UNPLUGGED, revision=6),
                            mid()) == events.HELD
    assert registry.deliver(ev(inst, revision=5), mid()) == events.STALE
    assert retry.how is None
    assert registry.deliver(ev(inst, revision=7), mid()) == events.DELIVERED
    # Another family of the same port is not ordered against the plugs.
    assert registry.deliver(ev(inst, name=NETWORK_CHANGED, revision=3),
                            mid()) == events.HELD


def test_a_newer_revision_drops_an_older_held_event_of_the_family(registry):
    inst = server()
    assert registry.deliver(ev(inst, name=VIF_UNPLUGGED, revision=4),
                            mid()) == events.HELD
    assert registry.deliver(ev(inst, revision=5), mid()) == events.HELD
    assert registry.held == 1 and registry.stats["early_superseded"] == 1
    assert registry.prepare(inst, VIF_UNPLUGGED, "port-1").how is None
    assert registry.prepare(inst, VIF_PLUGGED, "port-1").how == waiting.EARLY


def test_same_revision_again_is_stale(registry):
    inst = server()
    prepared = registry.prepare(inst, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(inst, revision=5), mid()) == events.DELIVERED
    # A second publisher of the same port revision (new message id).
    assert registry.deliver(ev(inst, revision=5), mid()) == events.STALE
    assert prepared.how == waiting.RECEIVED and registry.held == 0


def test_event_before_any_wait_ended_is_held(registry, clock):
    inst = server()
    assert registry.deliver(ev(inst), mid()) == events.HELD
    clock.now += 299
    assert registry.prepare(inst, VIF_PLUGGED, "port-1").how == waiting.EARLY


def test_held_event_counts_from_its_arrival_not_its_age(registry, clock):
    inst = server()
    assert registry.deliver(ev(inst), mid()) == events.HELD
    clock.now += 300
    assert registry.prepare(inst, VIF_PLUGGED, "port-1").how is None
    assert registry.stats["early_expired"] == 1


def test_exit_early_ends_the_wait_so_the_late_event_is_stale(registry, clock):
    inst = server()
    with registry.wait_for_instance_event(inst, [(VIF_PLUGGED, "port-1")],
                                          timeout=10) as wait:
        clock.now += 5
        wait.exit_early()               # the port was found active already
    clock.now += 5
    assert registry.deliver(ev(inst), "m") == events.STALE


def test_clear_ends_the_waits_of_that_instance(registry, clock):
    inst = server()
    registry.prepare(inst, VIF_PLUGGED, "port-1")
    clock.now += 5
    registry.clear(inst)
    assert registry.deliver(ev(inst), "m") == events.STALE


def test_other_tags_and_instances_are_not_affected(registry, clock):
    inst, other = server(), server()
    timed_out_wait(registry, clock, inst)
    assert registry.deliver(ev(inst, "port-2"), "m1") == events.HELD
    assert registry.deliver(ev(other), "m2") == events.HELD


def test_only_one_late_event_is_owed_per_ended_wait(registry, clock):
    inst = server()
    timed_out_wait(registry, clock, inst)
    assert registry.deliver(ev(inst), "m-late") == events.STALE
    assert registry.deliver(ev(inst), "m-next") == events.HELD


def test_a_waiter_prepared_before_the_end_gets_the_event_and_pays(registry,
                                                                   clock):
    inst = server()
    first = registry.prepare(inst, VIF_PLUGGED, "port-1")
    second = registry.prepare(inst, VIF_PLUGGED, "port-1")
    clock.now += 5
    registry.discard(second)            # one of two waits ends
    assert registry.deliver(ev(inst), "m") == events.DELIVERED
    assert first.how == waiting.RECEIVED
    # That was the event the ended wait owed: the next one is new.
    assert registry.deliver(ev(inst), "m2") == events.HELD


def test_memory_of_ended_waits_and_revisions_is_bounded(clock):
    registry = InstanceEvents(max_ended=3, ended_memory_seconds=100.0,
                              clock=clock)
    for r in range(5):
        registry.discard(registry.prepare(server(), VIF_PLUGGED, "p"))
        registry.deliver(ev(server(), revision=r), mid())
    assert len(registry._late) == 6
    clock.now += 101
    registry.discard(registry.prepare(server(), VIF_PLUGGED, "p"))
    assert len(registry._late) == 1


def test_ended_memory_expires(registry, clock):
    registry = InstanceEvents(ended_memory_seconds=900.0, clock=clock)
    inst = server()
    timed_out_wait(registry, clock, inst)
    clock.now += 901
    assert registry.deliver(ev(inst), "m") == events.HELD
