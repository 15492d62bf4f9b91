"""wait_for_instance_event: prepare, body, shared deadline, error policy.

Pure (no broker). Threads here are green when the suite runs monkey-patched
(see tests/functional/test_waiter_eventlet.py), native otherwise.
"""

import random
import re
import threading
import time
import uuid

import pytest

from compute import waiting
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

pytestmark = pytest.mark.timeout(30)

PLUG_A = (VIF_PLUGGED, "port-a")
PLUG_B = (VIF_PLUGGED, "port-b")


class Instance:
    def __init__(self):
        self.uuid = str(uuid.uuid4())



@pytest.fixture
def registry():
    return InstanceEvents()


@pytest.fixture
def instance():
    return Instance()


def send(registry, instance, pair, status=COMPLETED, message_id=None):
    name, tag = pair
    return registry.deliver(InstanceEvent(name, instance.uuid, tag, status),
                            message_id or uuid.uuid4().hex)


def deliver_later(registry, instance, *pairs, status=COMPLETED):
    """Deliver from another thread once the waiter is blocked on its gate."""
    def run():
        wakes = []
        deadline = time.monotonic() + 10
        while not wakes and time.monotonic() < deadline:
            with registry._lock:
                wakes = [p.wake for p in registry._pending.values()
                         if p.wake._blocked]
            time.sleep(0.001)
        for pair in pairs:
            send(registry, instance, pair, status)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Recorder:
    def __init__(self, answer=None):
        self.calls = []
        self.answer = answer

    def __call__(self, name, instance):
        self.calls.append((name, instance))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def test_events_are_prepared_before_the_body_runs(registry, instance):
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 5):
        assert registry.pending == 2
        # Caused by the body: it cannot slip past the waiter.
        send(registry, instance, PLUG_A)
        send(registry, instance, PLUG_B)
    assert registry.pending == 0 and registry.held == 0


def test_waiter_blocks_until_events_arrive_from_another_thread(registry,
                                                               instance):
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 10):
        thread = deliver_later(registry, instance, PLUG_A, PLUG_B)
    thread.join(5)
    assert registry.stats["delivered"] == 2 and registry.pending == 0


def test_a_uuid_string_and_bare_names_are_accepted(registry):
    server = str(uuid.uuid4())
    with registry.wait_for_instance_event(server, [NETWORK_CHANGED], 5):
        registry.deliver(InstanceEvent(NETWORK_CHANGED, server), "m")
    assert registry.stats["delivered"] == 1


def test_failed_without_callback_raises_naming_the_event(registry, instance):
    with pytest.raises(waiting.InstanceEventFailed) as err:
        with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 5):
            send(registry, instance, PLUG_B, FAILED)
    message = str(err.value)
    assert "network-vif-plugged (tag port-b)" in message
    assert "failed" in message and instance.uuid in message
    assert (err.value.name, err.value.tag) == PLUG_B
    assert registry.pending == 0, "the unfinished wait left events behind"


def test_callback_false_stops_waiting_at_once(registry, instance):
    callback = Recorder(answer=False)
    started = time.monotonic()
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 30,
                                          error_callback=callback):
        thread = deliver_later(registry, instance, PLUG_B, status=FAILED)
    thread.join(5)
    assert time.monotonic() - started < 10, "waited for port-a after False"
    assert callback.calls == [(PLUG_B, instance)]
    assert registry.pending == 0


@pytest.mark.parametrize("answer", [True, None])
def test_callback_true_keeps_waiting_for_the_rest(registry, instance, answer):
    callback = Recorder(answer=answer)
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 10,
                                          error_callback=callback):
        send(registry, instance, PLUG_A, FAILED)
        thread = deliver_later(registry, instance, PLUG_B)
    thread.join(5)
    assert callback.calls == [(PLUG_A, instance)]
    assert registry.stats["delivered"] == 2


