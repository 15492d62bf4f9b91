"""Waits in the journal (compute/wait_watch.py) and the diagnosis of a stuck
one (router/stuck_cmd.py): pure, with a registry on a hand-set clock and a
journal that is a list."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute import waiting
from compute.events import DELIVERED, InstanceEvents
from compute.wait_watch import WaitWatch
from router import journal, stuck_cmd
from router.bus import contract
from router.stuck_watch import StuckWaits
from tests.unit.clock import Clock

SERVER = "6f1c2a4e-8d3b-4c55-9a10-2b7e4f0c9d21"
PORT = "port-1"


class ListJournal:
    def __init__(self):
        self.records = []

    def record(self, hop, mid, tid, instance, port, event, status, detail=None,
               at=None):
        self.records.append(dict(hop=hop, mid=mid, instance=instance,
                                 port=port, event=event, status=status,
                                 detail=detail))

    def hops(self):
        return [r["hop"] for r in self.records]


def _world(stuck_after=30.0, hold_seconds=300.0):
    clock, j = Clock(), ListJournal()
    registry = InstanceEvents(clock=clock, hold_seconds=hold_seconds)
    wakes = []
    watch = WaitWatch(j, "cmp-1", stuck_after, wake=lambda: wakes.append(1))
    registry.observe(watch)
    return clock, j, registry, watch, wakes


def _event(status=contract.COMPLETED, port=PORT, name=contract.VIF_PLUGGED):
    return contract.InstanceEvent(name, SERVER, port, status)


def test_a_wait_is_recorded_started_stuck_once_and_ended():
    clock, j, registry, watch, wakes = _world()
    prepared = registry.prepare(SERVER, contract.VIF_PLUGGED, PORT, deadline=300)
    assert wakes == [1]             # the consumer's loop learns a new due time
    assert watch.next_due == clock.now + 30
    clock.now += 29.9
    assert watch.check() == 0 and watch.stuck == 0
    clock.now += 0.2
    assert watch.check() == 1 and watch.stuck == 1
    assert watch.check() == 0       # once per wait
    assert registry.deliver(_event(), "m-1") == DELIVERED
    assert prepared.how == waiting.RECEIVED and watch.stuck == 0
    started, stuck, ended = j.records
    assert [started["hop"], stuck["hop"], ended["hop"]] == [
        journal.WAIT_STARTED, journal.WAIT_STUCK, journal.WAIT_ENDED]
    assert started["mid"] == stuck["mid"] == ended["mid"]
    assert (ended["instance"], ended["port"], ended["event"]) == (
        SERVER, PORT, contract.VIF_PLUGGED)
    assert "deadline 300s" in started["detail"]
    assert ended["detail"].startswith("was stuck; woken by m-1 after 30.1s")


@pytest.mark.parametrize("end, said", [
    (lambda r, p: r.discard(p, "timed out after 300s"), "timed out after 300s"),
    (lambda r, p: r.clear(SERVER), "cleared"),
    (lambda r, p: r.cancel_all(), "cancelled"),
])
def test_every_way_a_wait_ends_is_recorded(end, said):
    clock, j, registry, watch, _ = _world()
    prepared = registry.prepare(SERVER, contract.VIF_PLUGGED, PORT)
    end(registry, prepared)
    assert j.hops() == [journal.WAIT_STARTED, journal.WAIT_ENDED]
    assert said in j.records[-1]["detail"]
    assert watch.next_due is None


def test_a_wait_satisfied_by_a_held_event_starts_and_ends_at_once():
    clock, j, registry, watch, _ = _world()
    registry.deliver(_event(), "m-early")
    registry.prepare(SERVER, contract.VIF_PLUGGED, PORT)
    assert j.hops() == [journal.WAIT_STARTED, journal.WAIT_ENDED]
    assert "satisfied at once by m-early" in j.records[-1]["detail"]
    assert watch.check() == 0


def test_a_held_event_that_goes_unused_is_recorded():
    clock, j, registry, watch, _ = _world(hold_seconds=10)
    registry.deliver(_event(), "m-early")
    clock.now += 11
    registry.prepare(SERVER, contract.VIF_PLUGGED, PORT)
    assert j.hops() == [journal.UNUSED, journal.WAIT_STARTED]
    assert j.records[0]["mid"] == "m-early"
    assert j.records[0]["detail"].startswith("expired: held 11s")


def test_a_failing_journal_never_reaches_the_waiter():
    clock, _, registry, watch, _ = _world()

    class Broken:
        def record(self, *a, **k):
            raise RuntimeError("boom")
    watch.journal = Broken()
    prepared = registry.prepare(SERVER, contract.VIF_PLUGGED, PORT)
    clock.now += 31
    assert watch.check() == 0 or watch.stats["errors"]
    assert registry.deliver(_event(), "m-1") == DELIVERED
    assert prepared.how == waiting.RECEIVED
    assert watch.stats["errors"] >= 2


# --- the diagnosis ------------------------------------------------------------
HOST = "cmp-1"


def _rec(hop, mid="m-1", svc=f"host:{HOST}", instance=SERVER, port=PORT,
         event=contract.VIF_PLUGGED, detail=None, t=100.0):
    return dict(hop=hop, mid=mid, svc=svc, node="n", instance=instance,
                port=port, event=event, status="completed", detail=detail, t=t)


def _wait():
    return stuck_cmd.StuckWait(wid="w-1", host=HOST, instance=SERVER, port=PORT,
                               event=contract.VIF_PLUGGED, since=130.0)


PUB = _rec(journal.PUBLISHED, svc="publisher:network@ctl", t=90.0)
ROUTED_HERE = _rec(journal.ROUTED, svc="router:r", detail=[HOST], t=91.0)
CASES = {
    stuck_cmd.NEVER_PUBLISHED: [],
    stuck_cmd.NOT_ROUTED: [PUB],
    stuck_cmd.NO_HOST: [PUB, _rec(journal.RETRIED, svc="router:r",
                                  detail="attempt 1 in 500ms: no known host")],
    stuck_cmd.NOT_DELIVERED: [PUB, ROUTED_HERE],
    stuck_cmd.ELSEWHERE: [PUB, _rec(journal.ROUTED, svc="router:r",
                                    detail=["cmp-2"])],
    stuck_cmd.DEAD: [PUB, _rec(journal.DEAD, svc="router:r", instance=None,
                               port=None, event=None,
                               detail="invalid: payload.status")],
    stuck_cmd.NOT_MATCHED: [_rec(journal.DELIVERED, mid="m-2", port="port-2")],
    stuck_cmd.EXPIRED: [PUB, ROUTED_HERE, _rec(journal.DELIVERED),
                        _rec(journal.MATCHED, detail="held early"),
                        _rec(journal.UNUSED, detail="expired: held 300s")],
    stuck_cmd.DUPLICATE: [PUB, ROUTED_HERE, _rec(journal.DELIVERED),
                          _rec(journal.MATCHED, detail="duplicate")],
    stuck_cmd.STALE: [PUB, ROUTED_HERE, _rec(journal.DELIVERED),
                      _rec(journal.MATCHED, detail="stale")],
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_cause_is_named(kind):
    w = stuck_cmd.diagnose(_wait(), CASES[kind])
    assert w.kind == kind, w.why
    assert w.why


def test_another_hosts_outcomes_are_not_this_hosts():
    other = [PUB, _rec(journal.ROUTED, svc="router:r", detail=["cmp-2"]),
             _rec(journal.DELIVERED, svc="host:cmp-2"),
             _rec(journal.MATCHED, svc="host:cmp-2", detail="duplicate")]
    assert stuck_cmd.diagnose(_wait(), other).kind == stuck_cmd.ELSEWHERE


def test_only_the_stuck_records_without_an_end_are_current():
    recs = [_rec(journal.WAIT_STARTED, mid="w-1", t=99.0),
            _rec(journal.WAIT_STUCK, mid="w-1", t=130.0),
            _rec(journal.WAIT_STUCK, mid="w-2", t=131.0),
            _rec(journal.WAIT_ENDED, mid="w-2", detail="was stuck; woken")]
    current = stuck_cmd.stuck_waits(recs)
    assert [(w.wid, w.started, w.host) for w in current] == [("w-1", 99.0, HOST)]
    assert [w.wid for w in stuck_cmd.stuck_waits(recs, True)] == ["w-1", "w-2"]


_text = st.one_of(st.none(), st.text(string.printable, max_size=8),
                  st.sampled_from([SERVER, PORT, HOST, "cmp-2"]),
                  st.integers(), st.lists(st.text(max_size=4), max_size=3))
_record = st.fixed_dictionaries({
    "hop": st.one_of(st.sampled_from([
        journal.PUBLISHED, journal.ROUTED, journal.RETRIED, journal.PARKED,
        journal.DEAD, journal.DROPPED, journal.DELIVERED, journal.MATCHED,
        journal.UNUSED, journal.WAIT_STARTED, journal.WAIT_ENDED]), _text),
    "mid": _text, "svc": st.one_of(_text, st.just(f"host:{HOST}")),
    "instance": _text, "port": _text, "event": _text, "status": _text,
    "detail": _text, "t": st.one_of(st.floats(allow_nan=True), _text)})


@settings(max_examples=150, deadline=None)
@given(st.lists(_record, max_size=12))
def test_any_journal_gives_a_diagnosis_and_a_printable_report(records):
    # whatever hosts, routers and hostile publishers wrote
    w = stuck_cmd.diagnose(_wait(), records)
    assert w.kind in CASES and w.why
    for line in stuck_cmd.format_wait(w).splitlines():
        assert line.isprintable()


# --- the router's follower's state ----------------------------------------------
def test_the_followed_stuck_waits_are_bounded_and_end():
    clock = Clock(1000.0)
    waits = StuckWaits(max_age=60, max_waits=3, clock=clock)
    for i in range(5):
        waits.feed(_rec(journal.WAIT_STUCK, mid=f"w-{i}", t=clock.now))
    assert waits.current() == 3 and waits.seen == 5      # the newest 3
    waits.feed(_rec(journal.WAIT_ENDED, mid="w-4", detail="was stuck; woken"))
    assert waits.current() == 2
    # an end read before its stuck record (two routers' order): not counted
    waits.feed(_rec(journal.WAIT_ENDED, mid="w-9", detail="was stuck; woken"))
    waits.feed(_rec(journal.WAIT_STUCK, mid="w-9", t=clock.now))
    assert waits.current() == 2
    waits.feed(_rec(journal.WAIT_STUCK, mid=["not", "a", "str"]))
    clock.now += 61             # a host that went away never ends its waits
    assert waits.current() == 0
