"""The pure core of the lifecycle agent: mapping, debounce, numbering."""

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute import lifecycle as lc
from router.bus import contract

DOM_A = "11111111-1111-1111-1111-111111111111"
DOM_B = "22222222-2222-2222-2222-222222222222"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("name, value", [
    ("VIR_DOMAIN_EVENT_DEFINED", lc.EVENT_DEFINED),
    ("VIR_DOMAIN_EVENT_UNDEFINED", lc.EVENT_UNDEFINED),
    ("VIR_DOMAIN_EVENT_STARTED", lc.EVENT_STARTED),
    ("VIR_DOMAIN_EVENT_SUSPENDED", lc.EVENT_SUSPENDED),
    ("VIR_DOMAIN_EVENT_RESUMED", lc.EVENT_RESUMED),
    ("VIR_DOMAIN_EVENT_STOPPED", lc.EVENT_STOPPED),
    ("VIR_DOMAIN_EVENT_SHUTDOWN", lc.EVENT_SHUTDOWN),
    ("VIR_DOMAIN_EVENT_PMSUSPENDED", lc.EVENT_PMSUSPENDED),
    ("VIR_DOMAIN_EVENT_CRASHED", lc.EVENT_CRASHED),
    ("VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED", lc.SUSPENDED_MIGRATED),
    ("VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY", lc.SUSPENDED_POSTCOPY),
    ("VIR_DOMAIN_JOB_NONE", lc.JOB_NONE),
    ("VIR_DOMAIN_JOB_COMPLETED", lc.JOB_COMPLETED),
    ("VIR_DOMAIN_NOSTATE", lc.STATE_NOSTATE),
    ("VIR_DOMAIN_RUNNING", lc.STATE_RUNNING),
    ("VIR_DOMAIN_BLOCKED", lc.STATE_BLOCKED),
    ("VIR_DOMAIN_PAUSED", lc.STATE_PAUSED),
    ("VIR_DOMAIN_SHUTDOWN", lc.STATE_SHUTDOWN),
    ("VIR_DOMAIN_SHUTOFF", lc.STATE_SHUTOFF),
    ("VIR_DOMAIN_CRASHED", lc.STATE_CRASHED),
    ("VIR_DOMAIN_PMSUSPENDED", lc.STATE_PMSUSPENDED),
])
def test_constants_are_libvirts(name, value):
    assert getattr(libvirt, name) == value


def test_placement_knows_libvirts_stopped_migrated():
    from router.placement import STOPPED_MIGRATED
    assert STOPPED_MIGRATED == libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED


@pytest.mark.parametrize("event, transition", [
    (lc.EVENT_DEFINED, "DEFINED"), (lc.EVENT_UNDEFINED, "UNDEFINED"),
    (lc.EVENT_STARTED, "STARTED"), (lc.EVENT_SUSPENDED, "PAUSED"),
    (lc.EVENT_RESUMED, "RESUMED"), (lc.EVENT_STOPPED, "STOPPED"),
    (lc.EVENT_SHUTDOWN, "SHUTDOWN"), (lc.EVENT_PMSUSPENDED, "PMSUSPENDED"),
    (lc.EVENT_CRASHED, "CRASHED"),
])
def test_every_lifecycle_event_has_its_transition(event, transition):
    assert lc.transition_for(event, 0) == transition
    assert transition in contract.TRANSITIONS


def test_unknown_event_has_no_transition():
    assert lc.transition_for(99, 0) is None


def test_suspended_details():
    paused_details = [libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
                      libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
                      libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED]
    for detail in paused_details:
        assert lc.transition_for(lc.EVENT_SUSPENDED, detail) == "PAUSED"
    assert lc.transition_for(lc.EVENT_SUSPENDED, lc.SUSPENDED_POSTCOPY) \
        == "POSTCOPY_STARTED"


def test_suspended_migrated_asks_the_migration_job():
    asked = []

    def says(answer):
        def ask():
            asked.append(answer)
            return answer
        return ask

    assert lc.transition_for(lc.EVENT_SUSPENDED, lc.SUSPENDED_MIGRATED,
                             says(True)) == "MIGRATION_COMPLETED"
    # libvirt also sends it when a migration failed: then it is a pause.
    assert lc.transition_for(lc.EVENT_SUSPENDED, lc.SUSPENDED_MIGRATED,
                             says(False)) == "PAUSED"
    assert lc.transition_for(lc.EVENT_SUSPENDED, lc.SUSPENDED_MIGRATED) \
        == "PAUSED"
    # Nothing else costs a libvirt round trip.
    for event in range(9):
        lc.transition_for(event, 0, says("unexpected"))
    assert asked == [True, False]


