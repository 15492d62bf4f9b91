"""Boot storm over many live compute hosts, and the oslo.messaging path beside it. Not a test.

    python -m tests.bench storm                      # 1,000 hosts, 2,000 instances
    python -m tests.bench storm --hosts 20 --instances 40    # while developing

Each simulated compute host runs what a compute host runs, on its own broker
connections: a HostConsumer feeding its own waiter registry
(compute.events.InstanceEvents), and a lifecycle publisher (libvirt itself is
not simulated: the boot publishes STARTED and PAUSED, and RESUMED once woken,
after one empty host-snapshot at start). --lifecycle blocking (default): a
BlockingPublisher on the host's second connection, called by the booting
thread; --lifecycle outbox: the agent's LifecyclePublisher thread and Outbox,
whose idle loop (4 wake-ups a second per host) over 1,000 hosts took the
whole of this 2-core machine before the storm began. Hosts are spread over
--workers processes. Two
router processes (`evrouter router`) route; the network side is one process
with an InstanceEventPublisher (spooled, confirmed), called from --callers
threads. Topology under a prefix of its own; host entities are declared by
the host consumers, as in a deployment; everything is deleted afterwards.

The storm (tests/bench/storm_load.py): --instances instances with 2 ports
each boot over --spread seconds; each prepares its two network-vif-plugged
waits (one wait_for_instance_event, --timeout), the port transitions are
published --plug-delay after the boot started, half of them without a host
hint (routed by the placement the routers learn from the lifecycle fanout).

Then the same storm on the reference (tests/bench/storm_reference.py): the
path OpenStack takes today on oslo.messaging, a notification -> a relay ->
an RPC cast to topic compute, server=<host>, one RPC server per host.

The machine's broker takes as many connections as its fd limit allows
(`rabbitmq-diagnostics status`: 832 sockets with the default 1024 fds). If
the storm needs more, it runs on a RabbitMQ node of its own started beside
the main one with the fd limit raised (tests/bench/storm_broker.py), and
stopped afterwards; --broker main|dedicated forces one or the other.

--profile DIR records the routers (the reference: its relay), one compute
worker and the network process with py-spy --gil (--py-spy PATH, or on
PATH; `pip install py-spy`), and the broker's Erlang scheduler time by
activity (rabbitmq-diagnostics runtime_thread_stats) over the storm. CPU
shares of every party and of the whole machine are always reported.
"""

import argparse
import collections
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from compute.host_consumer import HostConsumer, HostConsumerSettings
from compute.lifecycle_publisher import LifecyclePublisher, Outbox, Outgoing
from network.publisher import InstanceEventPublisher, PublisherSettings
from router.bus import connection as bus_connection
from router.bus import contract, topology
from router.bus.publishing import BlockingPublisher
from tests.bench import bench_router, storm_broker, storm_load
from tests.bench.bench_router import _until, free_port, pct

# libvirt's (event, detail) codes of what a paused boot emits
_LIBVIRT = {"STARTED": (2, 0), "PAUSED": (3, 0), "RESUMED": (4, 0)}


# --- evrouter's compute host and network side (built inside the workers) ---------

