"""Node loss on a 3-node RabbitMQ cluster loses nothing.

3,000 events at a steady rate go publisher -> two router processes -> host
consumer -> waiter, over quorum queues, while a node dies. Each scenario
reports sent, confirmed, delivered, duplicate wake-ups, lost and the longest
gap between two deliveries (how long the waiters starved).
"""

import itertools
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from compute.events import DELIVERED, DUPLICATE
from network.publisher import InstanceEventPublisher, PublisherSettings
from tests.cluster.conftest import ClusterBus
from tests.conftest import report_fault, wait_for
from tests.functional.test_faults import CountingWaiters, stream
from tests.functional.test_router_process import consumers, start_router, stop
from tests.functional.waiter_harness import HostEvents

pytestmark = pytest.mark.cluster

N = 3000
RATE = 150.0            # events per second: a 20 s stream
MAX_GAP = 10.0          # seconds without a delivery, at most


class TimedWaiters(CountingWaiters):
    """CountingWaiters that also note when each waiter was woken."""

    def __init__(self):
        super().__init__()
        self.times = []

    def deliver(self, event, message_id):
        outcome = super().deliver(event, message_id)
        if outcome == DELIVERED:
            self.times.append(time.monotonic())
        return outcome

    def longest_gap(self):
        times = sorted(self.times)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class SteadyPublisher:
    """The network publisher, fed at a steady rate from its own thread."""

    def __init__(self, bus, url, events, spool):
        self.events = events
        self.receipts = []
        self.publisher = InstanceEventPublisher(PublisherSettings(
            transport_url=url, topology=bus.topology, spool_path=spool,
            retry_for=1.0, confirm_timeout=2.0)).start()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="steady-publisher")

    def _run(self):
        t0 = time.monotonic()
        for i, env in enumerate(self.events):
            delay = t0 + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.receipts.append(self.publisher.publish(env.payload))

    def confirmed(self):
        """Events the broker confirmed (at once, or later from the spool)."""
        stats = self.publisher.stats
        return stats["sent"] + stats["drained"]


def run_scenario(cluster, tmp_path, name, fault, *, services, control, leader,
                 publisher_first):
    bus = ClusterBus(cluster, services=services, control=control, leader=leader)
    routers, host, pub = [], None, None
    try:
        bus.declare_central()
        waiters = TimedWaiters()
        host = HostEvents(bus, deliver=waiters.deliver, prefetch=256)
        extra = ["--transport-url", bus.transport_url, "--bus-queue_type", "quorum"]
        routers = [start_router(bus, f"{name}-r{i}", extra=extra) for i in (1, 2)]
        wait_for(lambda: consumers(bus) == 2, timeout=30, what="two routers consuming")
        events = stream(host.host, N)
        waiters.prepare(events)
        pub_order = [publisher_first] + [n for n in cluster.nodes if n != publisher_first]
        pub = SteadyPublisher(bus, cluster.url(*pub_order), events, str(tmp_path / name))
        pub.thread.start()
        wait_for(lambda: waiters.outcomes[DELIVERED] >= N // 3, timeout=60,
                 what="a third of the stream delivered")
        fault(bus, host, waiters)
        pub.thread.join(120)
        wait_for(lambda: waiters.outcomes[DELIVERED] >= N, timeout=120,
                 what="every waiter woken")
        # a late redelivery would show up as a duplicate here
        wait_for(lambda: host.queue_depth() == 0, timeout=30, what="host queue drained")
        pub.publisher.wait_drained(30)
        twice = sum(1 for c in waiters.woken.values() if c > 1)
        gap = waiters.longest_gap()
        counts = dict(sent=len(pub.receipts), confirmed=pub.confirmed(),
                      spooled=sum(r.spooled for r in pub.receipts),
                      delivered=len(waiters.woken),
                      duplicates_ignored=waiters.outcomes[DUPLICATE],
                      duplicate_wakeups=twice, lost=N - len(waiters.woken),
                      longest_gap=f"{gap:.2f}s")
        report_fault(f"cluster: {name}", **counts)
        assert len(pub.receipts) == N and pub.confirmed() == N
        assert len(waiters.woken) == N and twice == 0
        assert gap < MAX_GAP
        return counts
    finally:
        if pub is not None:
            pub.publisher.close()
        outputs = [stop(proc, signal.SIGKILL)[1] for proc in routers]
        if sys.exc_info()[0] is not None:
            for i, out in enumerate(outputs, 1):
                print(f"--- router r{i} (last 40 lines) ---")
                print("\n".join(out.splitlines()[-40:]))
        if host is not None:
            host.stop()
        cluster.make_whole()
        bus.cleanup()


