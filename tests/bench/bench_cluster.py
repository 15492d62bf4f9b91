"""Cluster benchmarks: the 3-node quorum cluster against the single broker. Not a test.

    python -m tests.bench.bench_cluster [--events 10000] [--recoveries 3]

Needs the cluster of tests/cluster (started here if it is not running, and
stopped again afterwards).

6. Throughput end to end, publisher process (pipelined confirms) -> ingress
   -> one router process -> host queue -> host consumer and waiter registry
   in this process, persistent and confirmed at every hop: on the 3-node
   cluster with quorum queues (everything connected to c1, the queues led
   there) vs the main single-node broker with classic queues, alternating,
   best of 2 each, as a ratio.
7. Recovery after kill -9 of the node the router and the host consumer are
   connected to (c1; queue leaders there too), under a steady 300 events/s
   published through c2: router healthy again, host consumer consuming
   again, first event published after the kill delivered, and the longest
   gap between two deliveries. Then c1 is started again.
"""

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from compute.events import DELIVERED, InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import connection as bus_connection
from router.bus import contract, topology
from router.bus.publishing import ConfirmedPublisher

SINGLE = "rabbit://guest:guest@127.0.0.1:5672/"
CLUSTER = ("rabbit://guest:guest@127.0.0.1:5681,guest:guest@127.0.0.1:5682,"
           "guest:guest@127.0.0.1:5683/")
THROUGH_C2 = ("rabbit://guest:guest@127.0.0.1:5682,guest:guest@127.0.0.1:5683,"
              "guest:guest@127.0.0.1:5681/")
SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "rabbitmq-cluster.sh"
KEY = topology.instance_routing_key(contract.VIF_PLUGGED)
HOST = "bench-host"
# Where the router processes log: nowhere, unless BENCH_ROUTER_LOG names a file.
_ROUTER_LOG = (open(os.environ["BENCH_ROUTER_LOG"], "a")  # noqa: SIM115
               if os.environ.get("BENCH_ROUTER_LOG") else subprocess.DEVNULL)


def _cluster(*args, timeout=240):
    return subprocess.run(["bash", str(SCRIPT), *args], check=True, text=True,
                          capture_output=True, timeout=timeout).stdout


def _until(predicate, timeout, interval=0.01):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError("benchmark condition not reached in time")
        time.sleep(interval)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bodies(servers):
    return [contract.encode(contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, s, "port", host=HOST), "bench")) for s in servers]


class Slice:
    """A topology under its own prefix, declared through the URL's first node."""

    def __init__(self, url, queue_type):
        self.url = url
        self.topo = topology.Topology(prefix=f"bench-{uuid.uuid4().hex[:8]}",
                                      queue_type=queue_type)
        with bus_connection.connect_once(bus_connection.connection(url)) as conn:
            ch = conn.channel()
            topology.declare(ch, *self.topo.central())
            topology.declare(ch, *self.topo.for_host(HOST))

    def cleanup(self):
        ex, qs = self.topo.central()
        e_host, q_host = self.topo.for_host(HOST)
        with bus_connection.connect_once(bus_connection.connection(self.url)) as conn:
            for q in qs + q_host:
                conn.channel().queue_delete(q.name)
            for e in ex + e_host:
                conn.channel().exchange_delete(e.name)


class Router:
    def __init__(self, sl):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "router", "--transport-url", sl.url,
             "--bus-prefix", sl.topo.prefix, "--bus-queue_type", sl.topo.queue_type,
             "--router-ops_listen", f"127.0.0.1:{self.port}",
             "--bus-host_message_ttl", "3600"],
            stdout=_ROUTER_LOG, stderr=subprocess.STDOUT)
        _until(self.healthy, 30, 0.05)

    def healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                        timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _publish(url, exchange, payloads, rate, t0):
    """In a process of its own: pipelined confirms; paced when rate is set."""
    conn = bus_connection.connect_once(bus_connection.connection(url))
    outcomes = []
    pub = ConfirmedPublisher(conn.channel(), lambda t, o: outcomes.append(o),
                             user_id=bus_connection.user_of(conn))
    for i, body in enumerate(payloads):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        pub.publish(exchange, KEY, body, i)
        if rate or i % 256 == 255:
            try:
                while True:
                    conn.drain_events(timeout=0)
            except (socket.timeout, BlockingIOError):
                pass
    while len(outcomes) < len(payloads):
        conn.drain_events(timeout=10)
    conn.release()


def _start_publisher(url, exchange, payloads, rate=None, t0=None):
    proc = multiprocessing.Process(target=_publish, daemon=True,
                                   args=(url, exchange, payloads, rate, t0))
    proc.start()
    return proc


class Host:
    """This host's consumer and registry, every event prepared."""

    def __init__(self, sl, servers):
        self.registry = InstanceEvents(max_seen_ids=len(servers) * 2)
        self.index = {s: i for i, s in enumerate(servers)}
        self.times = {}
        for s in servers:
            self.registry.prepare(s, contract.VIF_PLUGGED, "port")
        self.consumer = HostConsumer(HostConsumerSettings(
            host=HOST, transport_url=sl.url, topology=sl.topo, prefetch=512),
            self._deliver)
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)
        self.thread.start()
        if not self.consumer.ready.wait(15):
            raise RuntimeError("host consumer did not start")

    def _deliver(self, event, message_id):
        outcome = self.registry.deliver(event, message_id)
        if outcome == DELIVERED:
            self.times[self.index[event.server_uuid]] = time.monotonic()
        return outcome

    def stop(self):
        self.consumer.stop()
        self.thread.join(15)


