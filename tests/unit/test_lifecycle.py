"""The pure core of the lifecycle agent: mapping, debounce, numbering."""

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compute import lifecycle as lc
from router.bus import contract
from tests.unit.clock import Clock

DOM_A = "11111111-1111-1111-1111-111111111111"
DOM_B = "22222222-2222-2222-2222-222222222222"



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
    assert d.offer(DOM_A, "STOPPED", "stop-a") == ([], [])
    assert d.holds(DOM_A) and len(d) == 1
    assert d.seconds_until_due() == 15.0
    clock.now += 14.9
    assert d.due() == []
    clock.now += 0.1
    assert d.due() == ["stop-a"]
    assert d.due() == [] and d.seconds_until_due() is None


@pytest.mark.parametrize("comeback", sorted(lc.RUNNING_AGAIN))
def test_running_again_cancels_a_held_stopped(comeback):
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop-a")
    clock.now += 3
    assert d.offer(DOM_A, comeback, "back") == (["back"], ["stop-a"])
    clock.now += 60
    assert d.due() == []


@pytest.mark.parametrize("other", ["DEFINED", "UNDEFINED", "CRASHED",
                                   "SHUTDOWN"])
def test_events_that_are_not_running_again_do_not_cancel_a_stopped(other):
    # They queue behind it, so the domain's order is kept either way.
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop")
    assert d.offer(DOM_A, other, "other") == ([], [])
    assert d.holds(DOM_A)
    clock.now += 15
    assert d.due() == ["stop", "other"]


def test_destroy_shows_shutdown_and_stopped_only_after_the_delay():
    # QEMU: a destroy (or a guest shutdown) is SHUTDOWN, then STOPPED.
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    assert d.offer(DOM_A, "SHUTDOWN", "shutdown") == ([], [])
    clock.now += 0.1
    assert d.offer(DOM_A, "STOPPED", "stop") == ([], [])
    clock.now += 14.95
    assert d.due() == []
    clock.now += 0.05
    assert d.due() == ["shutdown", "stop"]


def test_a_reboot_shows_neither_shutdown_nor_stopped():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "SHUTDOWN", "shutdown")
    d.offer(DOM_A, "STOPPED", "stop")
    clock.now += 1
    assert d.offer(DOM_A, "STARTED", "start") == (["start"],
                                                  ["shutdown", "stop"])
    assert len(d) == 0


def test_openstack_hard_reboot_shows_only_defined_and_started():
    # nova's hard reboot: destroy, undefine, define, create.
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    assert d.offer(DOM_A, "STOPPED", "stop") == ([], [])
    assert d.offer(DOM_A, "UNDEFINED", "undefine") == ([], [])
    # Defined again: the UNDEFINED is void, the STOPPED still stands.
    assert d.offer(DOM_A, "DEFINED", "define") == ([], ["undefine"])
    assert d.holds(DOM_A)
    clock.now += 2
    assert d.offer(DOM_A, "STARTED", "start") == (["define", "start"],
                                                  ["stop"])
    assert len(d) == 0


def test_destroy_undefine_define_without_a_start_publishes_stopped_defined():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop")
    d.offer(DOM_A, "UNDEFINED", "undefine")
    d.offer(DOM_A, "DEFINED", "define")
    clock.now += 15
    assert d.due() == ["stop", "define"]


def test_destroy_and_undefine_for_good_publish_both_after_the_delay():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop")
    clock.now += 1
    d.offer(DOM_A, "UNDEFINED", "undefine")
    clock.now += 14.5
    assert d.due() == []        # the delay runs from the latest held event
    clock.now += 0.5
    assert d.due() == ["stop", "undefine"]


def test_a_redefinition_shows_only_defined():
    # Undefining a shut-off domain and defining it again (a new config).
    d = lc.StoppedDebounce(15.0, Clock())
    assert d.offer(DOM_A, "UNDEFINED", "undefine") == ([], [])
    assert d.offer(DOM_A, "DEFINED", "define") == (["define"], ["undefine"])
    assert len(d) == 0


def test_defined_alone_is_published_at_once():
    d = lc.StoppedDebounce(15.0, Clock())
    assert d.offer(DOM_A, "DEFINED", "define") == (["define"], [])


