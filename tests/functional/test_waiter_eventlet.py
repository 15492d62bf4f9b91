"""The waiter suite again, in a process monkey-patched by eventlet.

OpenStack compute services still run on green threads, so the library must
work there as well as with native threads. The monkey-patching has to come
before anything imports threading or socket, hence a bootstrap instead of a
conftest hook; by hand:

    EVROUTER_TEST_EVENTLET=1 python -c "import eventlet; eventlet.monkey_patch(); \
import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))" -q \
        tests/unit/test_waiter_registry.py tests/unit/test_waiter_wait.py \
        tests/unit/test_host_consumer_memory.py tests/functional/test_waiter_bus.py \
        tests/functional/test_host_consumer.py tests/unit/test_wait_fds.py \
        tests/functional/test_waiter_eventlet.py
"""

import os
import pathlib
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

import pytest

GREEN = os.environ.get("EVROUTER_TEST_EVENTLET") == "1"
ROOT = pathlib.Path(__file__).resolve().parents[2]
BOOTSTRAP = ("import eventlet; eventlet.monkey_patch(); "
             "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))")
SUITE = ["tests/unit/test_waiter_registry.py", "tests/unit/test_waiter_wait.py",
         "tests/unit/test_host_consumer_memory.py",
         "tests/functional/test_waiter_bus.py",
         "tests/functional/test_host_consumer.py",
         # the green path of wait_fds (eventlet's select); not
         # test_many_fds: green threads of the tests before it close
         # sockets late, so its host consumer could get a low descriptor
         "tests/unit/test_wait_fds.py",
         "tests/functional/test_waiter_eventlet.py"]


@pytest.mark.skipif(not GREEN, reason="only in the monkey-patched run")
def test_this_process_runs_green_threads():
    import eventlet.patcher
    import greenlet

    for module in ("thread", "socket", "time", "select"):
        assert eventlet.patcher.is_monkey_patched(module), module
    ran_in = []
    thread = threading.Thread(target=lambda: ran_in.append(greenlet.getcurrent()))
    thread.start()
    thread.join()
    # A green thread is a greenlet under the hub, not the process's main one.
    assert ran_in[0].parent is not None
    from compute import events
    wake = events.InstanceEvents().new_wake()
    wake.wait(time.monotonic() + 0.01, time.monotonic)     # makes its gate
    assert type(wake._gate).__module__.startswith("eventlet")


@pytest.mark.skipif(GREEN, reason="this is the monkey-patched run")
@pytest.mark.timeout(240)
def test_waiter_suite_passes_under_eventlet(tmp_path):
    report = tmp_path / "green.xml"
    env = dict(os.environ, EVROUTER_TEST_EVENTLET="1")
    proc = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}", *SUITE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    passed, skipped = set(), set()
    for case in ET.parse(report).iter("testcase"):
        name = case.get("name")
        if case.find("skipped") is not None:
            skipped.add(name)
        elif case.find("failure") is None and case.find("error") is None:
            passed.add(name)
    assert "test_this_process_runs_green_threads" in passed
    assert skipped == {"test_waiter_suite_passes_under_eventlet"}
    assert len(passed) >= 50, sorted(passed)
