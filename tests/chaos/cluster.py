"""The chaos test's broker as a 3-node cluster, and ways to hurt one node.

c1..c3@localhost of tests/cluster/rabbitmq-cluster.sh (127.0.0.1:5681-5683),
started with EVROUTER_CLUSTER_MGMT=1 so each runs the management API on
15681-15683. The same interface as broker.Node (users, permissions,
policies and connections are cluster-wide, so any node that is up answers),
plus node faults: kill -9 and a restart with the same data, stop_app and
start_app. A node is `down` from the moment a fault begins on it until its
restart has finished and it sees the whole cluster again: the test's own
clients and API calls go to the nodes that are up.
"""

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.chaos.broker import ADMIN, PASSWORD, Node, q

SCRIPT = Path(__file__).parent.parent / "cluster" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
ENV = {"EVROUTER_CLUSTER_MGMT": "1"}


def port(n):
    return 5680 + n


def script(*args, timeout=240, check=True):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], check=check,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV})


class ClusterBroker(Node):
    def __init__(self):
        super().__init__("c1@localhost", port(1), 15681)
        self.down = set()           # node numbers not serving now
        self._order = {}            # user -> index of its URL's first node

    @staticmethod
    def node_name(n):
        return f"c{n}@localhost"

    @staticmethod
    def node_of_port(p):
        return next((n for n in NODES if port(n) == p), None)

    def up(self):
        return [n for n in NODES if n not in self.down]

    # --- URLs ------------------------------------------------------------------
    def url(self, user=ADMIN[0], password=None):
        """A failover URL of all three nodes, as a deployment gives its
        services. Each user's list begins at another node (in the order
        they first ask), so the services spread over the cluster."""
        password = password or (ADMIN[1] if user == ADMIN[0] else PASSWORD)
        first = self._order.setdefault(user, len(self._order) % len(NODES))
        order = NODES[first:] + NODES[:first]
        return ";".join(f"amqp://{user}:{password}@127.0.0.1:{port(n)}//"
                        for n in order)

    def client_url(self, user=ADMIN[0], password=None):
        password = password or (ADMIN[1] if user == ADMIN[0] else PASSWORD)
        return f"amqp://{user}:{password}@127.0.0.1:{port(self.up()[0])}//"

    def mgmt_base(self):
        return f"http://127.0.0.1:{15680 + self.up()[0]}/api"

    def reachable(self):
        return bool(self.up()) and super().reachable()

    def close_connections(self, user):
        """As on one node. But RabbitMQ 3.10 may answer the by-user close
        with 500 while a node is away or coming back (a cluster chaos run
        failed on it, c2 stopped: the fault injector's trouble, not the
        services'): then each of the user's connections that the nodes up
        list is closed by name (one on a node going away may 500 too)."""
        try:
            return super().close_connections(user)
        except RuntimeError as exc:
            if "HTTP 500" not in str(exc):
                raise
        for conn in self.api("GET", "/connections?columns=name,user") or []:
            if conn.get("user") == user:
                self.api("DELETE", f"/connections/{q(conn['name'])}",
                         ok=(404, 500))

    # --- what runs where ----------------------------------------------------------
    def leader(self, queue):
        """The node number leading a quorum queue, or None."""
        try:
            info = self.api("GET", f"/queues/%2F/{q(queue)}", timeout=5) or {}
        except (OSError, RuntimeError):
            return None
        leader = info.get("leader") or ""
        return int(leader[1]) if leader.startswith("c") else None

    # --- node faults ---------------------------------------------------------------
    def take_down(self, n, how):
        """Node n away: "kill" (-9 of its Erlang VM), "stop_app", or "stop"
        (the whole VM, cleanly). A process to wait for: done, n is down."""
        self.down.add(n)
        if how == "stop_app":
            cmd = ["rabbitmqctl", "-q", "-n", self.node_name(n), "stop_app"]
        else:
            cmd = ["bash", str(SCRIPT), {"kill": "kill", "stop": "stop-node"}[how],
                   str(n)]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **ENV})

    def revive(self, n, how):
        """Node n back ("kill", "stop": started again with its data;
        "stop_app": start_app), until it sees the whole cluster: a process
        to wait for (then call `back`)."""
        if how in ("kill", "stop"):
            cmd = ["bash", str(SCRIPT), "run", str(n)]
        else:
            name = self.node_name(n)
            cmd = ["bash", "-c",
                   f"rabbitmqctl -q -n {name} start_app && "
                   f"rabbitmqctl -q -n {name} await_startup --timeout 60"]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **ENV})

    def back(self, n):
        """Node n serves again (its management API too)."""
        base = f"http://127.0.0.1:{15680 + n}/api"
        deadline = time.monotonic() + 60
        while True:
            try:
                self._get(base + "/overview")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"c{n}'s management API not up") from None
                time.sleep(0.2)
        self.down.discard(n)

    def _get(self, url):
        req = urllib.request.Request(url)
        req.add_header("Authorization", self._auth)
        with urllib.request.urlopen(req, timeout=2) as resp:
            resp.read()

    def make_whole(self):
        """Every node running (after the test, whatever it did)."""
        for n in NODES:
            script("thaw", n, check=False)
            if n in self.down:
                if self._app_stopped(n):
                    subprocess.run(["rabbitmqctl", "-q", "-n", self.node_name(n),
                                    "start_app"], capture_output=True, timeout=120)
                else:
                    script("run", n)
                self.back(n)

    def _app_stopped(self, n):
        """The Erlang node answers (only its app was stopped)."""
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.node_name(n),
                               "ping"], capture_output=True,
                              timeout=60).returncode == 0
