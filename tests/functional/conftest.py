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
