"""The same routing on kombu's memory transport (the embedded default)."""

import uuid

import kombu
import pytest

from router.bus import contract, topology
from router.bus.publishing import BlockingPublisher
from tests.conftest import RunningRouter, collect, wait_for


class MemoryBus:
    """Duck-types the `bus` fixture for the in-process transport."""

    url = "memory://"

    def __init__(self):
        self.topology = topology.Topology(prefix=f"mem-{uuid.uuid4().hex[:8]}",
                                          retry_delays_ms=(50, 100))
        self.prefix = self.topology.prefix
        self.conn = kombu.Connection(self.url)

    def declare_central(self):
        topology.declare(self.conn.default_channel, *self.topology.central())

    def declare_host(self, host):
        topology.declare(self.conn.default_channel, *self.topology.for_host(host))


@pytest.fixture
def memory_router():
    bus = MemoryBus()
    bus.declare_central()
    r = RunningRouter(bus)
    try:
        yield bus, r
    finally:
        r.stop()
        bus.conn.release()


def publish(bus, body, key="instance.network-vif-plugged"):
    with kombu.Connection(bus.url) as conn:
        BlockingPublisher(conn, user_id=conn.userid).publish(
            bus.topology.ingress_exchange_name, key, body, mandatory=False)


def test_routes_rejects_and_retries_as_on_rabbitmq(memory_router):
    bus, r = memory_router
    bus.declare_host("cmp-m")
    good = contract.envelope(contract.InstanceEvent(
        "network-vif-plugged", str(uuid.uuid4()), "p1", host="cmp-m"), "t")
    publish(bus, b"{broken")
    publish(bus, contract.encode(good))
    [m] = collect(bus.url, bus.topology.host_queue_name("cmp-m"), 1, timeout=10)
    assert contract.decode(m.body) == good
    [d] = collect(bus.url, bus.topology.dead_letter_queue_name, 1, timeout=10)
    assert d.headers[contract.HEADER_REASON] == contract.REASON_MALFORMED

    # no placement yet: parked in-process, delivered once the host is known
    server = str(uuid.uuid4())
    late = contract.envelope(contract.InstanceEvent(
        "network-vif-plugged", server, "p2"), "t")
    publish(bus, contract.encode(late))
    wait_for(lambda: r.service.stats["retried"] >= 1, what="a retry")
    lifecycle = contract.envelope(contract.LifecycleEvent(
        server, "cmp-m", "STARTED", 0, 0, 1), "agent")
    with kombu.Connection(bus.url) as conn:
        BlockingPublisher(conn).publish(bus.topology.lifecycle_exchange_name, "",
                                        contract.encode(lifecycle), mandatory=False)
    [m] = collect(bus.url, bus.topology.host_queue_name("cmp-m"), 1, timeout=10)
    assert contract.decode(m.body).id == late.id
