"""A session that dies right after connecting backs off; it does not storm.

The failure class: a reconnect loop that counts a mere connect as success
and starts its backoff afresh, so a session that dies as soon as it is up
reconnects at once, for ever. Two ways to die young, each in every service
it applies to:
- a permission mistake: the broker user may connect, declare and consume,
  but the session's first publish is refused (403 ACCESS_REFUSED) and
  that ends the session (agent's lifecycle publisher; at a host consumer
  the refused dead-letter copy costs that copy, not the session: issue 19);
- the connection itself dropped as soon as the service says it is up (a
  load balancer or firewall resetting connections; every service).
Before router.bus.backoff each of these reconnected dozens of times in 5 s
here (hundreds on an idle machine). Each test counts the TCP connections
the service opens through a proxy within 5 s of its first: the schedule
allows at most 5 (waits of at least 0.25, 0.5, 1 and 2 s); 6 leaves a
margin for the proxy's timing.
"""

import concurrent.futures
import logging
import threading
import time
import uuid

import kombu
import pytest

from compute.host_consumer import HostConsumer, HostConsumerSettings
from compute.lifecycle_publisher import LifecyclePublisher, Outbox, Outgoing
from network.publisher import (
    BrokerUnavailable,
    InstanceEventPublisher,
    PublisherSettings,
)
from router.bus import contract, topology
from router.service import RouterService, RouterSettings
from tests.conftest import broker_reachable, wait_for
from tests.functional.agent_harness import TcpProxy
from tests.functional.rabbitmq_users import BrokerUsers

pytestmark = pytest.mark.timeout(120)

WINDOW = 5.0
MOST = 6
PASSWORD = "storm-pw"


class World:
    """A vhost with the central topology (and maybe a host's), users with
    the given permissions, a counting proxy in front of the broker."""

    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.vhost = f"evt-storm-{tag}"
        self.topo = topology.Topology(prefix=f"evt-storm-{tag}")
        self.p = self.topo.prefix.replace(".", r"\.").replace("-", r"\-")
        self.users = self.proxy = None

    def make(self, users, hosts=()):
        self.users = BrokerUsers(self.vhost, {
            f"{self.vhost}-{role}": (PASSWORD, *grants)
            for role, grants in users.items()})
        with kombu.Connection(self.admin_url) as conn:
            topology.declare(conn.channel(), *self.topo.central())
            for host in hosts:
                topology.declare(conn.channel(), *self.topo.for_host(host))
        self.proxy = TcpProxy()

    @property
    def admin_url(self):
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def url(self, role):
        return self.users.url(f"{self.vhost}-{role}", self.proxy.port)

    def connections_in_window(self):
        """Connections opened within WINDOW of the first one."""
        accepted = self.proxy.accepted
        wait_for(lambda: accepted, 15, what="a first connection")
        wait_for(lambda: time.monotonic() > accepted[0] + WINDOW + 0.1,
                 WINDOW + 1, what="the end of the window")
        return len([t for t in accepted if t <= accepted[0] + WINDOW])

    def remove(self):
        if self.proxy is not None:
            self.proxy.close()
        if self.users is not None:
            self.users.remove()     # the vhost takes the topology with it


@pytest.fixture
def world():
    if not broker_reachable():
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672")
    w = World()
    try:
        yield w
    finally:
        w.remove()


def attempts_logged(caplog):
    return [r.getMessage() for r in caplog.records
            if "reconnect attempt" in r.getMessage()]


def test_an_agent_that_may_not_write_the_lifecycle_exchange_backs_off(
        world, caplog):
    # Connect, check the exchange (passive: no permission needed), but no
    # write: the first publish is refused, 403, and the session ends.
    world.make({"agent": ("^$", "^$", f"^{world.p}\\..*$")})
    outbox = Outbox(10)
    outbox.put(Outgoing("m-1", b"{}", "a lifecycle message"))
    states = []
    publisher = LifecyclePublisher(
        outbox, world.topo, lambda up, detail: states.append(detail),
        transport_url=world.url("agent"), heartbeat=0)
    caplog.set_level(logging.WARNING)
    publisher.start()
    try:
        count = world.connections_in_window()
    finally:
        publisher.finish(0.1)
    print(f"\nlifecycle publisher without write permission: {count} "
          f"connections in {WINDOW:.0f}s")
    assert any("ACCESS_REFUSED" in d for d in states), states[:3]
    assert 3 <= count <= MOST
    assert abs(len(attempts_logged(caplog)) - count) <= 1


