"""Reconnect backoff starts afresh after a session that ran healthy, and
only then.

A proxy in front of the real broker refuses connections long enough for
the backoff to grow, lets the service connect, then cuts it. After a
session that stayed up for the schedule's healthy_after the service must
be back within a second or so, not after the long wait the earlier outage
had built up (which is what one retry loop for the life of the process
did: 12.9 s, then 25.6 s, in the issue's run). After a session cut as soon
as it was up, the grown wait stands: a connect alone is not a success.
"""

import threading
import time

import pytest

from compute.lifecycle_publisher import LifecyclePublisher, Outbox
from router.bus.backoff import Schedule
from router.service import RouterService, RouterSettings
from tests.conftest import wait_for
from tests.functional.agent_harness import TcpProxy

pytestmark = pytest.mark.timeout(90)

OUTAGE = 4.0        # long enough for the backoff to pass 1.6 s
HEALTHY = 2.0       # the services' healthy_after here (10 s by default)
SCHEDULE = Schedule(healthy_after=HEALTHY)


@pytest.fixture
def proxy():
    p = TcpProxy()
    p.cut()                 # the broker is away when the service starts
    try:
        yield p
    finally:
        p.close()


def _outage_then_cut(proxy, is_up, up_for):
    """Seconds from a cut to being up again, after a first long outage
    and a session that was up for `up_for` seconds."""
    time.sleep(OUTAGE)
    proxy.restore()
    wait_for(is_up, 30, what="up after the first outage")
    up = time.monotonic()
    wait_for(lambda: time.monotonic() - up >= up_for, up_for + 1,
             what=f"{up_for}s up")
    assert is_up(), "the session did not stay up"
    proxy.cut()
    cut = time.monotonic()
    wait_for(lambda: not is_up(), 10, interval=0.005, what="the loss noticed")
    proxy.restore()
    wait_for(is_up, 40, interval=0.01, what="up after the cut")
    return time.monotonic() - cut


def _router(proxy, bus):
    bus.declare_central()
    svc = RouterService(RouterSettings(transport_url=proxy.url,
                                       topology=bus.topology,
                                       reconnect=SCHEDULE))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    return svc, thread


def test_the_router_reconnects_at_once_after_a_healthy_run_that_follows_an_outage(
        bus, proxy):
    svc, thread = _router(proxy, bus)
    try:
        back = _outage_then_cut(proxy, svc.ready.is_set, HEALTHY + 0.2)
        assert back < 1.5, f"router back {back:.2f}s after the cut"
        assert svc.backoff.resets == 1
    finally:
        svc.stop()
        thread.join(20)


def test_a_session_cut_as_soon_as_it_is_up_keeps_the_grown_backoff(bus, proxy):
    svc, thread = _router(proxy, bus)
    try:
        back = _outage_then_cut(proxy, svc.ready.is_set, 0)
        # Five or more failures in a row by now: the next wait is at
        # least 4 s (a ceiling of 8 s or more, jitter in its upper half).
        assert back > 3.0, f"router back {back:.2f}s after the cut"
        assert svc.backoff.resets == 0
    finally:
        svc.stop()
        thread.join(20)


def test_the_agent_publisher_reconnects_at_once_after_a_healthy_run_after_an_outage(
        bus, proxy):
    bus.declare_central()
    up = threading.Event()

    def on_state(is_up, detail):
        (up.set if is_up else up.clear)()

    publisher = LifecyclePublisher(Outbox(100), bus.topology, on_state,
                                   transport_url=proxy.url, heartbeat=0,
                                   reconnect=SCHEDULE)
    publisher.start()
    try:
        back = _outage_then_cut(proxy, up.is_set, HEALTHY + 0.2)
        assert back < 1.5, f"agent publisher back {back:.2f}s after the cut"
    finally:
        publisher.finish(5)


def test_a_refused_login_names_the_user_and_the_broker_in_every_retry_line(
        bus, caplog):
    """An operator reading the router's log or /healthz after a wrong
    password must see whose login and which broker, not only AccessRefused
    (hostile review of issue 20)."""
    bus.declare_central()
    url = bus.url.replace("guest:guest@", "guest:wrong-password@")
    assert url != bus.url
    svc = RouterService(RouterSettings(transport_url=url, topology=bus.topology))
    thread = threading.Thread(target=svc.run, daemon=True)
    with caplog.at_level("WARNING", logger="router.bus.backoff"):
        thread.start()
        try:
            wait_for(lambda: any("reconnect attempt" in r.getMessage()
                                 for r in caplog.records), 15,
                     what="a reconnect line")
        finally:
            svc.stop()
            thread.join(10)
    [line] = [r.getMessage() for r in caplog.records
              if "reconnect attempt 1 " in r.getMessage()]
    assert "refused the login of guest (by its password)" in line
    assert "127.0.0.1:5672" in line and "wrong-password" not in line
    assert "refused the login of guest" in svc.backoff.status()
