"""Reconnect backoff starts afresh after every session that worked.

A proxy in front of the real broker refuses connections long enough for
the backoff to grow, lets the service connect, then cuts it: the service
must be back within a second, not after the long wait the earlier outage
had built up (which is what one retry loop for the life of the process
did: 12.9 s, then 25.6 s, in the issue's run).
"""

import threading
import time

import pytest

from compute.lifecycle_publisher import LifecyclePublisher, Outbox
from router.service import RouterService, RouterSettings
from tests.conftest import wait_for
from tests.functional.agent_harness import TcpProxy

pytestmark = pytest.mark.timeout(90)

OUTAGE = 4.0        # long enough for the backoff to pass 1.6 s


@pytest.fixture
def proxy():
    p = TcpProxy()
    p.cut()                 # the broker is away when the service starts
    try:
        yield p
    finally:
        p.close()


def _outage_then_cut(proxy, is_up):
    """Seconds from a cut to being up again, after a first long outage."""
    time.sleep(OUTAGE)
    proxy.restore()
    wait_for(is_up, 30, what="up after the first outage")
    proxy.cut()
    cut = time.monotonic()
    wait_for(lambda: not is_up(), 10, interval=0.005, what="the loss noticed")
    proxy.restore()
    wait_for(is_up, 30, interval=0.01, what="up after the cut")
    return time.monotonic() - cut


def test_the_router_reconnects_at_once_after_a_loss_that_follows_an_outage(bus, proxy):
    bus.declare_central()
    svc = RouterService(RouterSettings(transport_url=proxy.url, topology=bus.topology))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        back = _outage_then_cut(proxy, svc.ready.is_set)
        assert back < 1.5, f"router back {back:.2f}s after the cut"
    finally:
        svc.stop()
        thread.join(20)


def test_the_agent_publisher_reconnects_at_once_after_a_loss_that_follows_an_outage(
        bus, proxy):
    bus.declare_central()
    up = threading.Event()

    def on_state(is_up, detail):
        (up.set if is_up else up.clear)()

    publisher = LifecyclePublisher(Outbox(100), bus.topology, on_state,
                                   transport_url=proxy.url, heartbeat=0)
    publisher.start()
    try:
        back = _outage_then_cut(proxy, up.is_set)
        assert back < 1.5, f"agent publisher back {back:.2f}s after the cut"
    finally:
        publisher.finish(5)
