"""Waits in the journal (compute/wait_watch.py) and the diagnosis of a stuck
one (router/stuck_cmd.py): pure, with a registry on a hand-set clock and a
journal that is a list."""

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute import waiting
from compute.events import DELIVERED, InstanceEvents
from compute.wait_watch import WaitWatch
from router import journal, routing, stuck_cmd, trace_cmd
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
TRUST = routing.Policy()        # host H speaks as evrouter-compute-H only


def _w(hop, wid, host=HOST, detail=None):
    return _rec(hop, mid=wid, svc=f"host:{host}", detail=detail)


def test_the_gauge_believes_a_host_only_as_its_own_user():
    waits = StuckWaits(TRUST, clock=Clock())
    mine, other = "evrouter-compute-cmp-1", "evrouter-compute-cmp-2"
    waits.feed(_w(journal.WAIT_STUCK, "w-1"), mine)
    waits.feed(_w(journal.WAIT_STUCK, "w-2"), other)        # speaks for cmp-1
    waits.feed(_w(journal.WAIT_STUCK, "w-3"), None)         # no user_id
    assert waits.current() == 1 and waits.refused == 2
    # another host cannot end cmp-1's wait, even knowing its id
    waits.feed(_w(journal.WAIT_ENDED, "w-1", host="cmp-2"), other)
    assert waits.current() == 1
    waits.feed(_w(journal.WAIT_ENDED, "w-1", detail="was stuck; woken"), mine)
    assert waits.current() == 0


def test_one_hosts_flood_costs_only_its_own_share():
    clock = Clock()
    waits = StuckWaits(TRUST, max_per_host=5, clock=clock)
    waits.feed(_w(journal.WAIT_STUCK, "w-real", host="cmp-2"),
               "evrouter-compute-cmp-2")
    for i in range(1000):
        waits.feed(_w(journal.WAIT_STUCK, f"w-{i}"), "evrouter-compute-cmp-1")
        waits.feed(_w(journal.WAIT_ENDED, f"w-x{i}"), "evrouter-compute-cmp-1")
    assert waits.current() == 6         # its 5, and cmp-2's still there
    waits.feed(_w(journal.WAIT_STUCK, "w-" + "x" * 100), "evrouter-compute-cmp-1")
    assert waits.current() == 6         # an id no writer of ours makes


def test_the_gauge_ages_waits_by_when_it_read_them():
    clock = Clock(1000.0)
    waits = StuckWaits(TRUST, max_age=60, clock=clock)
    user = "evrouter-compute-cmp-1"
    # recorders' clocks hours off either way change nothing
    waits.feed(dict(_w(journal.WAIT_STUCK, "w-1"), t=1e9 + 6 * 3600), user)
    waits.feed(dict(_w(journal.WAIT_STUCK, "w-2"), t=1.0), user)
    assert waits.current() == 2
    clock.now += 61             # a host that went away never ends its waits
    assert waits.current() == 0
    # an end read before its stuck record: that wait is not counted
    waits.feed(_w(journal.WAIT_ENDED, "w-9", detail="was stuck; woken"), user)
    waits.feed(_w(journal.WAIT_STUCK, "w-9"), user)
    assert waits.current() == 0


# --- what came before this wait is not its cause --------------------------------
def _hop(hop, t, mid="m-1", svc=f"host:{HOST}", **kw):
    return _rec(hop, mid=mid, svc=svc, t=t, **kw)


def _earlier_boot(host=HOST, mid="m-1"):
    """A first boot's wait on `host`, woken at 50 by `mid`."""
    return [_hop(journal.PUBLISHED, 48.0, mid, "publisher:n"),
            _hop(journal.ROUTED, 49.0, mid, "router:r", detail=[host]),
            _hop(journal.DELIVERED, 50.0, mid, f"host:{host}"),
            _hop(journal.MATCHED, 50.0, mid, f"host:{host}", detail="woken"),
            _hop(journal.WAIT_ENDED, 50.0, "w-0", f"host:{host}",
                 detail="woken by m-1")]


def _later_wait():
    w = _wait()
    w.started, w.since = 120.0, 150.0
    return w


@pytest.mark.parametrize("before", [
    _earlier_boot(),                                        # reboot, same host
    _earlier_boot(host="cmp-2"),                            # migrated here
    _earlier_boot() + [_hop(journal.MATCHED, 55.0, detail="duplicate")],
    [_hop(journal.PUBLISHED, 20.0, "m-0", "publisher:n"),   # an older attempt
     _hop(journal.DEAD, 30.0, "m-0", "router:r", detail="unknown-host: x")]
    + _earlier_boot(),
])
def test_an_earlier_waits_events_are_not_this_ones_cause(before):
    w = stuck_cmd.diagnose(_later_wait(), before)
    assert w.kind == stuck_cmd.NEVER_PUBLISHED, w.why


def test_a_resend_under_a_used_id_while_this_wait_waits_is_a_duplicate():
    later = _earlier_boot() + [_hop(journal.DELIVERED, 130.0),
                               _hop(journal.MATCHED, 130.0, detail="duplicate")]
    assert stuck_cmd.diagnose(_later_wait(), later).kind == stuck_cmd.DUPLICATE


def test_routed_and_delivered_here_without_an_outcome_is_not_not_routed():
    recs = [PUB, ROUTED_HERE, _rec(journal.DELIVERED)]
    w = stuck_cmd.diagnose(_wait(), recs)
    assert w.kind == stuck_cmd.NOT_MATCHED and "outcome" in w.why


