"""The chaos stage's node: chaos1@localhost, a RabbitMQ of its own.

Started (about 10 s) by a session fixture through
tests/functional/rabbitmq-node.sh, with the management API for fast
broker-side faults, and stopped at the end if the fixture started it. The
main broker on 5672 is never touched.

Tests marked `chaos` run only when asked for (`pytest -m chaos
tests/chaos`, which is what .ci/chaos does, or EVROUTER_CHAOS=1); the one
marked `cluster` (the same machine on the 3-node cluster, with node
faults) likewise (`pytest -m cluster tests/chaos`, which .ci/cluster runs
after the cluster tests, or EVROUTER_CLUSTER=1).
"""

import os
import subprocess
from pathlib import Path

import pytest

from tests.chaos.broker import Node
from tests.conftest import skip_stage_unless_asked

SCRIPT = Path(__file__).parent.parent / "functional" / "rabbitmq-node.sh"
NODE_ENV = {
    "EVROUTER_NODE": "chaos1@localhost",
    "EVROUTER_NODE_PORT": "5740",
    "EVROUTER_NODE_DIST_PORT": "25740",
    "EVROUTER_NODE_MGMT_PORT": "15740",
}


def pytest_collection_modifyitems(config, items):
    skip_stage_unless_asked(
        config, items, "chaos", "EVROUTER_CHAOS",
        "the stateful chaos test, on a RabbitMQ node of its own: "
        "pytest -m chaos tests/chaos (.ci/chaos)")
    skip_stage_unless_asked(
        config, items, "cluster", "EVROUTER_CLUSTER",
        "the chaos test on the 3-node RabbitMQ cluster: "
        "pytest -m cluster tests/chaos (.ci/cluster)")


def _script(*args, timeout=180):
    return subprocess.run(["bash", str(SCRIPT), *args], check=True,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **NODE_ENV})


@pytest.fixture(scope="session")
def chaos_node():
    node = Node(NODE_ENV["EVROUTER_NODE"], int(NODE_ENV["EVROUTER_NODE_PORT"]),
                int(NODE_ENV["EVROUTER_NODE_MGMT_PORT"]))
    started = not node.reachable()
    if started:
        _script("start")
    node.wait_up(60)
    try:
        yield node
    finally:
        if started:
            _script("stop")


@pytest.fixture(scope="session")
def chaos_cluster():
    """The 3-node cluster with the management API (tests/chaos/cluster.py),
    started unless it runs; stopped at the end if started here."""
    from tests.chaos import cluster
    broker = cluster.ClusterBroker()
    running = cluster.script("status").stdout.count(" down") == 0
    if running:
        try:
            broker.api("GET", "/overview", timeout=5)
        except (OSError, RuntimeError):
            pytest.fail("the cluster runs without its management API: stop it "
                        "(tests/cluster/rabbitmq-cluster.sh stop) or start it "
                        "with EVROUTER_CLUSTER_MGMT=1")
    else:
        cluster.script("start")
    broker.wait_up(60)
    try:
        yield broker
    finally:
        broker.make_whole()
        if not running:
            cluster.script("stop", timeout=120)
