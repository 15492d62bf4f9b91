"""What no test may leave behind: threads it started, logging it set up.

Autouse fixtures, imported by tests/conftest.py so every test gets them.
"""

import logging
import sys
import threading
import time
import traceback

import pytest

# --- no thread outlives the test that started it -------------------------------

# Threads that live as long as the process by design, by name, each with why.
PROCESS_WIDE_THREADS = {
    # compute.libvirt_watch.start_event_loop: libvirt's default event loop
    # can be registered once per process and never stopped.
    "libvirt-events": "libvirt's event loop, once per process",
}
THREAD_FINISH_GRACE = 2.0   # seconds a test's threads get to finish on their own


def _process_wide(thread):
    if thread.name in PROCESS_WIDE_THREADS:
        return True
    # A native thread of a C library (libvirt's own) that called into
    # Python: the threading module keeps a stand-in for it for ever; no
    # test started it and none can join it.
    return isinstance(thread, threading._DummyThread)


def _describe(thread):
    frame = sys._current_frames().get(thread.ident)
    where = "".join(traceback.format_stack(frame)[-4:]) if frame else ""
    target = getattr(thread, "_target", None)
    return (f"{thread.name!r} (daemon={thread.daemon}, target="
            f"{getattr(target, '__qualname__', target)})\n{where}")


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    """Fail a test that leaves a thread running that it started.

    A thread that outlives its test keeps logging into pytest's closed
    capture streams ("--- Logging error --- ValueError: I/O operation on
    closed file"), holds broker connections and eats the next tests' CPU.
    Services must stop and join what they start, and fixtures must stop
    the services. Threads that are finishing get THREAD_FINISH_GRACE."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_FINISH_GRACE
    left = [t for t in threading.enumerate()
            if t not in before and not _process_wide(t)]
    for thread in left:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in left if t.is_alive()]
    if left:
        pytest.fail(f"{len(left)} thread(s) started by this test still run "
                    f"{THREAD_FINISH_GRACE:.0f}s after it ended:\n"
                    + "\n".join(_describe(t) for t in left), pytrace=False)


# --- no logging configuration outlives the test that made it -----------------

def _pytests(handler):
    # pytest's own capture handlers come and go with each test phase.
    return type(handler).__module__.startswith("_pytest")


def logging_state():
    """What tests may change about logging: root and every existing logger."""
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values()
        if isinstance(lg, logging.Logger)]
    return {lg: (lg.level, lg.propagate, lg.disabled,
                 [h for h in lg.handlers if not _pytests(h)])
            for lg in loggers}


def restore_logging(state):
    """Put the loggers of `state` back as they were; handlers added since
    are removed and closed. Loggers created since are left alone: only
    the process's entry points add handlers, and they add them to root."""
    for lg, (level, propagate, disabled, handlers) in state.items():
        for handler in list(lg.handlers):
            if not _pytests(handler) and handler not in handlers:
                lg.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in lg.handlers:
                lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


@pytest.fixture(autouse=True)
def logging_restored():
    """Undo what a test did to logging.

    A command's main() run in-process (evrouter publish, permissions, the
    CLI) sets logging up as a process would: oslo.log replaces root's
    handlers with one writing to sys.stderr, which during that test is
    pytest's capture stream, closed when the test ends. Every later log
    record, from any thread of any test, then failed with "--- Logging
    error --- ValueError: I/O operation on closed file" (287 of them in
    the agent tests run after tests/unit/test_publish_cli.py)."""
    state = logging_state()
    yield
    restore_logging(state)
