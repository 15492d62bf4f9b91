"""An idle compute host costs nothing measurable (issue 22, item 2).

A cloud has up to 2,000 compute hosts per router pair, most of them idle most
of the time. Each evrouter thread on a host (the host consumer inside
nova-compute; the agent's dispatcher and lifecycle publisher) once woke on a
short timeout to look at a flag or poll its socket: 4 to 35 wake-ups a
second, 1.2 ms of CPU a second for the host consumer and 6.4 ms for the
publisher on the development VM. Now each sleeps until something arrives,
is due (its next heartbeat check, a quarter of the heartbeat: 7.5 s by
default) or stop() wakes it.

Wake-ups are counted as the thread's context switches (the kernel's count,
/proc): unlike CPU time they do not depend on how busy the machine is. And
each test checks the other half of the bargain: a thread that sleeps long
must still answer at once when something comes, and stop at once.
"""

import time

from router.bus import contract
from tests.functional.waiter_harness import new_uuid

IDLE = 8.0              # seconds watched: at least one heartbeat check
MAX_WAKEUPS = 4         # in IDLE: heartbeat checks and the broker's heartbeats
PROMPT = 0.5            # seconds: an event or a stop() is answered within


def _switches(thread):
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        return sum(int(line.split(":")[1]) for line in f
                   if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))


def _settled(*threads, quiet=0.5, timeout=5.0):
    """Wait until the threads' start-up work (declares, consume, the first
    checks, the agent's snapshot and announcement) is over: no wake-up for
    `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = [_switches(t) for t in threads]
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = [_switches(t) for t in threads]
        if now == last:
            return
        last = now
    raise AssertionError(f"threads still busy {timeout}s after their start")


def _wakeups_while_idle(*threads):
    before = [_switches(t) for t in threads]
    time.sleep(IDLE)
    return [_switches(t) - b for t, b in zip(threads, before, strict=True)]


def test_an_idle_host_consumer_sleeps_and_still_answers_at_once(host,
                                                                publisher):
    _settled(host.thread)
    [wakeups] = _wakeups_while_idle(host.thread)
    assert wakeups <= MAX_WAKEUPS, f"{wakeups} wake-ups in {IDLE}s idle"

    server = new_uuid()
    event = host.event(server, contract.VIF_PLUGGED, "port-1")
    with host.registry.wait_for_instance_event(
            server, [(contract.VIF_PLUGGED, "port-1")], 10):
        sent = time.monotonic()
        publisher.to_host(host.host, contract.encode(event))
    assert time.monotonic() - sent < PROMPT

    stopped = time.monotonic()
    host.stop(timeout=5)
    assert time.monotonic() - stopped < PROMPT


def test_an_idle_agent_sleeps_and_still_publishes_at_once(driver, listener,
                                                          start_agent):
    running = start_agent()
    dispatcher, publisher = running.thread, running.agent._publisher._thread
    _settled(dispatcher, publisher)
    wakeups = _wakeups_while_idle(dispatcher, publisher)
    assert max(wakeups) <= MAX_WAKEUPS, (
        f"dispatcher, publisher: {wakeups} wake-ups in {IDLE}s idle")

    dom = driver.define()
    defined = time.monotonic()
    listener.wait_transitions(dom.UUIDString(), ["DEFINED"], timeout=10)
    assert listener.arrival(dom.UUIDString(), "DEFINED") - defined < PROMPT

    stopped = time.monotonic()
    running.stop(timeout=10)
    assert time.monotonic() - stopped < PROMPT + 0.5   # it says goodbye