def test_callback_that_raises_propagates(registry, instance):
    boom = RuntimeError("vif plugging is fatal")
    with pytest.raises(RuntimeError) as err:
        with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 10,
                                              error_callback=Recorder(boom)):
            send(registry, instance, PLUG_B, FAILED)
    assert err.value is boom
    assert registry.pending == 0


def test_in_progress_goes_to_the_callback(registry, instance):
    callback = Recorder(answer=True)
    with registry.wait_for_instance_event(instance, [PLUG_A], 5,
                                          error_callback=callback):
        send(registry, instance, PLUG_A, IN_PROGRESS)
    assert callback.calls == [(PLUG_A, instance)]


def test_callback_runs_once_per_event_even_if_redelivered(registry, instance):
    callback = Recorder(answer=True)
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 5,
                                          error_callback=callback):
        send(registry, instance, PLUG_A, FAILED, message_id="dup")
        send(registry, instance, PLUG_A, FAILED, message_id="dup")
        send(registry, instance, PLUG_B)
    assert callback.calls == [(PLUG_A, instance)]


def test_timeout_lists_every_event_and_its_state(instance):
    clock = Clock(500.0)
    registry = InstanceEvents(clock=clock)
    early = (VIF_PLUGGED, "port-early")
    skipped = (NETWORK_CHANGED, None)
    send(registry, instance, early)
    events = [PLUG_A, PLUG_B, early, skipped, (VIF_PLUGGED, "port-f")]
    with pytest.raises(waiting.InstanceEventTimeout) as err:
        with registry.wait_for_instance_event(instance, events, 0,
                                              error_callback=Recorder(True)) as w:
            clock.now += 2.5
            send(registry, instance, PLUG_A)
            clock.now += 1.0
            send(registry, instance, (VIF_PLUGGED, "port-f"), FAILED)
            w.exit_early(skipped)
    timeout = err.value
    assert isinstance(timeout, TimeoutError)
    assert timeout.states == [
        (VIF_PLUGGED, "port-a", "received after 2.5s (completed)"),
        (VIF_PLUGGED, "port-b", "still missing"),
        (VIF_PLUGGED, "port-early", "received early (completed)"),
        (NETWORK_CHANGED, None, "satisfied by the caller (exit early)"),
        (VIF_PLUGGED, "port-f", "received after 3.5s (failed)"),
    ]
    message = str(timeout)
    assert message.startswith(f"timed out after 0s waiting for 5 event(s) of "
                              f"instance {instance.uuid}: ")
    assert "network-vif-plugged (tag port-b): still missing" in message
    assert "network-changed: satisfied by the caller" in message
    assert registry.pending == 0, "timed-out events stayed registered"


def test_deadline_is_shared_not_restarted_by_each_arrival(registry, instance):
    deadline = 2.0

    def halfway():
        time.sleep(deadline / 2)        # the scenario's timing, not a wait
        send(registry, instance, PLUG_A)

    started = time.monotonic()
    with pytest.raises(waiting.InstanceEventTimeout) as err:
        with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B],
                                              deadline):
            thread = threading.Thread(target=halfway)
            thread.start()
    elapsed = time.monotonic() - started
    thread.join(5)
    # A deadline restarted when port-a arrived would end at 1.5x or later.
    assert deadline <= elapsed < deadline * 1.4
    assert re.search(r"port-a\): received after [01]\.\ds \(completed\)",
                     str(err.value))
    assert "port-b): still missing" in str(err.value)


def test_exit_early_skips_the_named_events(registry, instance):
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 10) as w:
        w.exit_early(PLUG_A)
        assert registry.pending == 1
        send(registry, instance, PLUG_B)
    # Nobody waits for port-a any more: when it comes, it is the late event
    # of a wait that ended without it, and cannot satisfy a later one.
    assert send(registry, instance, PLUG_A) == "stale"
    assert registry.held == 0


