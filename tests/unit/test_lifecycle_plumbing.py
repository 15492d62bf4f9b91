"""The agent's hand-overs without a hypervisor or a broker.

Handoff (native thread → dispatcher), Outbox (dispatcher → publisher), the
migration-job probe and LibvirtWatcher's connection handling, the last two
against fake libvirt objects so that every failure path can be forced.
"""

import threading
import time

import libvirt
import pytest

from compute import libvirt_watch
from compute.handoff import Handoff
from compute.lifecycle_publisher import Outbox, Outgoing
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(30)


# --- Handoff ------------------------------------------------------------------

def test_handoff_keeps_order_across_threads():
    h = Handoff()
    writers = [threading.Thread(target=lambda n=n: [h.put((n, i))
                                                     for i in range(500)])
               for n in range(4)]
    for w in writers:
        w.start()
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 2000 and time.monotonic() < deadline:
        got += h.take(0.1)
    for w in writers:
        w.join()
    assert len(got) == 2000
    for n in range(4):
        assert [i for m, i in got if m == n] == list(range(500))


def test_handoff_take_waits_at_most_its_timeout():
    h = Handoff()
    start = time.monotonic()
    assert h.take(0.2) == []
    assert 0.15 <= time.monotonic() - start < 2


def test_handoff_wakes_the_reader_at_once():
    h = Handoff()
    threading.Timer(0.05, h.put, args=("x",)).start()
    start = time.monotonic()
    assert h.take(10) == ["x"]
    assert time.monotonic() - start < 2


def test_handoff_put_never_blocks_even_when_nobody_reads():
    # Far more wake-up bytes than a pipe holds: put must still return.
    h = Handoff()
    for i in range(200_000):
        h.put(i)
    assert h.take(0) == list(range(200_000))
    assert h.take(0) == []


def test_handoff_positions_increase():
    h = Handoff()
    a, b = h.next_position(), h.next_position()
    assert a < b


# --- Outbox -------------------------------------------------------------------

def _msg(n):
    return Outgoing(f"id-{n}", b"{}", f"message {n}")


def test_outbox_is_bounded_and_drops_the_oldest():
    box = Outbox(limit=3)
    msgs = [_msg(n) for n in range(5)]
    assert [box.put(m) for m in msgs] == [None, None, None, msgs[0], msgs[1]]
    assert box.dropped == 2 and len(box) == 3
    assert box.head(0) is msgs[2]


def test_outbox_removes_only_a_confirmed_head():
    box = Outbox(limit=2)
    first, second, third = _msg(1), _msg(2), _msg(3)
    box.put(first)
    box.put(second)
    head = box.head(0)
    box.put(third)              # drops `first` while it was being published
    box.remove(head)            # its confirm must not remove `second`
    assert box.head(0) is second


def test_outbox_head_waits_and_close_wakes_it():
    box = Outbox(limit=2)
    assert box.head(0.05) is None
    threading.Timer(0.05, box.close).start()
    start = time.monotonic()
    assert box.head(10) is None
    assert box.closed and time.monotonic() - start < 2


# --- the migration job probe --------------------------------------------------

def _error(code):
    exc = libvirt.libvirtError("fake")
    exc.err = (code, 0, "fake", 2, None, None, None, 0, 0)
    return exc


class FakeDomain:
    def __init__(self, uuid="6695eb01-f6a4-8304-79aa-97f2502e193f", *,
                 job=None, active=1, state=libvirt.VIR_DOMAIN_RUNNING):
        self.uuid, self.job, self.active, self.state_ = uuid, job, active, state

    def UUIDString(self):
        return self.uuid

    def jobStats(self):
        if isinstance(self.job, Exception):
            raise self.job
        return {"type": self.job}

    def isActive(self):
        if isinstance(self.active, Exception):
            raise self.active
        return self.active

    def state(self):
        if isinstance(self.state_, Exception):
            raise self.state_
        return [self.state_, 1]


@pytest.mark.parametrize("job, active, completed", [
    (libvirt.VIR_DOMAIN_JOB_COMPLETED, 1, True),
    (libvirt.VIR_DOMAIN_JOB_FAILED, 0, False),
    (libvirt.VIR_DOMAIN_JOB_NONE, 1, False),
    (libvirt.VIR_DOMAIN_JOB_NONE, 0, True),
    (libvirt.VIR_DOMAIN_JOB_NONE, _error(libvirt.VIR_ERR_NO_DOMAIN), True),
    (_error(libvirt.VIR_ERR_NO_DOMAIN), 1, True),
    (_error(libvirt.VIR_ERR_OPERATION_INVALID), 1, True),
    (_error(libvirt.VIR_ERR_NO_SUPPORT), 0, True),
    (_error(libvirt.VIR_ERR_NO_SUPPORT), 1, False),
    (_error(libvirt.VIR_ERR_INTERNAL_ERROR), 0, False),
])
def test_migration_completed_asks_like_openstack(job, active, completed):
    dom = FakeDomain(job=job, active=active)
    assert libvirt_watch.migration_completed(dom) is completed


# --- LibvirtWatcher against fake connections ----------------------------------