class _EvrouterHost:
    """A compute host: its HostConsumer, and its lifecycle publisher.

    lifecycle="outbox": the agent's own LifecyclePublisher and Outbox (a
    thread per host, idling at 4 wake-ups a second). lifecycle="blocking":
    a BlockingPublisher on a connection of its own, called by the booting
    thread under the host's lock (no thread; heartbeats off, as nothing
    reads that connection between publishes). Same envelopes either way.
    lifecycle=None: no publisher, the HostConsumer's connection alone (for
    events that all carry their host hint).
    """

    def __init__(self, host, deliver, url, topo, lifecycle):
        self.host, self.topo = host, topo
        self.consumer = HostConsumer(HostConsumerSettings(
            host=host, transport_url=url, topology=topo), deliver)
        self.thread = self.consumer.start()
        self.seq = itertools.count(1)
        self.up = threading.Event()
        self.outbox = self.publisher = self.blocking = None
        if lifecycle == "outbox":
            self.outbox = Outbox(1000)
            self.publisher = LifecyclePublisher(
                self.outbox, topo,
                lambda up, detail: self.up.set() if up else self.up.clear(),
                transport_url=url)
            self.publisher.start()
        elif lifecycle is None:
            self.up.set()
            return
        else:
            self.lock = threading.Lock()
            self.conn = bus_connection.connection(url, heartbeat=0)
            bus_connection.connect_once(self.conn)
            self.blocking = BlockingPublisher(self.conn,
                                              user_id=bus_connection.user_of(self.conn))
            self.up.set()
        self._put(contract.HostSnapshot(host, next(self.seq), ()))

    def _put(self, payload):
        env = contract.envelope(payload, f"agent@{self.host}")
        body = contract.encode(env)
        if self.outbox is not None:
            self.outbox.put(Outgoing(env.id, body, env.kind))
            return
        with self.lock:
            self.blocking.publish(self.topo.lifecycle_exchange_name, "", body,
                                  message_id=env.id, mandatory=False)

    def ready(self):
        return self.consumer.ready.is_set() and self.up.is_set()

    def lifecycle(self, server, transition):
        event, detail = _LIBVIRT[transition]
        self._put(contract.LifecycleEvent(server, self.host, transition, event,
                                          detail, next(self.seq)))

    def stop(self):
        self.consumer.stop()
        if self.outbox is not None:
            self.outbox.close()

    def join(self):
        if self.publisher is not None:
            self.publisher.finish(5)
        elif self.blocking is not None:
            self.conn.release()
        self.thread.join(10)


class EvrouterCompute:
    def __init__(self, url, prefix, lifecycle):
        self.url, self.topo = url, topology.Topology(prefix=prefix)
        self.lifecycle = lifecycle

    def start_host(self, host, deliver):
        return _EvrouterHost(host, deliver, self.url, self.topo, self.lifecycle)


class EvrouterNetwork:
    def __init__(self, url, prefix, spool_dir, warm_host):
        self.warm_host = warm_host
        self.publisher = InstanceEventPublisher(PublisherSettings(
            transport_url=url, topology=topology.Topology(prefix=prefix),
            producer="network@storm", spool_path=os.path.join(spool_dir, "spool"))).start()

    def warm(self):
        # Connects the publisher before the storm; nobody waits for this
        # event: its host holds it, unused.
        self.publisher.publish(contract.InstanceEvent(
            contract.NETWORK_CHANGED, str(uuid.uuid4()), "warm-up",
            host=self.warm_host))

    def publish(self, server, port, hint):
        self.publisher.publish(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, port, contract.COMPLETED, host=hint))

    def close(self):
        self.publisher.close()


# --- the broker, the routers, the profiler ------------------------------------------

