"""A consumed queue cut off from its exchange is bound to it again.

An exchange deleted and declared again (an operator, a redeploy, `evrouter
topology --declare` after a delete) comes back without its bindings, and
the broker tells no consumer: the queue is still there, consumed, and
hears nothing. The review of 2026-12-04 found the router's placement queue
(the lifecycle fanout) and the agents' control queues left that way, with
nothing logged; the router's own queue (the ingress exchange) and a host's
queue (its exchange) fail the same way. Each consumer now binds its queue
again when idle (router/bus/consuming.py: one queue.bind, a no-op when the
binding is there), and declares an exchange found gone. Proven here for
each of the four: a mandatory publish to the exchange is routed again
within the consumer's check interval, and what it carries arrives.
"""

import logging
import uuid

import amqp
import pytest
from kombu import Exchange

from compute import lifecycle_publisher
from compute.lifecycle_publisher import LifecyclePublisher, Outbox
from router.bus import contract, publishing
from tests.conftest import RunningRouter, collect, wait_for
from tests.functional.waiter_harness import HostEvents, Publisher

pytestmark = pytest.mark.timeout(60)

CHECK = 0.3             # the consumers' check interval here (seconds)


class _Mandatory:
    """Publishes junk, mandatory and confirmed; says whether it was routed."""

    def __init__(self, bus):
        self.bus = bus
        self.publisher = Publisher(bus)

    def routed(self, exchange, routing_key=""):
        """False if returned, or if the exchange is not there (404)."""
        try:
            self.publisher._blocking.publish(
                exchange, routing_key, b"{}", message_id=uuid.uuid4().hex)
            return True
        except publishing.PublishError:
            return False
        except amqp.exceptions.NotFound:
            self.publisher.close()
            self.publisher = Publisher(self.bus)
            return False

    def close(self):
        self.publisher.close()


def _cut(bus, name, type_):
    """The operator's delete and declare again: same name, same type, no
    bindings."""
    ch = bus.channel()
    ch.exchange_delete(name)
    Exchange(name, type_, durable=True)(ch).declare()


def _lifecycle_read(router):
    """Lifecycle messages the router's placement observer has read."""
    return sum(n for k, n in router.service.stats.items()
               if k.startswith("lifecycle_"))


def _event(host):
    return contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1", contract.COMPLETED,
        host), "test")


def test_the_router_queue_is_bound_again_to_a_declared_again_ingress(bus, caplog):
    bus.declare_central()
    bus.declare_host("cmp-a")
    topo = bus.topology
    router = RunningRouter(bus, consume_check=CHECK)
    probe = _Mandatory(bus)
    publisher = Publisher(bus)
    try:
        _cut(bus, topo.ingress_exchange_name, "topic")
        assert not probe.routed(topo.ingress_exchange_name,
                                "instance.network-vif-plugged")
        wait_for(lambda: probe.routed(topo.ingress_exchange_name,
                                      "instance.network-vif-plugged"),
                 10 * CHECK + 5, what="the router queue bound again")
        env = _event("cmp-a")
        publisher.to_ingress(env)
        # (the probes were junk: dead-lettered `invalid`, never routed)
        [m] = collect(bus.url, topo.host_queue_name("cmp-a"), 1, timeout=10)
        assert m.properties["message_id"] == env.id
        assert router.service.stats["sessions"] == 1
    finally:
        publisher.close()
        probe.close()
        router.stop()


def test_the_placement_queue_is_bound_again_to_a_declared_again_fanout(bus):
    bus.declare_central()
    topo = bus.topology
    router = RunningRouter(bus, consume_check=CHECK)
    probe = _Mandatory(bus)
    try:
        # Only the router's placement queue is bound to this fanout here.
        assert probe.routed(topo.lifecycle_exchange_name)
        seen = _lifecycle_read(router)
        _cut(bus, topo.lifecycle_exchange_name, "fanout")
        assert not probe.routed(topo.lifecycle_exchange_name)
        wait_for(lambda: probe.routed(topo.lifecycle_exchange_name),
                 10 * CHECK + 5, what="the placement queue bound again")
        # ... and what comes through the fanout reaches the router again.
        wait_for(lambda: _lifecycle_read(router) > seen, 5,
                 what="the router reading the fanout again")
        assert router.service.stats["sessions"] == 1
    finally:
        probe.close()
        router.stop()


def test_a_host_queue_whose_exchange_was_deleted_gets_it_back(bus, caplog):
    """Nobody declared the host's exchange again: its consumer does, when
    idle, and says so."""
    bus.declare_central()
    caplog.set_level(logging.WARNING)
    host = HostEvents(bus, consume_check=CHECK)
    probe = _Mandatory(bus)
    try:
        exchange = bus.topology.host_exchange_name(host.host)
        bus.channel().exchange_delete(exchange)
        wait_for(lambda: probe.routed(exchange, "instance.network-vif-plugged"),
                 10 * CHECK + 5, what="the host's exchange declared and bound")
        assert host.consumer.stats["sessions"] == 1
        assert any("declared again and bound" in r.getMessage()
                   and exchange in r.getMessage() for r in caplog.records)
    finally:
        probe.close()
        host.stop()


def test_an_agent_control_queue_is_bound_again(bus, monkeypatch):
    bus.declare_central()
    topo = bus.topology
    monkeypatch.setattr(lifecycle_publisher, "CONTROL_CHECK", CHECK)
    agent = LifecyclePublisher(Outbox(10), topo, lambda up, detail: None,
                               transport_url=bus.url, heartbeat=2,
                               control_host="cmp-ctl",
                               on_control=lambda *message: None)
    probe = _Mandatory(bus)
    agent.start()
    try:
        wait_for(lambda: agent.control_queue is not None
                 and probe.routed(topo.control_exchange_name), 10,
                 what="the agent listening")
        _cut(bus, topo.control_exchange_name, "fanout")
        assert not probe.routed(topo.control_exchange_name)
        # checked with the heartbeat: every quarter of 2 s
        wait_for(lambda: probe.routed(topo.control_exchange_name),
                 10 * CHECK + 5, what="the control queue bound again")
        assert agent._sessions == 1
    finally:
        probe.close()
        agent.finish(0.1)
