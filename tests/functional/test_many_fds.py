"""The host consumer and the lifecycle publisher in a process with more
than 1,024 descriptors open (nova-compute with many guests' files and
sockets, an agent with many libvirt streams): their broker socket and wake
pipe are numbered past FD_SETSIZE, which select() refuses. Every wait
failed, the session restarted, and no event came through; now they poll.
"""

import threading

import pytest

from compute.lifecycle_publisher import LifecyclePublisher, Outbox, Outgoing
from router.bus import contract
from router.bus.contract import VIF_PLUGGED
from tests.conftest import collect
from tests.fds import ABOVE, past_fd_setsize
from tests.functional.waiter_harness import HostEvents, new_uuid

pytestmark = pytest.mark.timeout(60)


def _sock(kombu_connection):
    return kombu_connection.connection.transport.sock


def test_a_host_consumer_past_fd_setsize_wakes_its_waiter(bus, publisher):
    bus.declare_central()
    with past_fd_setsize():
        host = HostEvents(bus)
    try:
        server = new_uuid()
        env = host.event(server, VIF_PLUGGED, "port-1")
        with host.registry.wait_for_instance_event(
                server, [(VIF_PLUGGED, "port-1")], 10):
            publisher.to_host(host.host, contract.encode(env),
                              message_id=env.id)
        assert host.consumer.stats["failures"] == 0
        # What made the case: both descriptors past FD_SETSIZE.
        assert _sock(host.consumer.connection).fileno() > ABOVE
        assert host.consumer.waker.fileno() > ABOVE
    finally:
        host.stop()


def test_a_lifecycle_publisher_past_fd_setsize_publishes(bus):
    bus.declare_central()
    listen = f"{bus.prefix}.lifecycle-listen"
    ch = bus.channel()
    ch.queue_declare(listen, durable=False, auto_delete=False)
    ch.queue_bind(listen, bus.topology.lifecycle_exchange_name)
    bus.own(queues=[listen])
    up = threading.Event()
    with past_fd_setsize():
        outbox = Outbox(10)
        publisher = LifecyclePublisher(
            outbox, bus.topology, lambda is_up, detail: is_up and up.set(),
            transport_url=bus.url, heartbeat=0)
        publisher.start()
        assert up.wait(15), "the lifecycle publisher did not connect"
    try:
        assert outbox.waker.fileno() > ABOVE
        outbox.put(Outgoing("fds-1", b"{}", "a lifecycle message"))
        got = collect(bus.url, listen, 1, timeout=10)
        assert [m.properties["message_id"] for m in got] == ["fds-1"]
    finally:
        publisher.finish(5)