def test_other_domains_do_not_cancel():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "stop-a")
    assert d.offer(DOM_B, "STARTED", "start-b") == (["start-b"], [])
    clock.now += 15
    assert d.due() == ["stop-a"]


def test_a_second_stopped_replaces_the_first_and_restarts_the_delay():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_A, "STOPPED", "first")
    clock.now += 10
    assert d.offer(DOM_A, "STOPPED", "second") == ([], ["first"])
    clock.now += 10
    assert d.due() == []
    clock.now += 5
    assert d.due() == ["second"]


def test_zero_delay_publishes_at_once():
    d = lc.StoppedDebounce(0, Clock())
    for transition in ("SHUTDOWN", "STOPPED", "UNDEFINED"):
        assert d.offer(DOM_A, transition, transition) == ([transition], [])


def test_release_all_gives_everything_held_oldest_first():
    clock = Clock()
    d = lc.StoppedDebounce(15.0, clock)
    d.offer(DOM_B, "STOPPED", "stop-b")
    clock.now += 1
    d.offer(DOM_A, "STOPPED", "stop-a")
    d.offer(DOM_A, "DEFINED", "define-a")
    assert d.release_all() == ["stop-b", "stop-a", "define-a"]
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
    snapshot, _ = t.snapshot([])
    assert snapshot.seq == 4


def test_translator_reports_what_a_reboot_cancelled():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_SHUTDOWN, 1)
    t.event(DOM_A, lc.EVENT_STOPPED, 2)
    out, transition, cancelled = t.event(DOM_A, lc.EVENT_STARTED, 1)
    assert [p.transition for p in out] == ["STARTED"] and out[0].seq == 1
    assert [c[1] for c in cancelled] == ["SHUTDOWN", "STOPPED"]


def test_translator_drops_unknown_events_without_cancelling():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STOPPED, 0)
    assert t.event(DOM_A, 42, 0) == ([], None, [])
    assert t.debounce.holds(DOM_A)


def test_translator_payloads_honour_the_contract():
    t = lc.LifecycleTranslator("compute-1.example", 0, Clock())
    payloads = []
    for event in range(9):
        payloads += t.event(DOM_A, event, 2)[0]
    payloads.append(t.snapshot([(DOM_A, s) for s in range(8)])[0])
    for p in payloads:
        env = contract.envelope(p, "evrouter-agent/compute-1.example")
        assert contract.decode(contract.encode(env)) == env


def test_snapshot_is_one_message_of_every_domain():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    snapshot, deferred = t.snapshot([(DOM_A, lc.STATE_RUNNING),
                                     (DOM_B, lc.STATE_SHUTOFF),
                                     ("33333333-3333-3333-3333-333333333333",
                                      lc.STATE_NOSTATE)])
    assert snapshot == contract.HostSnapshot(
        "h", 1, ((DOM_A, "STARTED"), (DOM_B, "STOPPED")))
    assert deferred == 0


def test_snapshot_mid_reboot_says_what_was_last_published():
    # Mid-reboot the domain is shut off: saying so would publish exactly
    # what the debounce holds back, and leaving it out would take it off
    # the host (a snapshot replaces the host's set).
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STARTED, 0, position=1)
    t.event(DOM_A, lc.EVENT_STOPPED, 1, position=5)
    t.event(DOM_A, lc.EVENT_UNDEFINED, 0, position=6)
    snapshot, deferred = t.snapshot([(DOM_A, lc.STATE_SHUTOFF)],
                                    listed_after=9)
    assert snapshot.instances == ((DOM_A, "STARTED"),)
    assert deferred == 1
    # Undefined and not listed any more: still there until UNDEFINED leaves.
    snapshot, _ = t.snapshot([], listed_after=9)
    assert snapshot.instances == ((DOM_A, "STARTED"),)


def test_snapshot_of_a_domain_held_before_anything_was_published():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STOPPED, 1, position=5)
    snapshot, _ = t.snapshot([(DOM_A, lc.STATE_SHUTOFF)], listed_after=9)
    assert snapshot.instances == ((DOM_A, "STOPPED"),)


