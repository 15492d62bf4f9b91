"""The reconnect schedule: pure, on a hand-set clock and random source.

The failure class: a reconnect loop that treats a mere connect as success,
so a session that dies young reconnects at once, for ever. The state
machine below interleaves every way a session ends (a refused connect, a
loss after any time up, long or short) and checks after each step that the
wait grows exactly while no session ran healthy, resets only after one did,
and stays inside its jitter bounds.
"""

import math
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from router.bus import backoff as backoff_module
from router.bus import supervision
from router.bus.backoff import Backoff, Ready, Schedule, reconnect_schedule
from tests.unit.clock import Clock

SCHEDULE = Schedule(first=0.5, cap=30.0, healthy_after=10.0, jitter=0.5)


class Rand:
    """random.random that returns what the test sets."""

    def __init__(self, value=0.0):
        self.value = value

    def __call__(self):
        return self.value


def backoff(rand=0.0, schedule=SCHEDULE):
    clock = Clock()
    return Backoff(schedule, clock=clock, rand=Rand(rand)), clock


def test_the_wait_doubles_while_connects_fail_up_to_the_cap():
    b, _ = backoff()
    waits = [b.failed("refused") for _ in range(10)]
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert b.attempt == 10


def test_sessions_that_die_young_grow_it_like_refused_connects():
    b, clock = backoff()
    waits = []
    for _ in range(6):
        clock.now += 1.0                    # the reconnect...
        up = clock.now
        clock.now += 9.9                    # ...ran 9.9 s, not 10
        waits.append(b.failed("lost", up_since=up))
    assert waits == [0.5, 1, 2, 4, 8, 16]


def test_a_healthy_run_starts_it_afresh():
    b, clock = backoff()
    for _ in range(5):
        b.failed("refused")
    up = clock.now
    clock.now += 10.0
    assert b.failed("lost", up_since=up) == 0.5
    assert (b.attempt, b.resets) == (1, 1)


def test_jitter_stays_in_the_upper_half_of_the_ceiling():
    low, _ = backoff(rand=0.999999)
    high, _ = backoff(rand=0.0)
    for attempt in range(1, 9):
        ceiling = SCHEDULE.ceiling(attempt)
        assert low.failed("x") == pytest.approx(ceiling / 2, rel=1e-5)
        assert high.failed("x") == ceiling


@given(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=40))
def test_real_random_draws_stay_in_bounds(draws):
    b = Backoff(SCHEDULE, clock=Clock(), rand=iter(draws).__next__)
    for attempt in range(1, len(draws) + 1):
        wait = b.failed("x")
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert ceiling / 2 <= wait <= ceiling


@given(st.floats(0.1, 30.0), st.lists(st.floats(0, 1, exclude_max=True),
                                      min_size=40, max_size=40))
def test_connects_in_a_window_are_bounded_when_every_session_dies_young(
        window, draws):
    # The thundering-herd bound of one client: when each session dies as
    # soon as it is up, its connects within `window` seconds (below the
    # cap) are at most log2(window / 0.25 + 1) + 1, whatever the draws:
    # 5 in 5 s, where the old loop made hundreds.
    b = Backoff(SCHEDULE, clock=Clock(), rand=iter(draws).__next__)
    elapsed, connects = 0.0, 1
    while True:
        elapsed += b.failed("403")
        if elapsed > window:
            break
        connects += 1
    assert connects <= math.log2(window / 0.25 + 1) + 1


def test_a_short_cap_lowers_the_first_wait_too():
    s = reconnect_schedule(cap=0.2)
    assert (s.first, s.cap) == (0.2, 0.2)
    assert [s.ceiling(n) for n in (1, 2, 50, 10**6)] == [0.2] * 4


def test_a_long_outage_never_overflows():
    b, _ = backoff()
    b.attempt = 10**6
    assert b.failed("still away") == 30.0


@pytest.mark.parametrize("bad", [dict(first=-1), dict(cap=-1),
                                 dict(healthy_after=-1), dict(jitter=1.5)])
def test_nonsense_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        Schedule(**bad)


def test_status_says_attempt_wait_and_cause():
    b, _ = backoff()
    assert b.status() == ""
    b.failed(PermissionError("ACCESS_REFUSED - no write on lifecycle"))
    b.failed(PermissionError("ACCESS_REFUSED - no write on lifecycle"))
    assert b.status() == ("reconnect attempt 2 after a 1.0s backoff (last: "
                          "PermissionError: ACCESS_REFUSED - no write on "
                          "lifecycle)")