def show(lines, results, path):
    """Print a report; write every result so far to `path` (if any)."""
    print("\n".join(lines), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


class StormRouter(bench_router.Router):
    """bench_router's router process, on the storm's broker."""

    def __init__(self, prefix, url):     # bench_router.Router is for 5672 only
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "router", "--bus-prefix", prefix,
             "--transport-url", url, "--router-ops_listen", f"127.0.0.1:{self.port}",
             # every simulated host is the one benchmark user
             "--router-lifecycle_trusted_users",
             bus_connection.user_of(bus_connection.connection(url))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(lambda: self.metric("evrouter_router_connected") == 1, 60)


class Profiler:
    """py-spy record of some processes for the storm's duration (raw stacks)."""

    def __init__(self, directory, py_spy):
        self.directory, self.py_spy, self.procs = directory, py_spy, []
        self.rate = 50         # samples/s: enough, and light on a busy machine
        self.broker_stats = []
        os.makedirs(directory, exist_ok=True)

    def start(self, targets, seconds):
        for name, pid in targets:
            out = os.path.join(self.directory, f"{name}.txt")
            self.procs.append((name, out, subprocess.Popen(
                [self.py_spy, "record", "--pid", str(pid), "--duration",
                 str(max(1, round(seconds))), "--rate", str(self.rate), "--nonblocking",
                 "--gil",
                 "--format", "raw", "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    def broker(self, name, node, seconds):
        """The broker's scheduler time by activity, over the storm."""
        out = os.path.join(self.directory, f"{name}-broker-threads.txt")
        self.broker_stats.append((name, out, subprocess.Popen(
            ["rabbitmq-diagnostics", "-q", "-n", node, "runtime_thread_stats",
             "--sample-interval", str(max(1, round(seconds)))],
            stdout=open(out, "w"), stderr=subprocess.DEVNULL)))  # noqa: SIM115

    def broker_summary(self):
        lines = []
        for name, out, proc in self.broker_stats:
            proc.wait(120)
            with open(out) as f:
                text = f.read().splitlines()
            head = next((x for x in text if x.strip().startswith("Thread")), "")
            by_type = text.index("Stats per type:") + 1 if "Stats per type:" in text else 0
            lines.append(f"  {name} broker, Erlang threads by activity ({out}):")
            lines.append(f"    {head.strip()}")
            lines += [f"    {x.strip()}" for x in text[by_type:]
                      if x.strip().startswith(("scheduler", "dirty_cpu", "dirty_io"))]
        return lines

    def summary(self, top=5):
        """Per process: samples holding the GIL; the functions they were in
        (self time), and the deepest function of ours (or oslo.messaging's)
        on their stack, the one that called into libraries."""
        lines = []
        for name, out, proc in self.procs:
            proc.wait(120)
            leaves, owners, total = collections.Counter(), collections.Counter(), 0
            if os.path.exists(out):
                with open(out) as f:
                    for line in f:
                        stack, _, n = line.rstrip().rpartition(" ")
                        if not n.isdigit():
                            continue
                        n, frames = int(n), [_function(x) for x in stack.split(";")
                                             if x.strip()]
                        total += n
                        leaves[frames[-1] if frames else _NATIVE] += n
                        ours = [x for x in frames if x.split("(")[-1].startswith(_OURS)]
                        owners[ours[-1] if ours else _NATIVE if not frames
                               else "(elsewhere)"] += n
            lines.append(f"  {name}: {total} samples holding the GIL "
                         f"= {total / self.rate:.1f} s of Python CPU ({out})")
            for title, counts in (("self", leaves), ("in", owners)):
                lines.append(f"    {title}: " + "; ".join(
                    f"{100 * k / max(total, 1):.0f}% {frame}"
                    for frame, k in counts.most_common(top)))
        return lines


_NATIVE = "(no Python frame: interpreter, GC or native code)"
_OURS = ("router/", "compute/", "network/", "tests/", "oslo_messaging/")


def _function(frame):
    """'func (path/file.py:123)' -> 'func (path/file.py)'."""
    head, _, where = frame.rpartition(" (")
    return f"{head} ({where.rsplit(':', 1)[0]})" if where else frame


def _busy():
    """CPU seconds the whole machine has been busy (every process, ours or not)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _cpu(pids):
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_seconds(broker, parties):
    """CPU seconds so far of each party ({name: [pid, ...]}), one figure a
    process; and the broker's, and the whole machine's busy time."""
    out = {name: [_cpu([pid]) for pid in pids] for name, pids in parties.items()}
    out["broker"], out["machine"] = [broker.cpu()], [_busy()]
    return out


def cpu_spent(before, after):
    """What each process of each party spent between two cpu_seconds()."""
    return {k: [b - a for a, b in zip(before[k], after[k], strict=True)] for k in before}


def idle_cores(broker, parties, seconds=3.0):
    """Cores each party keeps busy while nothing happens (heartbeats, idle loops)."""
    t, before = time.monotonic(), cpu_seconds(broker, parties)
    time.sleep(seconds)
    spent, t = cpu_spent(before, cpu_seconds(broker, parties)), time.monotonic() - t
    return {k: sum(v) / t for k, v in spent.items()}


# --- one storm ---------------------------------------------------------------------

def run_phase(name, args, broker, storm, services, profiler):
    """Start the storm's processes, measure, storm, measure; raw figures.

    `services`: (label, pid) of the middle (routers, or the reference's relay).
    """
    out = {"name": name}
    mem_before = broker.memory()
    conns_before = broker.connections()
    t = time.monotonic()
    ready, (net_usage,) = storm.start()
    out["startup_s"] = time.monotonic() - t
    workers, network = storm.pids
    service_pids = [pid for _, pid in services]
    parties = {"services": service_pids, "compute": workers, "network": [network]}
    time.sleep(1)           # snapshots, queue declarations settle
    out["idle_cores"] = idle_cores(broker, parties)
    out["mem_before"], out["mem_idle"] = mem_before, broker.memory()
    out["connections"] = broker.connections() - conns_before
    out["rss_empty"] = sum(r[0] for r in ready)
    out["rss_idle"] = sum(r[1][0] for r in ready)
    out["threads"] = sum(r[1][2] for r in ready)
    cpu0 = cpu_seconds(broker, parties)
    t_cpu0 = time.time()
    t0 = storm.go()
    if profiler is not None:
        profiler.start([(f"{name}-{label}", pid) for label, pid in services]
                       + [(f"{name}-compute-worker", workers[0]),
                          (f"{name}-network", network)],
                       1 + args.spread + args.plug_delay + 4)
        profiler.broker(name, broker.node, 1 + args.spread + args.plug_delay + 4)
    compute, (published, errors, _) = storm.wait_done(
        args.spread + args.plug_delay + args.timeout + 120)
    t1 = time.time()
    out["cpu"] = {k: sum(v) for k, v in cpu_spent(cpu0, cpu_seconds(broker, parties)).items()}
    out["mem_storm"] = broker.memory()
    out["alarms"] = storm_broker.alarms(broker.node)
    out["window_s"] = t1 - t_cpu0
    out["t0"] = t0
    out["published"], out["publish_errors"] = published, errors
    out["results"] = [r for c in compute for r in c[0]]
    out["arrivals"] = {k: v for c in compute for k, v in c[1].items()}
    out["rss_storm"] = sum(c[2][0] for c in compute)
    return out


def figures(raw, boots, hosts):
    """Counts, latencies, durations and per-unit costs of one storm."""
    pub, arr = raw["published"], raw["arrivals"]
    events = [(b, p) for b in boots for p in b.ports]
    lat = {True: [], False: []}
    for b, p in events:
        if (b.server, p) in pub and (b.server, p) in arr:
            lat[b.hint is not None].append(arr[(b.server, p)][0] - pub[(b.server, p)][0])
    arrived = [arr[(b.server, p)][0] for b, p in events if (b.server, p) in arr]
    woken = [r for r in raw["results"] if r[3] == "woken"]
    waiter_lat = []
    for index, _, t_woken, _ in woken:
        b = boots[index]
        sent = [pub[(b.server, p)][0] for p in b.ports if (b.server, p) in pub]
        if len(sent) == len(b.ports):
            waiter_lat.append(t_woken - max(sent))
    first_pub = min((v[0] for v in pub.values()), default=raw["t0"])
    n = len(events)
    f = {
        "events": n, "published": len(pub), "arrived": len(arrived),
        "held": sum(1 for b, p in events if arr.get((b.server, p), (0, ""))[1] == "held"),
        "waiters": len(boots), "woken": len(woken),
        "timeouts": sum(1 for r in raw["results"] if r[3] == "timeout"),
        "failures": [r[3] for r in raw["results"] if r[3] not in ("woken", "timeout")][:5],
        "publish_errors": raw["publish_errors"][:5],
        "event_ms": _stats(lat[True] + lat[False]),
        "hinted_ms": _stats(lat[True]), "hintless_ms": _stats(lat[False]),
        "waiter_ms": _stats(waiter_lat),
        "publish_call_ms": _stats([v[1] - v[0] for v in pub.values()]),
        "storm_s": max((r[2] for r in woken), default=raw["t0"]) - raw["t0"],
        "publishing_s": max((v[0] for v in pub.values()), default=first_pub) - first_pub,
        "throughput": len(arrived) / max(max(arrived, default=first_pub) - first_pub, 1e-9),
        "service_cpu_us": 1e6 * raw["cpu"]["services"] / max(len(arrived), 1),
        "broker_cpu_us": 1e6 * raw["cpu"]["broker"] / max(len(arrived), 1),
        "broker_cpu_us_above_idle": 1e6 * (raw["cpu"]["broker"] - raw["idle_cores"]["broker"]
                                           * raw["window_s"]) / max(len(arrived), 1),
        "broker_cores": raw["cpu"]["broker"] / raw["window_s"],
        "compute_cores": raw["cpu"]["compute"] / raw["window_s"],
        "service_cores": raw["cpu"]["services"] / raw["window_s"],
        "network_cores": raw["cpu"]["network"] / raw["window_s"],
        "machine_cores": raw["cpu"]["machine"] / raw["window_s"],
        "window_s": raw["window_s"],
        "idle_cores": raw["idle_cores"],
        "network_cpu_us": 1e6 * raw["cpu"]["network"] / max(len(pub), 1),
        "startup_s": raw["startup_s"], "connections": raw["connections"],
        "client_kib_per_host": (raw["rss_idle"] - raw["rss_empty"]) / len(hosts) / 1024,
        "client_rss_mib": raw["rss_idle"] / 2**20,
        "client_rss_storm_mib": raw["rss_storm"] / 2**20,
        "threads_per_host": raw["threads"] / len(hosts),
    }
    before, idle, storm = raw["mem_before"], raw["mem_idle"], raw["mem_storm"]
    conns = max(raw["connections"], 1)
    def allocated(m):
        return storm_broker.allocated({k: v for k, v in m.items() if k != "os_rss"})
    f["broker_kib_per_host"] = (allocated(idle) - allocated(before)) / len(hosts) / 1024
    f["broker_kib_per_connection"] = sum(
        idle[k] - before[k] for k in storm_broker.CONNECTIONS) / conns / 1024
    f["broker_queue_kib_per_host"] = sum(
        idle[k] - before[k] for k in storm_broker.QUEUES) / len(hosts) / 1024
    f["broker_rss_kib_per_host"] = (idle["os_rss"] - before["os_rss"]) / len(hosts) / 1024
    f["broker_rss_after_storm_kib_per_host"] = (storm["os_rss"] - before["os_rss"]
                                                ) / len(hosts) / 1024
    delta = {k: (idle[k] - before[k]) / 2**20 for k in idle
             if k not in ("reserved_unallocated", "allocated_unused", "os_rss")}
    f["broker_idle_delta_mib"] = dict(sorted(
        ((k, round(v, 1)) for k, v in delta.items() if abs(v) >= 0.5),
        key=lambda kv: -abs(kv[1])))
    f["broker_after_storm_kib_per_host"] = (allocated(storm) - allocated(before)
                                            ) / len(hosts) / 1024
    return f


def _stats(samples):
    if not samples:
        return None
    ms = [s * 1e3 for s in samples]
    return {"n": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "max": max(ms)}


@dataclass
class Parties:
    """What carries the events in one run: the compute and network sides
    (for storm_load), the middle's (label, pid)s, and its figures after."""
    compute: tuple
    network: tuple
    services: list
    figures: Callable[[], dict]


@contextlib.contextmanager
def evrouter_parties(broker, hosts, lifecycle, name="storm"):
    """The central topology under a prefix of its own and two router
    processes; on the way out, every queue and exchange of it is deleted."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    topo = topology.Topology(prefix=prefix)
    # Heartbeats off: this connection idles for minutes while the load runs.
    setup = bus_connection.connection(broker.url, heartbeat=0)
    bus_connection.connect_once(setup)
    topology.declare(setup.channel(), *topo.central())
    spool = tempfile.mkdtemp(prefix=f"{name}-spool-")
    routers = []

    def figures():
        metrics = {key: sum(r.metric(f"evrouter_router_{key}_total") or 0 for r in routers)
                   for key in ("events_in", "events_out", "retries", "lifecycle_events")}
        try:
            dead = _depth(setup, topo.dead_letter_queue_name)
        except Exception as exc:     # a figure lost, not the run
            dead = f"unknown ({type(exc).__name__})"
        return {"router_metrics": metrics, "dead_letters": dead,
                "router_rss_mib": [r.rss_mib() for r in routers]}
    try:
        for _ in range(2):
            routers.append(StormRouter(prefix, broker.url))
        yield Parties(
            ("tests.bench.bench_storm:EvrouterCompute",
             {"url": broker.url, "prefix": prefix, "lifecycle": lifecycle}),
            ("tests.bench.bench_storm:EvrouterNetwork",
             {"url": broker.url, "prefix": prefix, "spool_dir": spool,
              "warm_host": hosts[0]}),
            [(f"router{i + 1}", r.proc.pid) for i, r in enumerate(routers)], figures)
    finally:
        for r in routers:
            r.stop()
        _delete(setup, topo, hosts)
        shutil.rmtree(spool, ignore_errors=True)


def storm_phase(name, parties, args, broker, hosts, boots, profiler):
    """One storm over `parties` (evrouter_parties or reference_parties); raw figures."""
    with parties as these, storm_load.Storm(
            these.compute, these.network, hosts, boots, workers=args.workers,
            timeout=args.timeout, callers=args.callers, plug_delay=args.plug_delay) as storm:
        raw = run_phase(name, args, broker, storm, these.services, profiler)
        raw.update(these.figures())
        return raw


def _depth(conn, queue):
    return conn.channel().queue_declare(queue, passive=True).message_count


def _delete(conn, topo, hosts):
    """Every queue and exchange of the storm's topology; the broker is left clean."""
    exchanges, queues = topo.central()
    try:
        ch = conn.channel()
    except Exception:
        conn = conn.clone()          # it was closed under us: a fresh one
        bus_connection.connect_once(conn)
        ch = conn.channel()
    for q in [q.name for q in queues] + [topo.host_queue_name(h) for h in hosts]:
        ch.queue_delete(q)
    for e in [e.name for e in exchanges] + [topo.host_exchange_name(h) for h in hosts]:
        ch.exchange_delete(e)
    conn.release()


@contextlib.contextmanager
def reference_parties(broker, placement, name="storm"):
    """The reference's vhost of its own and its relay process (placement:
    server uuid -> host, the compute API's database); the vhost is deleted
    on the way out, and everything in it with it."""
    import multiprocessing

    from tests.bench import storm_reference
    vhost = storm_broker.Vhost(broker.node, f"{name}-ref-{uuid.uuid4().hex[:8]}")
    url = broker.url.rstrip("/") + "/" + vhost.name
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    relay = ctx.Process(target=storm_reference.relay_process, daemon=True,
                        args=(url, placement, child))
    try:
        relay.start()
        if not parent.poll(120):
            raise RuntimeError("the reference's relay did not start")
        parent.recv()
        yield Parties(
            ("tests.bench.storm_reference:OsloCompute", {"url": url}),
            ("tests.bench.storm_reference:OsloNetwork", {"url": url}),
            [("relay", relay.pid)],
            lambda: {"relay_rss_mib": psutil.Process(relay.pid).memory_info().rss / 2**20})
    finally:
        if relay.is_alive():
            parent.send(("stop",))
            relay.join(60)
            if relay.is_alive():
                relay.kill()
        vhost.delete()


# --- the report -------------------------------------------------------------------

def _lat(s):
    if s is None:
        return "none"
    return f"p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, max {s['max']:.1f} ms (n={s['n']})"


def report(name, f, raw):
    ok = f["woken"] == f["waiters"] and f["arrived"] == f["events"] and not f["timeouts"]
    lines = [
        f"{name}:",
        f"  waits woken: {f['arrived']:,} of {f['events']:,} events reached their prepared "
        f"wait ({f['held']} before their prepare), {f['woken']:,} of {f['waiters']:,} "
        f"waiters woken, {f['timeouts']} timeouts -> {'OK' if ok else 'FAILED'}",
        f"  publish -> event at its wait: {_lat(f['event_ms'])}",
        f"    with host hint {_lat(f['hinted_ms'])}; without {_lat(f['hintless_ms'])}",
        f"  last event published -> waiter running: {_lat(f['waiter_ms'])}",
        f"  network publish call (handed over -> accepted): {_lat(f['publish_call_ms'])}",
        f"  storm: {f['storm_s']:.2f} s from the first boot to the last waiter woken; "
        f"events published over {f['publishing_s']:.2f} s; "
        f"{f['throughput']:,.0f} events/s first publish -> last arrival",
        f"  CPU per event: middle (routers / relay) {f['service_cpu_us']:.0f} us, broker "
        f"{f['broker_cpu_us']:.0f} us ({f['broker_cpu_us_above_idle']:.0f} us above its "
        f"idle), network side {f['network_cpu_us']:.0f} us",
        f"  cores busy from go to the last waiter ({f['window_s']:.1f} s): machine "
        f"{f['machine_cores']:.2f} of {os.cpu_count()} (anyone's), broker "
        f"{f['broker_cores']:.2f}, middle {f['service_cores']:.2f}, compute workers "
        f"{f['compute_cores']:.2f}, network {f['network_cores']:.2f}",
        f"  cores busy with the hosts up and idle: broker {f['idle_cores']['broker']:.2f}, "
        f"compute workers {f['idle_cores']['compute']:.2f}, middle "
        f"{f['idle_cores']['services']:.2f}",
        f"  broker resident memory (OS) per host: {f['broker_rss_kib_per_host']:.0f} KiB "
        f"idle, {f['broker_rss_after_storm_kib_per_host']:.0f} KiB after the storm",
        f"  broker memory per host, as RabbitMQ accounts it: "
        f"{f['broker_kib_per_host']:.0f} KiB idle (queues "
        f"{f['broker_queue_kib_per_host']:.0f} KiB), {f['broker_after_storm_kib_per_host']:.0f}"
        f" KiB after the storm; per connection {f['broker_kib_per_connection']:.0f} KiB "
        f"({f['connections']:,} connections)",
        "    broker memory with the hosts up, by category (MiB): " + ", ".join(
            f"{k} {v:+.1f}" for k, v in f["broker_idle_delta_mib"].items()),
        f"  client memory per host: {f['client_kib_per_host']:.0f} KiB "
        f"(workers' RSS {f['client_rss_mib']:.0f} MiB idle, {f['client_rss_storm_mib']:.0f} "
        f"MiB after the storm), {f['threads_per_host']:.1f} threads per host; hosts up in "
        f"{f['startup_s']:.1f} s",
    ]
    if "router_metrics" in raw:
        m = raw["router_metrics"]
        lines.append(f"  routers: in {m['events_in']:.0f}, out {m['events_out']:.0f}, "
                     f"retried (no placement yet) {m['retries']:.0f}, lifecycle seen "
                     f"{m['lifecycle_events']:.0f}; RSS "
                     + ", ".join(f"{r:.0f} MiB" for r in raw["router_rss_mib"])
                     + f"; dead-lettered {raw['dead_letters']}")
    if raw["alarms"]:
        lines.append(f"  broker alarms after the storm: {raw['alarms']}")
    if "relay_rss_mib" in raw:
        lines.append(f"  relay RSS {raw['relay_rss_mib']:.0f} MiB")
    for what in ("failures", "publish_errors"):
        if f[what]:
            lines.append(f"  {what}: {f[what]}")
    return ok, lines


RATIOS = "reference / evrouter (above 1: evrouter is faster or cheaper):"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def latency_ratio(label, key, ev, ref):
    """'label: p50 r, p99 r' of two runs' latency figures `key`."""
    ev, ref = ev[key] or {}, ref[key] or {}
    return (f"  {label}: " + ", ".join(f"{p} {ratio(ref.get(p), ev.get(p))}"
                                       for p in ("p50", "p99")))


def ratios(ev, ref):
    r = ratio
    return [
        RATIOS,
        latency_ratio("publish -> event at its wait", "event_ms", ev, ref),
        latency_ratio("publish -> waiter running", "waiter_ms", ev, ref),
        f"  throughput evrouter / reference: {r(ev['throughput'], ref['throughput'])}",
        f"  broker CPU per event: {r(ref['broker_cpu_us'], ev['broker_cpu_us'])}; broker "
        f"resident memory per host: "
        f"{r(ref['broker_rss_kib_per_host'], ev['broker_rss_kib_per_host'])}; "
        f"client memory per host: {r(ref['client_kib_per_host'], ev['client_kib_per_host'])}",
    ]


def arguments(prog, *, timeout, callers):
    """The options every load over live hosts has (storm, sustained)."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=timeout,
                   help="each waiter's timeout (a timeout fails the run)")
    p.add_argument("--workers", type=int, default=8, help="compute host processes")
    p.add_argument("--callers", type=int, default=callers,
                   help="network side threads calling the publisher")
    storm_broker.add_arguments(p, auto=True)
    p.add_argument("--skip", action="append", default=[],
                   choices=["evrouter", "reference"])
    p.add_argument("--json", metavar="FILE", help="write the figures there")
    return p


def main(argv=None):
    p = arguments("python -m tests.bench storm", timeout=120.0, callers=16)
    p.add_argument("--instances", type=int, default=2000)
    p.add_argument("--spread", type=float, default=5.0,
                   help="seconds over which the instances start")
    p.add_argument("--plug-delay", type=float, default=0.5,
                   help="seconds from a boot's start to its ports' transitions")
    p.add_argument("--lifecycle", choices=("blocking", "outbox"), default="blocking",
                   help="each host's lifecycle publisher: a BlockingPublisher called "
                        "by the booting thread, or the agent's LifecyclePublisher "
                        "thread with an Outbox (see the module doc)")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy record of the routers/relay, a compute worker and "
                        "the network side into DIR")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy")
    args = p.parse_args(argv)
    storm_load.raise_fd_limit()
    hosts = [f"cmp-{i:04d}" for i in range(args.hosts)]
    boots = storm_load.plan(hosts, args.instances, args.spread)
    print(f"boot storm: {args.hosts:,} hosts, {args.instances:,} instances x 2 ports over "
          f"{args.spread:g} s, {args.workers} compute processes; {os.cpu_count()} cores, "
          f"Python {sys.version.split()[0]}", flush=True)
    lifecycle = ("BlockingPublisher called by the booting thread" if args.lifecycle
                 == "blocking" else "LifecyclePublisher thread + Outbox")
    print(f"each evrouter host: HostConsumer -> its InstanceEvents on one connection, "
          f"lifecycle events from a {lifecycle} on another; each reference host: one "
          f"oslo.messaging RPC server -> its InstanceEvents", flush=True)
    profiler = None
    if args.profile:
        if not os.access(args.py_spy, os.X_OK):
            raise SystemExit(f"--profile needs py-spy ({args.py_spy} not found): "
                             f"pip install py-spy")
        profiler = Profiler(args.profile, args.py_spy)
    results, ok = {}, True
    with storm_broker.chosen(args.broker, needed=2 * args.hosts + 20,
                             conf=args.broker_conf) as broker:
        for name, parties in (
                ("evrouter", lambda: evrouter_parties(broker, hosts, args.lifecycle)),
                ("reference", lambda: reference_parties(
                    broker, {b.server: b.host for b in boots}))):
            if name in args.skip:
                continue
            raw = storm_phase(name, parties(), args, broker, hosts, boots, profiler)
            results[name] = figures(raw, boots, hosts)
            passed, lines = report(
                "evrouter" if name == "evrouter" else
                "reference (oslo.messaging: notification -> relay -> RPC cast "
                "to compute.<host>)", results[name], raw)
            ok = ok and (passed or name == "reference")
            show(lines, results, args.json)
        if len(results) == 2:
            print("\n".join(ratios(results["evrouter"], results["reference"])))
        if profiler is not None:
            print("profile (py-spy --gil, 50 Hz: where each process spends its "
                  "Python CPU, inclusive):")
            print("\n".join(profiler.summary()))
            print("\n".join(profiler.broker_summary()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