def test_exit_early_without_arguments_skips_everything(registry, instance):
    started = time.monotonic()
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 20) as w:
        w.exit_early()
    assert time.monotonic() - started < 5 and registry.pending == 0


def test_exit_early_of_an_unexpected_event_is_an_error(registry, instance):
    with pytest.raises(ValueError, match="port-z"):
        with registry.wait_for_instance_event(instance, [PLUG_A], 0) as w:
            w.exit_early((VIF_PLUGGED, "port-z"))
    assert registry.pending == 0


def test_body_exception_abandons_the_wait(registry, instance):
    with pytest.raises(KeyError):
        with registry.wait_for_instance_event(instance, [PLUG_A], 30):
            raise KeyError("plugging failed")
    assert registry.pending == 0


def test_cancel_all_fails_every_waiter_at_once(registry):
    instances = [Instance() for _ in range(20)]
    outcomes = {}

    def wait(inst):
        try:
            with registry.wait_for_instance_event(inst, [PLUG_A, PLUG_B], 30):
                pass
            outcomes[inst.uuid] = "completed"
        except Exception as exc:
            outcomes[inst.uuid] = exc

    threads = [threading.Thread(target=wait, args=(i,)) for i in instances]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while registry.pending < 40 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert registry.cancel_all() == 40
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 20
    for exc in outcomes.values():
        assert isinstance(exc, waiting.InstanceEventFailed)
        assert "cancelled: the service is shutting down" in str(exc)


def test_after_cancel_all_prepares_are_refused_before_the_body(registry,
                                                               instance):
    registry.cancel_all()
    ran = []
    with pytest.raises(waiting.InstanceEventFailed, match="refused"):
        with registry.wait_for_instance_event(instance, [PLUG_A], 30):
            ran.append(True)
    assert ran == []
    callback = Recorder(answer=True)
    started = time.monotonic()
    with registry.wait_for_instance_event(instance, [PLUG_A, PLUG_B], 30,
                                          error_callback=callback):
        ran.append(True)
    assert ran == [True] and time.monotonic() - started < 5
    assert callback.calls == [(PLUG_A, instance), (PLUG_B, instance)]


def test_clear_during_a_wait_fails_it(registry, instance):
    callback = Recorder(answer=True)
    with registry.wait_for_instance_event(instance, [PLUG_A], 30,
                                          error_callback=callback):
        registry.clear(instance.uuid)
    assert callback.calls == [(PLUG_A, instance)]


def test_many_waiters_race_deliveries_and_deadlines(registry):
    """Deliveries racing timeouts: every waiter ends, none twice, no leak."""
    rng = random.Random(7)
    results = []
    lock = threading.Lock()

    def wait(inst, deadline):
        try:
            with registry.wait_for_instance_event(inst, [PLUG_A, PLUG_B],
                                                  deadline):
                pass
            outcome = "ok"
        except waiting.InstanceEventTimeout:
            outcome = "timeout"
        with lock:
            results.append(outcome)

    instances = [Instance() for _ in range(150)]
    threads = [threading.Thread(target=wait,
                                args=(i, rng.choice([0.001, 0.01, 0.05, 5])))
               for i in instances]
    for t in threads:
        t.start()
    for inst in rng.sample(instances, len(instances)):
        for pair in (PLUG_A, PLUG_B):
            send(registry, inst, pair)
        if rng.random() < 0.2:
            time.sleep(0)   # let waiters run between deliveries
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 150 and "ok" in results
    assert registry.pending == 0


def test_gate_wakes_a_blocked_waiter_and_survives_late_opening():
    lock = threading.Lock()
    wake = waiting.Wake(lock)
    prepared = waiting.PreparedEvent(("u", VIF_PLUGGED, None), 0.0, wake)
    got = []
    thread = threading.Thread(
        target=lambda: got.append(wake.wait(time.monotonic() + 10,
                                            time.monotonic)))
    thread.start()
    deadline = time.monotonic() + 10
    while not wake._blocked and time.monotonic() < deadline:
        time.sleep(0.001)
    with lock:
        prepared._resolve(InstanceEvent(VIF_PLUGGED, "u"), "m", 1.0,
                          waiting.RECEIVED)
    thread.join(5)
    assert got == [[prepared]]
    # A timed-out wait leaves the gate locked, so the next wait blocks.
    assert wake.wait(time.monotonic() + 0.05, time.monotonic) == []
    assert wake._gate.locked() and not wake._blocked