# --- 6. throughput -------------------------------------------------------------

def rate(url, queue_type, n):
    sl = Slice(url, queue_type)
    router = Router(sl)
    servers = [str(uuid.uuid4()) for _ in range(n)]
    host = Host(sl, servers)
    try:
        start = time.monotonic()
        pub = _start_publisher(url, sl.topo.ingress_exchange_name, _bodies(servers))
        _until(lambda: len(host.times) >= n, 600)
        result = n / (time.monotonic() - start)
        pub.join(10)
    finally:
        host.stop()
        router.stop()
        sl.cleanup()
    return result


def throughput(n, rounds=2):
    cluster, single = [], []
    for _ in range(rounds):
        cluster.append(rate(CLUSTER, "quorum", n))
        single.append(rate(SINGLE, "classic", n))
    return max(cluster), max(single)


# --- 7. recovery after kill -9 ----------------------------------------------------

def _kill_c1():
    """kill -9 of c1's VM, now (the script's own check that the pid is c1)."""
    pid = int(Path("/tmp/evrouter-cluster/c1/pid").read_text())
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    if b"RABBITMQ_NODENAME=c1@localhost" not in environ:
        raise RuntimeError(f"pid {pid} is not c1@localhost")
    t = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return t


class Watch:
    """Samples a health predicate every 5 ms on a thread: (time, healthy)."""

    def __init__(self, predicate):
        self.samples = []
        self._predicate = predicate
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.samples.append((time.monotonic(), self._predicate()))

    def back_after(self, t):
        """Seconds from t until healthy again after being seen unhealthy."""
        down = None
        for when, ok in self.samples:
            if when >= t and not ok and down is None:
                down = when
            if down is not None and ok:
                return when - t
        return None

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def _members(queue):
    out = subprocess.run(["rabbitmqctl", "-q", "-n", "c2@localhost", "list_queues",
                          "name", "members", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return next((len(r["members"]) for r in json.loads(out) if r["name"] == queue), 0)


def recovery(n=6000, pace=300.0):
    sl = Slice(CLUSTER, "quorum")
    for queue in (sl.topo.router_queue_name, sl.topo.host_queue_name(HOST)):
        if _members(queue) != 3:
            raise RuntimeError(f"{queue} has {_members(queue)} members, not 3")
    router = Router(sl)
    servers = [str(uuid.uuid4()) for _ in range(n)]
    host = Host(sl, servers)
    killed = False
    watches = [Watch(router.healthy), Watch(host.consumer.ready.is_set)]
    try:
        t0 = time.monotonic() + 0.5
        pub = _start_publisher(THROUGH_C2, sl.topo.ingress_exchange_name,
                               _bodies(servers), pace, t0)
        _until(lambda: len(host.times) >= n // 4, 60)
        t_kill = _kill_c1()
        killed = True
        after = [i for i in range(n) if t0 + i / pace > t_kill]
        _until(lambda: any(i in host.times for i in after), 60)
        first = min(host.times[i] for i in after if i in host.times) - t_kill
        _until(lambda: len(host.times) >= n, 120)
        pub.join(30)
        router_back, consumer_back = (w.back_after(t_kill) for w in watches)
        times = sorted(host.times.values())
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        return router_back, consumer_back, first, gap
    finally:
        for w in watches:
            w.stop()
        host.stop()
        router.stop()
        if killed:
            _cluster("run", "1")
        sl.cleanup()


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_cluster")
    p.add_argument("--events", type=int, default=10_000)
    p.add_argument("--recoveries", type=int, default=3)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    started = "down" in _cluster("status")
    if started:
        print("starting the 3-node cluster (tests/cluster/rabbitmq-cluster.sh)", flush=True)
    _cluster("start")
    try:
        c, s = throughput(args.events) if not args.skip_throughput else (0, 1)
        print(f"6. cluster throughput end to end ({args.events} events, best of 2): "
              f"3-node cluster, quorum queues {c:,.0f} events/s; single node, classic "
              f"queues {s:,.0f} events/s; ratio {c / s:.2f}", flush=True)
        runs = [recovery() for _ in range(args.recoveries)]
        if not runs:            # --recoveries 0: the throughput alone
            return 0
        med = [statistics.median(r[k] for r in runs) for k in range(4)]
        worst = [max(r[k] for r in runs) for k in range(4)]
        print(f"7. recovery after kill -9 of the connected node (median / worst of "
              f"{len(runs)}): router healthy again {med[0]:.2f} / {worst[0]:.2f} s, host "
              f"consumer consuming {med[1]:.2f} / {worst[1]:.2f} s, first event published "
              f"after the kill delivered {med[2]:.2f} / {worst[2]:.2f} s, longest "
              f"delivery gap {med[3]:.2f} / {worst[3]:.2f} s (target < 5 s)", flush=True)
    finally:
        if started:
            _cluster("stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