def test_wait_sleeps_on_the_stop_event_and_a_stop_ends_it_at_once():
    b = Backoff(Schedule(first=60.0, cap=60.0))
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    started = time.monotonic()
    assert b.wait(stop, "test", "refused") is False
    assert time.monotonic() - started < 5
    # Already stopping: no wait, no attempt counted, no log line.
    assert b.wait(stop, "test", "refused") is False
    assert b.attempt == 1


def test_wait_logs_one_line_with_the_delay_and_the_cause(caplog):
    b = Backoff(Schedule(first=0.01, cap=0.01))
    assert b.wait(threading.Event(), "router r1", KeyError("boom"))
    [record] = caplog.records
    assert record.getMessage().startswith(
        "router r1: could not connect (KeyError: 'boom'); reconnect attempt 1 in 0.01")


def test_ready_remembers_since_when_it_is_set():
    ready = Ready()
    assert ready.since is None
    before = time.monotonic()
    ready.set()
    since = ready.since
    assert since >= before
    ready.set()                         # still the same session
    assert ready.since == since
    ready.clear()
    assert ready.since is None and not ready.is_set()


def test_supervision_restarts_a_crash_loop_with_growing_waits():
    waits = []

    def body():
        if len(waits) == 4:
            return "done"
        raise RuntimeError("bug")

    class Recording(threading.Event):
        def wait(self, timeout=None):
            waits.append(timeout)
            return False

    stop = Recording()
    result = supervision.run_supervised(
        body, stop, "test loop",
        schedule=Schedule(first=0.5, cap=30.0, healthy_after=30.0, jitter=0))
    assert result == "done"
    assert waits == [0.5, 1.0, 2.0, 4.0]


class _GreenTimeout(BaseException):
    pass


@pytest.mark.parametrize("error", [RuntimeError, _GreenTimeout])
def test_a_loop_that_raised_anything_but_an_exit_is_restarted(error):
    runs, failures = [], []

    def body():
        runs.append(1)
        if len(runs) == 1:
            raise error("bug")
        return "done"

    stop = threading.Event()
    result = supervision.run_supervised(
        body, stop, "test loop", on_failure=failures.append,
        schedule=Schedule(first=0.01, cap=0.01, healthy_after=30.0, jitter=0))
    assert result == "done" and len(runs) == 2
    assert [type(f) for f in failures] == [error]


@pytest.mark.parametrize("error", list(supervision.FATAL))
def test_an_exit_ends_the_loop(error):
    def body():
        raise error()

    with pytest.raises(error):
        supervision.run_supervised(body, threading.Event(), "test loop")


class SessionEnds(RuleBasedStateMachine):
    """Any interleaving of refused connects and sessions lost after any time."""

    def __init__(self):
        super().__init__()
        self.rand = Rand()
        self.clock = Clock()
        self.b = Backoff(SCHEDULE, clock=self.clock, rand=self.rand)
        self.expected_attempt = 0
        self.wait = None

    def _end(self, up_for, draw):
        self.rand.value = draw
        up_since = None
        if up_for is not None:
            up_since = self.clock.now
            self.clock.now += up_for
            # As the clock says, not up_for: (t + 10.0) - t can be
            # 9.999999999999998 in floats (hypothesis found it).
            if self.clock.now - up_since >= SCHEDULE.healthy_after:
                self.expected_attempt = 0
        self.expected_attempt += 1
        self.wait = self.b.failed("end", up_since)
        self.clock.now += self.wait

    @rule(draw=st.floats(0, 1, exclude_max=True))
    def connect_refused(self, draw):
        self._end(None, draw)

    @rule(up_for=st.floats(0, 9.999), draw=st.floats(0, 1, exclude_max=True))
    def lost_young(self, up_for, draw):
        self._end(up_for, draw)

    @rule(up_for=st.floats(10, 1e6), draw=st.floats(0, 1, exclude_max=True))
    def lost_after_a_healthy_run(self, up_for, draw):
        self._end(up_for, draw)

    @invariant()
    def the_attempt_counts_failures_since_the_last_healthy_run(self):
        assert self.b.attempt == self.expected_attempt

    @invariant()
    def the_wait_is_within_its_attempts_jitter_window(self):
        if self.wait is not None:
            ceiling = SCHEDULE.ceiling(self.expected_attempt)
            assert ceiling / 2 <= self.wait <= ceiling <= SCHEDULE.cap


TestSessionEnds = SessionEnds.TestCase
TestSessionEnds.settings = settings(max_examples=200, stateful_step_count=40,
                                    deadline=None)


def test_a_refused_copy_waits_longer_each_time_up_to_the_cap():
    delays = [backoff_module.refused_copy_delay(n) for n in range(1, 12)]
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert delays == sorted(delays) and max(delays) == backoff_module.REFUSED_CAP