@pytest.mark.parametrize("job_type, active, completed", [
    (lc.JOB_COMPLETED, True, True),
    (lc.JOB_COMPLETED, False, True),
    (libvirt.VIR_DOMAIN_JOB_FAILED, False, False),
    (libvirt.VIR_DOMAIN_JOB_CANCELLED, False, False),
    (libvirt.VIR_DOMAIN_JOB_UNBOUNDED, True, False),
    (lc.JOB_NONE, True, False),        # job over, still running: it failed
    (lc.JOB_NONE, False, True),        # job over, no longer running here
    (lc.JOB_NONE, None, True),         # job over, domain gone
])
def test_job_completed(job_type, active, completed):
    assert lc.job_completed(job_type, active) is completed


def test_snapshot_entries():
    assert lc.snapshot_entry(lc.STATE_RUNNING) == ("STARTED", lc.EVENT_STARTED)
    assert lc.snapshot_entry(lc.STATE_BLOCKED) == ("STARTED", lc.EVENT_STARTED)
    assert lc.snapshot_entry(lc.STATE_PAUSED) == ("PAUSED", lc.EVENT_SUSPENDED)
    assert lc.snapshot_entry(lc.STATE_SHUTOFF) == ("STOPPED", lc.EVENT_STOPPED)
    assert lc.snapshot_entry(lc.STATE_CRASHED) == ("CRASHED", lc.EVENT_CRASHED)
    assert lc.snapshot_entry(lc.STATE_NOSTATE) is None


# --- the debounce -------------------------------------------------------------

def test_stopped_is_held_until_its_delay_passed():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    assert d.offer(DOM_A, "STOPPED", "stop-a") == ([], None)
    assert d.holds(DOM_A) and len(d) == 1
    assert d.seconds_until_due() == 15.0
    clock.now += 14.9
    assert d.due() == []
    clock.now += 0.1
    assert d.due() == ["stop-a"]
    assert d.due() == [] and d.seconds_until_due() is None


def test_any_later_event_cancels_a_held_stopped():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop-a")
    clock.now += 3
    assert d.offer(DOM_A, "STARTED", "start-a") == (["start-a"], "stop-a")
    clock.now += 60
    assert d.due() == []


def test_other_domains_do_not_cancel():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop-a")
    assert d.offer(DOM_B, "STARTED", "start-b") == (["start-b"], None)
    clock.now += 15
    assert d.due() == ["stop-a"]


def test_a_second_stopped_replaces_the_first_and_restarts_the_delay():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "first")
    clock.now += 10
    assert d.offer(DOM_A, "STOPPED", "second") == ([], "first")
    clock.now += 10
    assert d.due() == []
    clock.now += 5
    assert d.due() == ["second"]


def test_zero_delay_publishes_at_once():
    d = lc.StoppedDebounce(0, Clock())
    assert d.offer(DOM_A, "STOPPED", "stop") == (["stop"], None)


def test_release_all_gives_every_held_stopped_oldest_first():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_B, "STOPPED", "stop-b")
    clock.now += 1
    d.offer(DOM_A, "STOPPED", "stop-a")
    assert d.release_all() == ["stop-b", "stop-a"]
    assert len(d) == 0


# --- the translator -----------------------------------------------------------

def test_translator_numbers_every_payload_in_publish_order():
    clock = Clock()
    t = lc.LifecycleTranslator("host-1", 15.0, clock)
    out, transition, _ = t.event(DOM_A, lc.EVENT_STARTED, 1)
    assert transition == "STARTED"
    assert out == [contract.LifecycleEvent(DOM_A, "host-1", "STARTED",
                                           lc.EVENT_STARTED, 1, 1)]
    assert t.event(DOM_A, lc.EVENT_STOPPED, 1)[0] == []
    out, _, _ = t.event(DOM_B, lc.EVENT_STARTED, 0)
    assert [p.seq for p in out] == [2]
    clock.now += 15
    (stopped,) = t.due()
    # Numbered when released, after DOM_B's event that left before it.
    assert (stopped.transition, stopped.detail, stopped.seq) == ("STOPPED", 1, 3)
    payloads, _ = t.snapshot([])
    assert payloads == [contract.HostAnnounce("host-1", 4)]