def test_a_host_consumer_whose_dead_letter_copy_is_refused_keeps_its_session(
        world, caplog):
    """Once a storm (the 403 ended the session, so it came back at once);
    now the refusal is the copy's alone (issue 19): one connection."""
    topo = world.topo
    queue = topo.host_queue_name("h1")
    own = "^" + topo.host_exchange_name("h1").replace(".", r"\.") + r".*$"
    # Its own exchange and queue, as router/permissions.py grants them,
    # minus write on the dead-letter exchange: the session consumes, takes
    # the poison below and is refused its dead-letter copy (403).
    world.make({"h1": (own, "^" + queue.replace(".", r"\.") + "$", own)},
               hosts=["h1"])
    with kombu.Connection(world.admin_url) as conn:
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(b"not an envelope"),
            exchange="", routing_key=queue)
    consumer = HostConsumer(HostConsumerSettings(
        "h1", transport_url=world.url("h1"), topology=topo, heartbeat=0,
        dead_letter_patience=1.0), deliver=lambda *a, **k: None)
    caplog.set_level(logging.WARNING)
    thread = consumer.start()
    try:
        count = world.connections_in_window()
        health = consumer.health()
    finally:
        consumer.stop()
        thread.join(20)
    print(f"\nhost consumer refused its dead-letter copy: {count} "
          f"connections in {WINDOW:.0f}s; health: {health[1]}")
    assert consumer.stats["dropped:malformed"] == 1, dict(consumer.stats)
    assert consumer.stats["reconnects"] == 0
    assert count == 1
    assert health == (True, "consuming")
    assert any("ACCESS_REFUSED" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)
    assert not thread.is_alive()


def _router(bus, url):
    svc = RouterService(RouterSettings(transport_url=url, topology=bus.topology,
                                       heartbeat=0))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()

    def stop():
        svc.stop()
        thread.join(20)
        assert not thread.is_alive()
    return svc.ready.is_set, stop, lambda: svc.health()[1]


def _host_consumer(bus, url):
    bus.declare_host("h1")
    consumer = HostConsumer(HostConsumerSettings(
        "h1", transport_url=url, topology=bus.topology, heartbeat=0),
        deliver=lambda *a, **k: None)
    thread = consumer.start()

    def stop():
        consumer.stop()
        thread.join(20)
        assert not thread.is_alive()
    return consumer.ready.is_set, stop, lambda: consumer.health()[1]


def _lifecycle_publisher(bus, url):
    up = threading.Event()
    publisher = LifecyclePublisher(
        Outbox(10), bus.topology,
        lambda is_up, detail: (up.set if is_up else up.clear)(),
        transport_url=url, heartbeat=0)
    publisher.start()
    return up.is_set, lambda: publisher.finish(0.1), publisher.backoff.status


def _network_publisher(bus, url):
    publisher = InstanceEventPublisher(PublisherSettings(
        transport_url=url, topology=bus.topology, heartbeat=0)).start()
    stopping = threading.Event()

    def keep_publishing():      # a network service with events to send
        n = 0
        while not stopping.is_set():
            n += 1
            try:
                publisher.publish(contract.InstanceEvent(
                    contract.VIF_PLUGGED, str(uuid.uuid4()), f"p{n}",
                    host="h1"), timeout=10)
            except (BrokerUnavailable, concurrent.futures.TimeoutError):
                pass
    caller = threading.Thread(target=keep_publishing, daemon=True)
    caller.start()

    def stop():
        stopping.set()
        caller.join(15)
        publisher.close()
    return (lambda: publisher.connected), stop, publisher.backoff.status


@pytest.mark.parametrize("start", [_router, _host_consumer,
                                   _lifecycle_publisher, _network_publisher],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_connection_dropped_as_soon_as_it_is_up_backs_off(bus, start, caplog):
    bus.declare_central()
    proxy = TcpProxy()
    caplog.set_level(logging.WARNING)
    try:
        is_up, stop, status = start(bus, proxy.url)
        try:
            accepted = proxy.accepted
            wait_for(lambda: accepted, 15, what="a first connection")
            end = accepted[0] + WINDOW
            kills = 0
            while time.monotonic() < end:
                if is_up():
                    proxy.drop()
                    kills += 1
                    wait_for(lambda: not is_up(), 10, interval=0.002,
                             what="the loss noticed")
                time.sleep(0.002)
            backing_off = status()
        finally:
            stop()
    finally:
        proxy.close()
    count = len([t for t in accepted if t <= end])
    print(f"\n{start.__name__.strip('_')}, its connection dropped whenever up: "
          f"{count} connections, {kills} drops in {WINDOW:.0f}s; "
          f"{backing_off}")
    assert kills >= 2, "the sessions were not dropped: nothing was tested"
    assert count <= MOST
    assert "reconnect attempt" in backing_off