def test_a_hosts_records_are_believed_only_from_its_user():
    recs = [dict(_rec(journal.MATCHED, detail="duplicate"), user="evrouter-compute-cmp-2"),
            dict(_rec(journal.MATCHED, detail="duplicate"), user="evrouter-compute-cmp-1"),
            dict(PUB, user="evrouter-network")]
    kept = stuck_cmd.believed(recs, TRUST)
    assert [r["user"] for r in kept] == ["evrouter-compute-cmp-1", "evrouter-network"]


# --- the journal's records are any writer's ----------------------------------------
def _batch(rows, **doc):
    return json.dumps({"v": journal.FORMAT_VERSION, "svc": "host:x", "node": "n",
                       "r": rows, **doc}).encode()


def test_decoding_is_total_and_every_record_sane():
    good = [100.0, "matched", "m", None, SERVER, PORT, "e", "s", "woken"]
    assert len(journal.decode_batch(_batch([good]))) == 1
    deep = b'{"v":1,"svc":"host:x","r":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    assert journal.decode_batch(deep) == []
    assert journal.decode_batch(b"x" * (journal.MAX_BATCH_BYTES + 1)) == []
    assert journal.decode_batch(_batch([good], svc=["not", "a", "name"])) == []
    # a name that is not a string: not a record; a time that is not one: None
    assert journal.decode_batch(_batch([[*good[:2], ["m"], *good[3:]]])) == []
    for t in (1e20, -1, "now", True, None):
        [rec] = journal.decode_batch(_batch([[t, *good[1:]]]))
        assert rec["t"] is None
    nan = _batch([good]).replace(b"100.0", b"NaN")
    assert journal.decode_batch(nan)[0]["t"] is None
    [rec] = journal.decode_batch(_batch([[*good[:8], {"deep": [1, 2]}]]))
    assert rec["detail"] == "{'deep': [1, 2]}"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5),
                          st.lists(st.integers(), max_size=2)),
                min_size=len(journal.FIELDS), max_size=len(journal.FIELDS)))
def test_whatever_a_writer_put_the_readers_print_it(row):
    for rec in journal.decode_batch(_batch([row])):
        rec["user"] = None
        line = trace_cmd.format_record(rec)
        assert line.isprintable()
        trace_cmd._timeline_order(rec)
        json.dumps(rec, allow_nan=False)


def test_since_is_bounded():
    assert trace_cmd.parse_age("3650d") == 3650 * 86400
    for bad in ("1000000d", "99999999999999999999d", "-5m", "x"):
        with pytest.raises(ValueError):
            trace_cmd.parse_age(bad)


def test_the_watch_counts_down_on_the_registrys_own_clock():
    clock, j, registry, watch, _ = _world(stuck_after=30.0)
    clock.now = 5.0             # far behind time.monotonic()
    registry.prepare(SERVER, contract.VIF_PLUGGED, PORT)
    assert watch.due_in() == 30.0
    clock.now += 10
    assert watch.due_in() == 20.0


# --- a second review: the index is any writer's too --------------------------------
def test_the_index_and_batch_ids_are_read_totally():
    from router import journal_index
    assert journal.parse_batch_id("jb.x.²") is None         # isdigit, not int
    assert journal.parse_batch_id("jb.x." + "9" * 30) is None
    assert journal.parse_batch_id("jb.w.12") == ("w", 12)
    deep = journal_index.MAGIC + b'{"w":"x","b":' + b"[" * 100_000 + b"]" * 100_000 \
        + b"}\n"
    assert journal_index.matching(deep, {1}) == (None, [])
    assert journal_index.first_entry(deep) is None
    inf = journal_index.MAGIC + b'{"w":"x","b":[[Infinity,1,1,1]]}\n' + b"\0" * 4
    assert journal_index.first_entry(inf) is None
    assert journal_index.matching(inf, {0}) == ("x", [])
    odd = journal_index.MAGIC + b'{"w":"x","b":[{"3":1}]}\n' + b"\0" * 4
    assert journal_index.matching(odd, {0}) == (None, [])
    big = journal_index.MAGIC + b"{}\n" + b"\0" * journal_index.MAX_INDEX_BYTES
    assert not journal_index.is_index(big)


def test_a_hosts_kinds_of_record_under_another_name_are_not_believed():
    forged = [dict(_rec(journal.WAIT_STUCK, mid="w-fake"), svc="neutron",
                   node=HOST, user="evrouter-compute-cmp-2"),
              dict(_rec(journal.MATCHED, detail="woken"), svc="router:r",
                   user="evrouter-compute-cmp-2"),
              dict(PUB, user="evrouter-network")]
    kept = stuck_cmd.believed(forged, TRUST)
    assert [r["hop"] for r in kept] == [journal.PUBLISHED]
    # and no stuck wait is made of a record without a host's name
    assert stuck_cmd.stuck_waits([dict(forged[0], user=None)]) == []


def test_an_old_duplicates_delivery_is_no_cause_either():
    old_copy = [_hop(journal.DELIVERED, 55.0), _hop(journal.MATCHED, 55.0,
                                                    detail="duplicate")]
    w = stuck_cmd.diagnose(_later_wait(), _earlier_boot() + old_copy)
    assert w.kind == stuck_cmd.NEVER_PUBLISHED, w.why


def test_the_watch_decodes_only_host_users_batches_within_a_budget():
    from router.stuck_watch import StuckWatch
    watch = StuckWatch(None, TRUST)
    assert not watch._may_decode("evrouter-network", 100)
    assert not watch._may_decode(None, 100)
    host = "evrouter-compute-cmp-1"
    budget = int(watch.USER_BYTES_PER_S * watch.USER_BURST_S)
    assert watch._may_decode(host, budget // 2)
    assert watch._may_decode(host, budget // 2 - 1000)
    assert not watch._may_decode(host, 64 * 1024)       # spent: skipped
    assert watch.stats["over_budget"] == 1
    assert watch._may_decode("evrouter-compute-cmp-2", 64 * 1024)   # its own