class FakeConnection:
    def __init__(self, *, keepalive=False, domains=()):
        self.keepalive = keepalive
        self.domains = list(domains)
        self.alive = True
        self.closed = False
        self.on_close = None
        self.on_lifecycle = None

    def registerCloseCallback(self, cb, opaque):
        self.on_close = cb

    def unregisterCloseCallback(self):
        self.on_close = None

    def domainEventRegisterAny(self, dom, event_id, cb, opaque):
        assert event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        self.on_lifecycle = cb
        return 1

    def domainEventDeregisterAny(self, callback_id):
        if not self.alive:
            raise _error(libvirt.VIR_ERR_INTERNAL_ERROR)
        self.on_lifecycle = None

    def setKeepAlive(self, interval, count):
        if not self.keepalive:
            raise _error(libvirt.VIR_ERR_NO_SUPPORT)

    def getLibVersion(self):
        if not self.alive:
            raise _error(libvirt.VIR_ERR_INTERNAL_ERROR)
        return 9_000_000

    def listAllDomains(self):
        if not self.alive:
            raise _error(libvirt.VIR_ERR_INTERNAL_ERROR)
        return self.domains

    def close(self):
        self.closed = True


class Opener:
    """libvirt.open stand-in: refuses `failures` times, then hands out conns."""

    def __init__(self, conns, failures=0):
        self.conns = list(conns)
        self.failures = failures
        self.calls = 0

    def __call__(self, uri):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise _error(libvirt.VIR_ERR_SYSTEM_ERROR)
        return self.conns.pop(0)


class Items:
    """What a watcher hands over, collected as the dispatcher would."""

    def __init__(self, handoff):
        self.handoff = handoff
        self.seen = []

    def wait(self, kind, count=1, timeout=10):
        def enough():
            self.seen += self.handoff.take(0.02)
            return len([i for i in self.seen if i[0] == kind]) >= count
        wait_for(enough, timeout, what=f"{count} {kind!r} item(s)")
        return [i for i in self.seen if i[0] == kind][count - 1]

    def kinds(self):
        return [i[0] for i in self.seen]


@pytest.fixture
def watch():
    watchers = []

    def start(opener, **kwargs):
        h = Handoff()
        w = libvirt_watch.LibvirtWatcher("fake:///", h, opener=opener,
                                         reconnect_max=0.05, **kwargs)
        watchers.append(w)
        w.start()
        return w, Items(h)

    yield start
    for w in watchers:
        w.stop()
        w._thread.join(5)
        assert not w._thread.is_alive()


def test_watcher_snapshots_on_connect_and_on_request(watch):
    dom = FakeDomain(state=libvirt.VIR_DOMAIN_PAUSED)
    gone = FakeDomain("33333333-3333-3333-3333-333333333333",
                      state=_error(libvirt.VIR_ERR_NO_DOMAIN))
    conn = FakeConnection(domains=[dom, gone])
    watcher, items = watch(Opener([conn]))
    assert items.wait("libvirt-up") == ("libvirt-up", "probe")
    _, listed_after, states = items.wait("snapshot")
    assert states == [(dom.uuid, libvirt.VIR_DOMAIN_PAUSED)]
    watcher.request_snapshot()
    _, later, _ = items.wait("snapshot", 2)
    assert later > listed_after


def test_watcher_hands_events_over_as_values(watch):
    conn = FakeConnection()
    _, items = watch(Opener([conn]))
    items.wait("snapshot")
    dom = FakeDomain()
    conn.on_lifecycle(conn, dom, libvirt.VIR_DOMAIN_EVENT_STOPPED,
                      libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, None)
    _, position, uuid, event, detail, handle = items.wait("event")
    assert (uuid, event, detail, handle) == (dom.uuid, 5, 1, dom)
    assert position > 0


def test_watcher_probes_a_connection_without_keepalive(watch):
    first, second = FakeConnection(), FakeConnection()
    _, items = watch(Opener([first, second]), probe_interval=0.05)
    items.wait("snapshot")
    first.alive = False
    assert items.wait("libvirt-down") == ("libvirt-down",
                                          "liveness probe failed")
    items.wait("snapshot", 2)               # reconnected and resynced
    assert first.closed and not second.closed
    # A loss is a failed session like a refused open: reported with its
    # reconnect attempt and delay, then the reconnect.
    assert items.kinds() == ["libvirt-up", "snapshot", "libvirt-down",
                             "libvirt-retry", "libvirt-up", "snapshot"]


def test_watcher_reconnects_on_the_close_callback(watch):
    first, second = FakeConnection(keepalive=True), FakeConnection()
    _, items = watch(Opener([first, second]), probe_interval=60)
    assert items.wait("libvirt-up") == ("libvirt-up", "keepalive")
    items.wait("snapshot")
    on_close = first.on_close
    on_close(first, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
    assert items.wait("libvirt-down") == ("libvirt-down", "end of file")
    items.wait("snapshot", 2)
    # A late close callback of the old connection changes nothing.
    on_close(first, libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE, None)
    items.wait("libvirt-up", 2)
    assert items.kinds().count("libvirt-down") == 1


def test_watcher_retries_opening_with_backoff(watch):
    opener = Opener([FakeConnection()], failures=3)
    _, items = watch(opener)
    items.wait("snapshot")
    retries = [i for i in items.seen if i[0] == "libvirt-retry"]
    assert len(retries) == 3 and opener.calls == 4
    assert [attempt for *_, attempt in retries] == [1, 2, 3]
    assert all(0.025 <= seconds <= 0.05 for _, _, seconds, _ in retries)


def test_watcher_stops_while_libvirt_is_away(watch):
    opener = Opener([], failures=10**9)
    watcher, items = watch(opener)
    items.wait("libvirt-retry")
    watcher.stop()
    items.wait("watcher-stopped")
