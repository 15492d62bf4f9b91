"""The instance-event registry, pure: injected clock, no broker, no threads."""

import logging
import uuid

import pytest

from compute import events, waiting
from compute.events import InstanceEvents
from router.bus.contract import (
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    NETWORK_CHANGED,
    VIF_PLUGGED,
    InstanceEvent,
)
from tests.unit.clock import Clock


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(clock):
    return InstanceEvents(hold_seconds=60.0, clock=clock)


def server():
    return str(uuid.uuid4())


def ev(server_uuid, name=VIF_PLUGGED, tag="port-1", status=COMPLETED):
    return InstanceEvent(name, server_uuid, tag, status)


def mid():
    return uuid.uuid4().hex


def test_delivery_resolves_the_prepared_event(registry, clock):
    s = server()
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert registry.pending == 1 and prepared.how is None
    clock.now += 2.5
    event = ev(s)
    assert registry.deliver(event, "m1") == events.DELIVERED
    assert prepared.event is event and prepared.message_id == "m1"
    assert prepared.how == waiting.RECEIVED
    assert prepared.state() == "received after 2.5s (completed)"
    assert prepared.wake.arrived == [prepared]
    assert registry.pending == 0 and registry.stats["delivered"] == 1


def test_an_event_for_another_tag_or_instance_does_not_resolve(registry):
    s = server()
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(s, tag="port-2"), mid()) == events.HELD
    assert registry.deliver(ev(server(), tag="port-1"), mid()) == events.HELD
    assert registry.deliver(ev(s, name=NETWORK_CHANGED), mid()) == events.HELD
    assert prepared.how is None and registry.pending == 1


def test_upper_case_uuid_matches(registry):
    s = server()
    prepared = registry.prepare(s.upper(), VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(s), mid()) == events.DELIVERED
    assert prepared.how == waiting.RECEIVED


def test_early_event_satisfies_a_later_prepare_at_once(registry, clock):
    s = server()
    event = ev(s, status=FAILED)
    assert registry.deliver(event, "early-1") == events.HELD
    assert registry.held == 1 and registry.stats["early_held"] == 1
    clock.now += 59.9
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert prepared.how == waiting.EARLY and prepared.event is event
    assert prepared.message_id == "early-1"
    assert prepared.state() == "received early (failed)"
    assert registry.held == 0 and registry.pending == 0
    assert registry.stats["early_used"] == 1


def test_held_event_expires_after_hold_seconds(registry, clock):
    s = server()
    registry.deliver(ev(s), mid())
    clock.now += 60.0
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert prepared.how is None
    assert registry.held == 0 and registry.stats["early_expired"] == 1


def test_expire_frees_held_events_without_other_traffic(registry, clock):
    for _ in range(3):
        registry.deliver(ev(server()), mid())
    clock.now += 30
    registry.deliver(ev(server()), mid())
    clock.now += 31
    registry.expire()
    assert registry.held == 1 and registry.stats["early_expired"] == 3


def test_held_events_are_bounded_in_number_oldest_dropped(clock, caplog):
    registry = InstanceEvents(max_held=3, clock=clock)
    servers = [server() for _ in range(5)]
    ids = [f"msg-{i}" for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="compute.events"):
        for s, i in zip(servers, ids, strict=True):
            clock.now += 1
            registry.deliver(ev(s), i)
    assert registry.held == 3 and registry.stats["early_dropped"] == 2
    dropped_lines = [r.getMessage() for r in caplog.records]
    assert len(dropped_lines) == 2
    assert "msg-0" in dropped_lines[0] and "msg-1" in dropped_lines[1]
    assert registry.prepare(servers[0], VIF_PLUGGED, "port-1").how is None
    assert registry.prepare(servers[1], VIF_PLUGGED, "port-1").how is None
    for s in servers[2:]:
        assert registry.prepare(s, VIF_PLUGGED, "port-1").how == waiting.EARLY


def test_held_events_are_bounded_in_bytes(clock):
    registry = InstanceEvents(max_held_bytes=4000, clock=clock)
    for _ in range(20):
        registry.deliver(ev(server(), tag="t" * 500), mid())
    assert 1 <= registry.held < 20
    assert registry.stats["early_dropped"] == 20 - registry.held
    assert 0 < registry._held_bytes <= 4000


def test_a_newer_early_event_for_the_same_key_replaces_the_held_one(registry,
                                                                    clock):
    s = server()
    registry.deliver(ev(s, status=FAILED), "first")
    clock.now += 50
    registry.deliver(ev(s, status=COMPLETED), "second")
    assert registry.held == 1 and registry.stats["early_replaced"] == 1
    clock.now += 20       # 70 s after the first, 20 s after the second
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert prepared.message_id == "second"
    assert prepared.event.status == COMPLETED