class RacingGate:
    """A gate whose timed wait runs out just as a deliverer opens it."""

    def __init__(self):
        self.is_locked = True
        self.on_timeout = None

    def acquire(self, blocking=True, timeout=-1):
        if timeout != -1:
            self.on_timeout()       # the deliverer opens the gate now...
            return False            # ...but our timed wait had run out
        assert not self.is_locked, "would block for ever"
        self.is_locked = True
        return True

    def release(self):
        if not self.is_locked:
            raise RuntimeError("release unlocked lock")
        self.is_locked = False

    def locked(self):
        return self.is_locked


def test_gate_opened_just_after_a_timeout_is_locked_again():
    lock = threading.Lock()
    wake = waiting.Wake(lock)
    gate = wake._gate = RacingGate()
    first = waiting.PreparedEvent(("u", VIF_PLUGGED, "a"), 0.0, wake)
    second = waiting.PreparedEvent(("u", VIF_PLUGGED, "b"), 0.0, wake)

    def deliver(prepared):
        with lock:
            prepared._resolve(InstanceEvent(VIF_PLUGGED, "u"), "m", 1.0,
                              waiting.RECEIVED)

    gate.on_timeout = lambda: deliver(first)
    assert wake.wait(time.monotonic() + 10, time.monotonic) == [first]
    assert gate.locked(), "a gate left open wakes the next wait for nothing"
    # And the next delivery to a blocked waiter must find it locked.
    gate.on_timeout = lambda: deliver(second)
    assert wake.wait(time.monotonic() + 10, time.monotonic) == [second]
    assert gate.locked()


@pytest.mark.parametrize("timeout, error", [
    (float("nan"), ValueError), (None, TypeError), ("5", TypeError), (True, TypeError)])
def test_a_timeout_that_is_not_a_number_is_refused_before_the_body(
        registry, instance, timeout, error):
    ran = []
    with pytest.raises(error, match="timeout"):
        with registry.wait_for_instance_event(instance, [PLUG_A], timeout=timeout):
            ran.append(1)           # the caller's work: a VM started
    assert ran == []
    # nothing was prepared: the event, when it comes, is held, not stale
    assert send(registry, instance, PLUG_A) == "held"


@pytest.mark.parametrize("timeout", [10 ** 400, float("inf")])
def test_a_timeout_too_large_for_a_float_waits_as_inf(registry, instance, timeout):
    deliver_later(registry, instance, PLUG_A)
    with registry.wait_for_instance_event(instance, [PLUG_A], timeout=timeout) as w:
        assert w.timeout == float("inf")


@pytest.mark.parametrize("events", [
    VIF_PLUGGED, b"ab", [b"ab"], [(VIF_PLUGGED, 7)], [(1, None)], [VIF_PLUGGED, 3]])
def test_events_that_could_never_match_are_refused_before_the_body(
        registry, instance, events):
    ran = []
    with pytest.raises((TypeError, ValueError), match="event|pair"):
        with registry.wait_for_instance_event(instance, events, timeout=1):
            ran.append(1)
    assert ran == []


def test_an_instance_uuid_given_as_a_uuid_waits_for_its_string(registry):
    server = uuid.uuid4()
    registry_instance = type("I", (), {"uuid": server})()
    deliver_later(registry, type("I", (), {"uuid": str(server)})(), PLUG_A)
    with registry.wait_for_instance_event(registry_instance, [PLUG_A], timeout=10):
        pass
