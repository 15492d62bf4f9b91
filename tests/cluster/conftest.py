"""A three-node RabbitMQ cluster beside the main broker, for failover tests.

The `cluster` fixture starts c1..c3@localhost on 127.0.0.1:5681-5683 with
tests/cluster/rabbitmq-cluster.sh (about 30 s) unless they already run, and
stops them at the end of the session if it started them. The main broker on
5672 is never touched.

Tests marked `cluster` run only when asked for (`pytest -m cluster
tests/cluster`, which is what .ci/cluster does, or EVROUTER_CLUSTER=1): the
main run skips them, so it never starts three more brokers.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import kombu
import pytest

from router.bus import topology
from tests.conftest import Bus, skip_stage_unless_asked

SCRIPT = Path(__file__).with_name("rabbitmq-cluster.sh")
NODES = (1, 2, 3)
PORTS = {n: 5680 + n for n in NODES}


def pytest_collection_modifyitems(config, items):
    skip_stage_unless_asked(
        config, items, "cluster", "EVROUTER_CLUSTER",
        "needs the 3-node RabbitMQ cluster: "
        "pytest -m cluster tests/cluster (.ci/cluster)")


def _script(*args, timeout=240):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], check=True,
                          capture_output=True, text=True, timeout=timeout)


class Cluster:
    """The running nodes, by number (1..3), and ways to hurt them."""

    nodes = NODES

    @staticmethod
    def node(n):
        return f"c{n}@localhost"

    @staticmethod
    def url(*order):
        """An OpenStack transport URL listing the nodes in this order."""
        order = order or NODES
        return "rabbit://" + ",".join(f"guest:guest@127.0.0.1:{PORTS[n]}"
                                      for n in order) + "/"

    @staticmethod
    def kombu_url(*order):
        """The same as a kombu URL (';' between failover hosts)."""
        order = order or NODES
        return ";".join(f"amqp://guest:guest@127.0.0.1:{PORTS[n]}//" for n in order)

    def kill(self, n):
        """kill -9 of the node's Erlang VM."""
        _script("kill", n)

    def revive(self, n):
        """Start a node again with its data; it rejoins the cluster."""
        _script("run", n)

    def stop_node(self, n):
        _script("stop-node", n, timeout=120)

    def start_node(self, n):
        _script("start-node", n)

    def freeze(self, n):
        """SIGSTOP of the node's Erlang VM (undo with thaw)."""
        _script("freeze", n)

    def thaw(self, n):
        _script("thaw", n)

    def running(self):
        up = [line.split()[0] for line in _script("status").stdout.splitlines()
              if line and not line.endswith(" down")]
        return [n for n in NODES if self.node(n) in up]

    def make_whole(self):
        """Every node up again (after a scenario, whatever it did)."""
        for n in NODES:
            self.thaw(n)        # before `running`, which asks each node
        for n in NODES:
            if n not in self.running():
                self.revive(n)

    def leader(self, queue):
        """The node number leading a quorum queue (None if unknown)."""
        for n in self.running():
            out = subprocess.run(
                ["rabbitmqctl", "-q", "-n", self.node(n), "list_queues", "name",
                 "leader", "--formatter", "json"], capture_output=True, text=True,
                timeout=60)
            if out.returncode == 0:
                for row in json.loads(out.stdout or "[]"):
                    if row.get("name") == queue:
                        return int(row["leader"][1]) if row.get("leader") else None
                return None
        return None


@pytest.fixture(scope="session")
def cluster():
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("RabbitMQ is not installed")
    started_here = len(Cluster().running()) < len(NODES)
    t0 = time.monotonic()
    _script("start")
    print(f"\ncluster: 3 nodes ready in {time.monotonic() - t0:.1f}s "
          f"({'started' if started_here else 'already running'})")
    try:
        yield Cluster()
    finally:
        if started_here and not os.environ.get("EVROUTER_CLUSTER_KEEP"):
            _script("stop", timeout=120)


class ClusterBus(Bus):
    """A Bus on the cluster: quorum queues, declared on a chosen node.

    `services` orders the URL the services get (they connect to its first
    live node); the test's own connection (queue depths, clean-up) goes to
    `control`, and every queue is declared through `leader`, so its quorum
    leader is there (RabbitMQ 3.10 places it client-local).
    """

    def __init__(self, cluster, *, services, control, leader, **topology_args):
        super().__init__(cluster.kombu_url(control, *services),
                         queue_type="quorum", **topology_args)
        self.url = cluster.kombu_url(*services)
        self.transport_url = cluster.url(*services)
        self._leader_url = cluster.kombu_url(leader)

    def _declare(self, exchanges, queues):
        with kombu.Connection(self._leader_url) as conn:
            topology.declare(conn.channel(), exchanges, queues)
        self._exchanges.update(e.name for e in exchanges)
        self._queues.update(q.name for q in queues)

    def cleanup(self):
        try:
            super().cleanup()
        except Exception as exc:        # a node still down: best effort
            print(f"cluster bus clean-up of {self.prefix}: {exc}")
