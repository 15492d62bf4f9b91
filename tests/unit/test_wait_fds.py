"""Waiting on descriptors numbered past FD_SETSIZE (1,024).

select() refuses them ("filedescriptor out of range in select()"): a
host consumer or lifecycle agent in a process with that many files open
failed on every wait, restarted, and failed again. wait_fds polls.
"""

import socket
import threading
import time

import pytest

from compute.handoff import Handoff
from router.bus.connection import Waker, wait_fds
from tests.fds import ABOVE, past_fd_setsize

pytestmark = pytest.mark.timeout(30)


def test_a_descriptor_past_fd_setsize_is_waited_on():
    with past_fd_setsize():
        a, b = socket.socketpair()
    with a, b:
        assert a.fileno() > ABOVE
        assert wait_fds((a.fileno(),), 0.05) == set()
        b.send(b"x")
        assert wait_fds((a.fileno(), b.fileno()), 5) == {a.fileno()}


def test_the_wait_lasts_its_timeout_and_no_longer():
    a, b = socket.socketpair()
    with a, b:
        started = time.monotonic()
        assert wait_fds((a.fileno(),), 0.2) == set()
        assert 0.19 <= time.monotonic() - started < 2
        started = time.monotonic()
        assert wait_fds((a.fileno(),), -1) == set()      # past: no wait
        assert time.monotonic() - started < 0.5


def test_a_waker_past_fd_setsize_ends_the_wait():
    with past_fd_setsize():
        waker = Waker()
    assert waker.fileno() > ABOVE
    threading.Timer(0.05, waker.wake).start()
    started = time.monotonic()
    assert wait_fds((waker.fileno(),), 10) == {waker.fileno()}
    assert time.monotonic() - started < 2


def test_a_handoff_past_fd_setsize_wakes_its_reader():
    with past_fd_setsize():
        handoff = Handoff()
    threading.Timer(0.05, handoff.put, args=("x",)).start()
    started = time.monotonic()
    assert handoff.take(10) == ["x"]
    assert time.monotonic() - started < 2
    handoff.close()


@pytest.mark.parametrize("timeout", [30 * 86400.0, float("inf")],
                         ids=["30-days", "inf"])
def test_a_wait_longer_than_polls_range_is_taken(timeout):
    """An agent's idle wait runs to its next snapshot: snapshot_interval
    has no maximum, and poll() refuses more than 2**31 - 1 ms (the agent
    exited with OverflowError at start)."""
    waker = Waker()
    threading.Timer(0.05, waker.wake).start()
    started = time.monotonic()
    assert wait_fds((waker.fileno(),), timeout) == {waker.fileno()}
    assert time.monotonic() - started < 2
    handoff = Handoff()
    threading.Timer(0.05, handoff.put, args=("x",)).start()
    assert handoff.take(timeout) == ["x"]
    handoff.close()


def test_a_nan_timeout_does_not_wait():
    a, b = socket.socketpair()
    with a, b:
        started = time.monotonic()
        assert wait_fds((a.fileno(),), float("nan")) == set()
        assert time.monotonic() - started < 0.5


def test_a_descriptor_that_is_not_open_raises_as_select_does():
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    with b, pytest.raises(OSError):
        wait_fds((fd,), 0.1)
