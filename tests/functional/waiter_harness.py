"""Helpers shared by the waiter and host-consumer functional tests (no tests).

A host of the test's own (unique under the bus fixture's prefix), a registry
fed by a HostConsumer on its own thread, and publishing the way other
services do: a plain kombu Producer, or the confirmed BlockingPublisher.
"""

import threading
import uuid

import kombu

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import contract, publishing, topology
from tests.conftest import wait_for


def wait_until(predicate, timeout=10.0, what="condition"):
    """conftest.wait_for, with this suite's argument order and poll interval."""
    return wait_for(predicate, timeout, interval=0.01, what=what)


def new_uuid():
    return str(uuid.uuid4())


class HostEvents:
    """A registry fed from one test host's queue by a running HostConsumer."""

    def __init__(self, bus, *, registry=None, deliver=None, **settings):
        self.bus = bus
        self.host = f"cmp-{uuid.uuid4().hex[:8]}"
        bus.declare_host(self.host)
        self.registry = registry if registry is not None else InstanceEvents()
        self._deliver = deliver
        self._settings = settings
        self.consumer = None
        self.thread = None
        self.start()

    def start(self):
        """A new consumer (and connection) on the same durable queue."""
        self.consumer = HostConsumer(
            HostConsumerSettings(host=self.host, transport_url=self.bus.url,
                                 topology=self.bus.topology, **self._settings),
            self._deliver or self.registry.deliver)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True,
                                       name=f"host-consumer-{self.host}")
        self.thread.start()
        if not self.consumer.ready.wait(15):
            raise RuntimeError("host consumer did not start within 15s")

    def stop(self, timeout=15):
        self.consumer.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "host consumer did not stop"

    def event(self, server_uuid, name=contract.VIF_PLUGGED, tag=None,
              status=contract.COMPLETED):
        """An envelope for this host (the router routes on the host hint)."""
        return contract.envelope(
            contract.InstanceEvent(name, server_uuid, tag, status, self.host),
            "functional-test")

    def queue_depth(self):
        """Ready messages in this host's queue (unacknowledged excluded)."""
        ch = self.bus.channel()
        try:
            return ch.queue_declare(self.bus.topology.host_queue_name(self.host),
                                    passive=True).message_count
        finally:
            ch.close()


def publish_with_kombu(bus, env, headers=None):
    """Publish to ingress with a plain kombu Producer, as any client would
    (with its user_id: the router refuses events without one)."""
    with kombu.Connection(bus.url) as conn:
        producer = kombu.Producer(conn.channel())
        producer.publish(contract.encode(env),
                         exchange=bus.topology.ingress_exchange_name,
                         routing_key=topology.instance_routing_key(
                             env.payload.name),
                         message_id=env.id, delivery_mode=2,
                         content_type="application/json",
                         content_encoding="utf-8", user_id=conn.userid,
                         headers=headers)


class Publisher:
    """Confirmed publishing from the test thread, on a connection of its own."""

    def __init__(self, bus):
        self.bus = bus
        self.conn = kombu.Connection(bus.url)
        self.conn.connect()
        self._blocking = publishing.BlockingPublisher(self.conn,
                                                      user_id=self.conn.userid)

    def to_ingress(self, env):
        self._blocking.publish(self.bus.topology.ingress_exchange_name,
                               topology.instance_routing_key(env.payload.name),
                               contract.encode(env), message_id=env.id)

    def to_host(self, host, body, *, routing_key="instance.network-vif-plugged",
                message_id=None):
        """Raw bytes straight onto a host's exchange (bypassing the router)."""
        self._blocking.publish(self.bus.topology.host_exchange_name(host),
                               routing_key, body, message_id=message_id)

    def close(self):
        self.conn.release()


def get_dead_letter(bus, timeout=10.0):
    """The next message in the dead-letter queue (kombu Message), or fail."""
    ch = bus.channel()
    queue = bus.topology.dead_letter_queue()(ch)
    found = []
    try:
        wait_until(lambda: found.append(queue.get(no_ack=True)) or found[-1],
                   timeout, "a dead-lettered message")
        return found[-1]
    finally:
        ch.close()