def flowing_again(waiters, what, more=300):
    """Wait until `more` further waiters woke: the services failed over."""
    seen = waiters.outcomes[DELIVERED]
    wait_for(lambda: waiters.outcomes[DELIVERED] >= min(N, seen + more),
             timeout=30, what=what)


def test_kill_9_of_the_node_the_services_use(cluster, tmp_path):
    # services and every queue's leader on c1; publisher and test on c2
    def kill(bus, host, waiters):
        cluster.kill(1)
        flowing_again(waiters, "events flowing with c1 dead")
        cluster.revive(1)

    run_scenario(cluster, tmp_path, "kill -9 of the services' node", kill,
                 services=(1, 2, 3), control=2, leader=1, publisher_first=2)


def test_kill_9_of_the_queue_leaders_node(cluster, tmp_path):
    # queues led by c3, services on c1, publisher and test on c2
    def kill_leader(bus, host, waiters):
        led = {cluster.leader(bus.topology.router_queue_name),
               cluster.leader(bus.topology.host_queue_name(host.host))}
        assert led == {3}, f"queue leaders on {led}, not c3"
        cluster.kill(3)
        flowing_again(waiters, "events flowing with c3 dead")
        cluster.revive(3)

    run_scenario(cluster, tmp_path, "kill -9 of the router and host queues' leader",
                 kill_leader, services=(1, 2, 3), control=2, leader=3,
                 publisher_first=2)


def test_node_stopped_and_started_again(cluster, tmp_path):
    # services and leaders on c1, which stops cleanly and comes back
    def stop_start(bus, host, waiters):
        cluster.stop_node(1)
        flowing_again(waiters, "events flowing with c1 stopped")
        cluster.start_node(1)

    run_scenario(cluster, tmp_path, "node stopped and started again", stop_start,
                 services=(1, 2, 3), control=2, leader=1, publisher_first=1)


# --- a dead first host ------------------------------------------------------

DEAD = "guest:guest@127.0.0.1:5689"     # nothing listens there


def _healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def test_router_whose_url_starts_with_a_dead_host_is_healthy_within_10s(cluster):
    bus = ClusterBus(cluster, services=(1, 2, 3), control=2, leader=2)
    proc = None
    try:
        bus.declare_central()
        url = cluster.url(1, 2, 3).replace("rabbit://", f"rabbit://{DEAD},")
        t0 = time.monotonic()
        proc = start_router(bus, "dead-first", ops_listen="127.0.0.1:9389",
                            extra=["--transport-url", url, "--bus-queue_type", "quorum"])
        wait_for(lambda: _healthy(9389), timeout=10, interval=0.1,
                 what="the router healthy")
        print(f"\nrouter healthy {time.monotonic() - t0:.2f}s after start "
              f"(first host of its URL dead)")
        assert consumers(bus) == 1
    finally:
        if proc is not None:
            stop(proc, signal.SIGTERM)
        bus.cleanup()


def test_topology_declare_with_a_dead_first_host(cluster):
    bus = ClusterBus(cluster, services=(1, 2, 3), control=2, leader=2)
    try:
        url = cluster.url(1, 2, 3).replace("rabbit://", f"rabbit://{DEAD},")
        out = subprocess.run(
            [sys.executable, "-m", "router.cli", "topology", "--declare",
             "--transport-url", url, "--bus-prefix", bus.prefix,
             "--bus-queue_type", "quorum", "--host", "cmp-x"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "declared on amqp://guest:**@127.0.0.1:5681" in out.stdout
        bus.own(exchanges=[bus.topology.host_exchange_name("cmp-x")],
                queues=[bus.topology.host_queue_name("cmp-x")])
        assert cluster.leader(bus.topology.router_queue_name) == 1
        ch = bus.channel()
        ok = ch.queue_declare(bus.topology.router_queue_name, passive=True)
        assert ok.message_count == 0
    finally:
        bus.cleanup()