def test_translator_drops_unknown_events_without_cancelling():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STOPPED, 0)
    assert t.event(DOM_A, 42, 0) == ([], None, None)
    assert t.debounce.holds(DOM_A)


def test_translator_payloads_honour_the_contract():
    t = lc.LifecycleTranslator("compute-1.example", 0, Clock())
    payloads = []
    for event in range(9):
        payloads += t.event(DOM_A, event, 2)[0]
    payloads += t.snapshot([(DOM_A, s) for s in range(8)])[0]
    for p in payloads:
        env = contract.envelope(p, "evrouter-agent/compute-1.example")
        assert contract.decode(contract.encode(env)) == env


def test_snapshot_is_announced_and_marked():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    payloads, withheld = t.snapshot([(DOM_A, lc.STATE_RUNNING),
                                     (DOM_B, lc.STATE_SHUTOFF),
                                     ("33333333-3333-3333-3333-333333333333",
                                      lc.STATE_NOSTATE)])
    announce, a, b = payloads
    assert announce == contract.HostAnnounce("h", 1)
    assert (a.instance_uuid, a.transition, a.snapshot, a.seq) == \
        (DOM_A, "STARTED", True, 2)
    assert (b.instance_uuid, b.transition, b.detail) == (DOM_B, "STOPPED", 0)
    assert withheld == 0


def test_snapshot_leaves_a_held_stopped_to_the_debounce():
    # Mid-reboot the domain is shut off: a snapshot saying so would publish
    # exactly the STOPPED the debounce holds back.
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STOPPED, 1, position=5)
    payloads, withheld = t.snapshot([(DOM_A, lc.STATE_SHUTOFF)],
                                    listed_after=9)
    assert [type(p) for p in payloads] == [contract.HostAnnounce]
    assert withheld == 1


def test_snapshot_leaves_domains_with_newer_events_to_them():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STARTED, 0, position=3)
    t.event(DOM_B, lc.EVENT_UNDEFINED, 0, position=8)
    # Listing began at position 5: DOM_B's UNDEFINED is newer than the
    # listing that still saw it, DOM_A's STARTED is older.
    payloads, withheld = t.snapshot([(DOM_A, lc.STATE_RUNNING),
                                     (DOM_B, lc.STATE_SHUTOFF)],
                                    listed_after=5)
    assert [p.instance_uuid for p in payloads[1:]] == [DOM_A]
    assert withheld == 1
    # A later listing (after position 8) reports DOM_B again.
    payloads, _ = t.snapshot([(DOM_B, lc.STATE_SHUTOFF)], listed_after=9)
    assert [p.instance_uuid for p in payloads[1:]] == [DOM_B]


events = st.lists(st.tuples(st.sampled_from([DOM_A, DOM_B]),
                            st.sampled_from(range(9)),
                            st.floats(min_value=0, max_value=20)),
                  max_size=30)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([0.0, 5.0, 15.0]))
def test_published_order_follows_libvirt_and_only_cancelled_stopped_vanish(
        stream, delay):
    clock = Clock()
    t = lc.LifecycleTranslator("h", delay, clock)
    published, times = [], []
    for domain, event, gap in stream:
        clock.now += gap
        published += t.due()
        times.append(clock.now)
        published += t.event(domain, event, 0)[0]
    clock.now += delay
    published += t.due()
    assert t.release_all() == []

    # Sequence numbers follow publish order, without gaps.
    assert [p.seq for p in published] == list(range(1, len(published) + 1))
    # Per domain: what libvirt emitted, minus each STOPPED that another event
    # of the same domain followed within the delay.
    for dom in (DOM_A, DOM_B):
        mine = [(e, when) for (d, e, _), when in zip(stream, times, strict=True) if d == dom]
        expected = [lc.transition_for(e, 0) for i, (e, when) in enumerate(mine)
                    if not (e == lc.EVENT_STOPPED and delay > 0
                            and i + 1 < len(mine)
                            and mine[i + 1][1] < when + delay)]
        assert [p.transition for p in published
                if p.instance_uuid == dom] == expected