def test_snapshot_forgets_a_domain_once_its_undefined_left():
    clock = Clock()
    t = lc.LifecycleTranslator("h", 15.0, clock)
    t.event(DOM_A, lc.EVENT_STARTED, 0, position=1)
    t.event(DOM_A, lc.EVENT_STOPPED, 1, position=2)
    t.event(DOM_A, lc.EVENT_UNDEFINED, 0, position=3)
    clock.now += 15
    assert [p.transition for p in t.due()] == ["STOPPED", "UNDEFINED"]
    snapshot, _ = t.snapshot([], listed_after=9)
    assert snapshot.instances == ()


def test_snapshot_reports_domains_with_newer_events_as_published():
    t = lc.LifecycleTranslator("h", 15.0, Clock())
    t.event(DOM_A, lc.EVENT_STARTED, 0, position=3)
    t.event(DOM_B, lc.EVENT_SUSPENDED, 0, position=8)
    # Listing began at position 5: DOM_B's PAUSED is newer than the
    # listing that still saw it running, DOM_A's STARTED is older.
    snapshot, deferred = t.snapshot([(DOM_A, lc.STATE_RUNNING),
                                     (DOM_B, lc.STATE_RUNNING)],
                                    listed_after=5)
    assert snapshot.instances == ((DOM_A, "STARTED"), (DOM_B, "PAUSED"))
    assert deferred == 1
    # A later listing (after position 8) reports DOM_B's listed state.
    snapshot, deferred = t.snapshot([(DOM_B, lc.STATE_SHUTOFF)],
                                    listed_after=9)
    assert snapshot.instances == ((DOM_B, "STOPPED"),) and deferred == 0


# --- snapshot pacing ------------------------------------------------------------

def test_pacer_answers_the_first_request_at_once():
    p = lc.SnapshotPacer(1.0, Clock())
    assert p.request() is True
    assert p.seconds_until_due() is None and p.due() is False


def test_pacer_coalesces_requests_within_the_interval_into_one():
    clock = Clock()
    p = lc.SnapshotPacer(1.0, clock)
    assert p.request()
    clock.now += 0.2
    assert p.request() is False
    clock.now += 0.1
    assert p.request() is False
    assert p.seconds_until_due() == pytest.approx(0.7)
    clock.now += 0.69
    assert p.due() is False
    clock.now += 0.01
    assert p.due() is True
    assert p.due() is False             # one snapshot for both requests
    clock.now += 0.5
    assert p.request() is False         # the interval counts from that one


def test_pacer_counts_other_snapshots():
    clock = Clock()
    p = lc.SnapshotPacer(1.0, clock)
    p.taken()                           # the start-up snapshot
    clock.now += 0.5
    assert p.request() is False
    p.taken()                           # a reconnect snapshot answered it
    assert p.seconds_until_due() is None
    clock.now += 1
    assert p.request() is True


# --- every stream -----------------------------------------------------------------

events = st.lists(st.tuples(st.sampled_from([DOM_A, DOM_B]),
                            st.sampled_from(range(9)),
                            st.floats(min_value=0, max_value=20)),
                  max_size=30)


@settings(max_examples=300, deadline=None)
@given(events, st.sampled_from([0.0, 5.0, 15.0]))
def test_published_order_follows_libvirt_and_only_reboots_vanish(
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
    for dom in (DOM_A, DOM_B):
        emitted = [lc.transition_for(e, 0) for d, e, _ in stream if d == dom]
        out = [p.transition for p in published if p.instance_uuid == dom]
        if delay == 0:
            assert out == emitted
            continue
        # What left is what libvirt emitted, in its order, minus events
        # that may be half of a reboot, each dropped only because the
        # domain came back, or the same event came again, before it left.
        # (Matched from the end: a repeated event replaces the earlier.)
        i = len(out)
        for n in range(len(emitted) - 1, -1, -1):
            transition = emitted[n]
            if i > 0 and out[i - 1] == transition:
                i -= 1
                continue
            assert transition in lc.HELD
            later = set(emitted[n + 1:])
            assert later & (lc.RUNNING_AGAIN | {transition}) or (
                transition == "UNDEFINED" and "DEFINED" in later)
        assert i == 0