def test_duplicate_message_id_never_resolves_twice(registry):
    s = server()
    first = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(s), "same") == events.DELIVERED
    second = registry.prepare(s, VIF_PLUGGED, "port-1")
    assert registry.deliver(ev(s, status=FAILED), "same") == events.DUPLICATE
    assert second.how is None, "a redelivery woke a second waiter"
    assert first.wake.arrived == [first]
    assert registry.held == 0, "a redelivery was held for a later prepare"
    assert registry.stats["duplicates"] == 1


def test_duplicate_of_a_held_event_is_not_held_again(registry):
    s = server()
    registry.deliver(ev(s), "same")
    assert registry.prepare(s, VIF_PLUGGED, "port-1").how == waiting.EARLY
    assert registry.deliver(ev(s), "same") == events.DUPLICATE
    assert registry.prepare(s, VIF_PLUGGED, "port-1").how is None


def test_memory_of_seen_ids_is_bounded(clock):
    registry = InstanceEvents(max_seen_ids=2, clock=clock)
    s = server()
    for i in ("a", "b", "c"):
        registry.deliver(ev(s, tag=i), i)
    assert len(registry._seen) == 2
    assert registry.deliver(ev(s, tag="c"), "c") == events.DUPLICATE
    # "a" was forgotten: the bound is what makes it count as new again.
    assert registry.deliver(ev(s, tag="a"), "a") == events.HELD


def test_two_preparers_of_one_key_are_both_resolved(registry):
    s = server()
    one = registry.prepare(s, VIF_PLUGGED, "port-1")
    two = registry.prepare(s, VIF_PLUGGED, "port-1")
    three = registry.prepare(s, VIF_PLUGGED, "port-1")
    registry.discard(two)
    assert registry.pending == 2
    registry.deliver(ev(s), mid())
    assert one.how == three.how == waiting.RECEIVED and two.how is None
    assert registry.pending == 0


def test_discarded_event_is_stale_when_it_arrives(registry):
    # Its wait ended without it: the late event of that wait (see
    # test_waiter_stale.py), not an early one of the next.
    s = server()
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    registry.discard(prepared)
    registry.discard(prepared)      # idempotent
    assert registry.deliver(ev(s), mid()) == events.STALE
    assert prepared.how is None and registry.held == 0
    assert registry.deliver(ev(s), mid()) == events.HELD


def test_in_progress_resolves_like_any_status(registry):
    s = server()
    prepared = registry.prepare(s, VIF_PLUGGED, "port-1")
    registry.deliver(ev(s, status=IN_PROGRESS), mid())
    assert prepared.event.status == IN_PROGRESS


def test_clear_fails_pending_and_drops_held_of_that_instance_only(registry):
    s, other = server(), server()
    a = registry.prepare(s, VIF_PLUGGED, "port-1")
    b = registry.prepare(s, NETWORK_CHANGED, None)
    keep = registry.prepare(other, VIF_PLUGGED, "port-1")
    registry.deliver(ev(s, tag="port-9"), mid())
    registry.deliver(ev(other, tag="port-9"), mid())
    assert registry.clear(s) == 2
    for prepared in (a, b):
        assert prepared.how == waiting.CLEARED
        assert prepared.event.status == FAILED
        assert prepared.event.key == prepared.key
    assert keep.how is None and registry.pending == 1
    assert registry.held == 1
    assert registry.prepare(s, VIF_PLUGGED, "port-9").how is None
    assert registry.prepare(other, VIF_PLUGGED, "port-9").how == waiting.EARLY


def test_cancel_all_fails_everything_and_refuses_new_prepares(registry):
    prepared = [registry.prepare(server(), VIF_PLUGGED, f"p{i}")
                for i in range(5)]
    registry.deliver(ev(server()), mid())
    assert registry.cancel_all() == 5
    assert all(p.how == waiting.CANCELLED and p.event.status == FAILED
               for p in prepared)
    assert registry.pending == 0 and registry.held == 0
    with pytest.raises(waiting.RegistryClosed):
        registry.prepare(server(), VIF_PLUGGED, "p")
    # Left for the next process: not remembered as seen, not held.
    assert registry.deliver(ev(server()), "late") == events.CLOSED
    assert "late" not in registry._seen


def test_pending_event_is_small():
    """The per-event objects keep __slots__ (no per-instance __dict__)."""
    registry = InstanceEvents()
    prepared = registry.prepare(server(), VIF_PLUGGED, "port")
    assert not hasattr(prepared, "__dict__")
    assert not hasattr(prepared.wake, "__dict__")
