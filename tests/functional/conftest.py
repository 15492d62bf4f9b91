"""Fixtures shared by the functional suites (the broker ones are in tests/conftest.py)."""

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.functional.agent_harness import HOST, Driver, FanoutListener, RunningAgent
from tests.functional.waiter_harness import HostEvents, Publisher


@pytest.fixture
def publisher(bus):
    """Publishes to the test's bus the way other services do; closed afterwards."""
    p = Publisher(bus)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def host(bus):
    """A test host's registry fed by its running HostConsumer, with the
    central topology declared (the dead-letter queue, as the router does)."""
    bus.declare_central()
    h = HostEvents(bus)
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def listener(bus):
    """Everything published on the test's lifecycle fanout, decoded."""
    lst = FanoutListener(bus)
    yield lst
    lst.close()


@pytest.fixture
def driver():
    """libvirt's shared test driver; the test's domains removed afterwards."""
    d = Driver()
    yield d
    d.close()


@pytest.fixture
def start_agent(bus):
    """start_agent(**settings): a healthy agent on the test's bus (host
    HOST on the test driver unless told otherwise), stopped afterwards."""
    agents = []

    def start(**settings):
        settings.setdefault("host", HOST)
        settings.setdefault("libvirt_uri", "test:///default")
        agent = RunningAgent(bus, **settings)
        agents.append(agent)
        agent.wait_healthy()
        return agent

    yield start
    for agent in agents:
        if agent.thread.is_alive():
            agent.stop()


# A RabbitMQ node of the suite's own, hc1@localhost on 5730, for tests that
# change a node-wide setting (tests/functional/rabbitmq-node.sh): started once
# by the first test that asks, stopped at the end of the run.
NODE_SCRIPT = Path(__file__).with_name("rabbitmq-node.sh")
NODE_URL = "amqp://guest:guest@127.0.0.1:5730//"


def node_ctl(*args, timeout=60):
    """rabbitmqctl on that node (`node_ctl("eval", "...")`)."""
    return _node("ctl", *args, timeout=timeout)


def _node(*args, timeout=60):
    return subprocess.run(["bash", str(NODE_SCRIPT), *args], check=True,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def own_node():
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("no rabbitmq-server to start a node of our own")
    _node("start", timeout=180)
    try:
        yield NODE_URL
    finally:
        _node("stop", timeout=120)


class RouterVhost:
    """A vhost of a test's own: one router user (configure and read all,
    write `write`), the central topology and `hosts` declared by guest, the
    admin URL both a publisher and the assertions use. Its router and
    publisher are stopped, and the vhost and user removed, at teardown."""

    def __init__(self, kind, hosts=(), write=".*"):
        import uuid

        import kombu

        from router.bus import topology
        from tests.functional.rabbitmq_users import BrokerUsers
        tag = uuid.uuid4().hex[:8]
        self.vhost = f"evt-{kind}-{tag}"
        self.user = f"{self.vhost}-router"
        self.topology = topology.Topology(prefix=self.vhost)
        if callable(write):         # a grant that names the topology's names
            write = write(self.topology)
        self.users = BrokerUsers(self.vhost, {self.user: ("pw", ".*", write, ".*")})
        self.admin = f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"
        self.router = self.publisher = None
        try:
            with kombu.Connection(self.admin) as conn:
                topology.declare(conn.channel(), *self.topology.central())
                for host in hosts:
                    topology.declare(conn.channel(), *self.topology.for_host(host))
        except BaseException:
            self.users.remove()
            raise

    @property
    def url(self):
        """The router user's URL."""
        return self.users.url(self.user)

    def bus(self, url):
        """What RunningRouter and Publisher need of a tests.conftest.Bus."""
        return type("VhostBus", (), {"url": url, "topology": self.topology})()

    def start_router(self, **settings):
        from tests.conftest import RunningRouter
        self.router = RunningRouter(self.bus(self.url), **settings)
        return self.router

    def stop_router(self, timeout=20):
        router, self.router = self.router, None
        router.stop(timeout=timeout)

    def start_publisher(self):
        """Confirmed publishing as guest (waiter_harness.Publisher)."""
        self.publisher = Publisher(self.bus(self.admin))
        return self.publisher

    def permit(self, write):
        """Set the router user's write permission (its connections open)."""
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p",
                        self.vhost, self.user, ".*", write, ".*"], check=True,
                       timeout=60, capture_output=True)

    def close(self):
        try:
            if self.publisher is not None:
                self.publisher.close()
            if self.router is not None:
                self.router.stop()
        finally:
            self.users.remove()


@pytest.fixture
def router_vhost():
    """router_vhost(kind, hosts=(), write=".*") -> a RouterVhost."""
    made = []

    def make(kind, hosts=(), write=".*"):
        made.append(RouterVhost(kind, hosts, write))
        return made[-1]
    yield make
    for rv in reversed(made):
        rv.close()
