"""The host consumer on kombu's memory transport (the embedded demo's bus).

No broker: the same loop must wake waiters, drop duplicates and dead-letter
poison there too. Confirms, TTLs and connection loss are RabbitMQ matters,
proven in tests/functional/test_host_consumer.py.
"""

import threading
import time
import uuid

import kombu
import pytest

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import contract, publishing, topology

pytestmark = pytest.mark.timeout(30)

HOST = "cmp-memory"
KEY = topology.instance_routing_key(contract.VIF_PLUGGED)


@pytest.fixture
def bus():
    topo = topology.Topology(prefix=f"mem-{uuid.uuid4().hex[:8]}")
    conn = kombu.Connection("memory://")
    conn.connect()
    # the central topology (dead-letter exchange) exists before hosts start
    topology.declare(conn.channel(), *topo.central())
    registry = InstanceEvents()
    consumer = HostConsumer(HostConsumerSettings(
        host=HOST, transport_url="memory://", topology=topo), registry.deliver)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    assert consumer.ready.wait(10)
    yield topo, registry, consumer, publishing.BlockingPublisher(conn), conn
    consumer.stop()
    thread.join(10)
    assert not thread.is_alive()
    conn.release()


def test_waiter_woken_duplicate_ignored_poison_dead_lettered(bus):
    topo, registry, consumer, publisher, conn = bus
    server = str(uuid.uuid4())
    env = contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, server, "port-1"), "test")
    exchange = topo.host_exchange_name(HOST)
    with registry.wait_for_instance_event(
            server, [(contract.VIF_PLUGGED, "port-1")], 10):
        publisher.publish(exchange, KEY, contract.encode(env), message_id=env.id)
        publisher.publish(exchange, KEY, contract.encode(env), message_id=env.id)
    publisher.publish(exchange, KEY, b"[1, 2", message_id="junk")
    dead_letters = topo.dead_letter_queue()(conn.channel())
    found = None
    end = time.monotonic() + 10
    while found is None and time.monotonic() < end:
        found = dead_letters.get(no_ack=True)
        time.sleep(0.01)
    assert found is not None, "nothing dead-lettered"
    assert found.headers[contract.HEADER_REASON] == contract.REASON_MALFORMED
    end = time.monotonic() + 10
    while consumer.stats["duplicate"] < 1 and time.monotonic() < end:
        time.sleep(0.01)
    assert consumer.stats["delivered"] == 1 and consumer.stats["duplicate"] == 1
    assert registry.held == 0
