"""AMQP operations per event on the router's connection (issue 22, item 3).
Not a test.

    python -m tests.bench.broker_ops [--events N]

A RouterService runs in this process (as tests/bench/router_cpu.py's) and
every AMQP method its connection sends or receives is counted by name
(py-amqp's frame writer and inbound dispatch, wrapped); a publisher process
sends the events. Three cases, each on a topology of its own:

- one-host: each event hinted to a host whose queue is bound;
- two-hosts: hinted to one host, placed on another (a live migration);
- no-queue: hinted to a host with no queue (returned, decided again after
  a tier: counted until every event was dead-lettered unknown-host, with
  no_host_timeout 2 s and tiers of 0.2 s; never while placement warms up,
  the first resync_window, 5 s, after the router connected).

What the broker does per event beside these (from the topology): each
persistent message is written once per durable queue it lands in (the
ingress message in the router queue, each host copy in its host queue), and
removed when acknowledged. --syscalls counts what that costs in system
calls: strace -c attached to every thread of the broker's beam.smp for the
measured window (fsync and fdatasync, the writes), on a node of its own
(tests/bench/storm_broker.py) so that nobody else's traffic is counted.
strace slows the broker down; the counts, not the rates, are the figure.
"""

import argparse
import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid

import amqp
import kombu
from amqp import spec

from router import service as service_mod
from router.bus import contract, topology
from router.bus import transport as buffered
from router.routing import Policy
from tests.bench import router_cpu, storm_broker
from tests.bench.bench_storm import _delete
from tests.bench.router_cpu import publish, until

URL = router_cpu.URL
HOST = "127.0.0.1:5672"
SYSCALLS = "fsync,fdatasync,write,pwrite64,writev,pwritev"

NAMES = {}
for _cls in ("Connection", "Channel", "Exchange", "Queue", "Basic", "Confirm", "Tx"):
    for _name, _sig in vars(getattr(spec, _cls)).items():
        if isinstance(_sig, tuple) and len(_sig) == 2:
            NAMES[_sig] = f"{_cls.lower()}.{_name.lower()}"


class Counts:
    """Methods by name, each way, for connections made in this process."""

    def __init__(self):
        self.sent = collections.Counter()
        self.framed_here = False
        self.received = collections.Counter()
        real_writer = amqp.Connection.frame_writer      # a property
        real_inbound = amqp.Connection.on_inbound_method
        counts = self
        wrapped = {}

        def frame_writer(connection):
            write = real_writer.fget(connection)
            counted = wrapped.get(id(write))
            if counted is None or counted[0] is not write:
                def count(type_, channel, method_sig, *args, **kwargs):
                    if not counts.framed_here:
                        counts.sent[NAMES.get(method_sig, str(method_sig))] += 1
                    return write(type_, channel, method_sig, *args, **kwargs)
                counted = wrapped[id(write)] = (write, count)
            return counted[1]

        def on_inbound_method(self, channel_id, method_sig, payload, content):
            counts.received[NAMES.get(method_sig, str(method_sig))] += 1
            return real_inbound(self, channel_id, method_sig, payload, content)
        amqp.Connection.frame_writer = property(frame_writer, real_writer.fset)
        amqp.Connection.on_inbound_method = on_inbound_method
        # The router's publishes are framed by router.bus.transport itself,
        # not by py-amqp's frame writer: counted there.
        real_publish = buffered.publish

        def publish(*args, **kwargs):
            counts.sent["basic.publish"] += 1
            counts.framed_here = True   # its py-amqp fallback is not counted again
            try:
                return real_publish(*args, **kwargs)
            finally:
                counts.framed_here = False
        buffered.publish = publish

    def snapshot(self):
        return collections.Counter(self.sent), collections.Counter(self.received)


def _bodies(n, hint, server=None):
    return [contract.encode(contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, server or str(uuid.uuid4()), "port", host=hint),
        "bench")) for _ in range(n)]


@contextlib.contextmanager
def syscalls(pid, into):
    """strace -c on every thread of `pid` while inside; `into` gets
    {syscall: calls} once it has detached."""
    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    with tempfile.NamedTemporaryFile(mode="r", suffix=".strace") as out:
        args = ["strace", "-c", "-e", f"trace={SYSCALLS}", "-o", out.name]
        for tid in tids:
            args += ["-p", str(tid)]
        proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
        time.sleep(1.0)         # attached to each thread before the load
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            into.update(_summary(out.read()))


def _summary(text):
    """strace -c's table: {syscall: calls}."""
    calls = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] in SYSCALLS.split(","):
            calls[fields[-1]] = int(fields[3])
    return calls


def run(case, n, counts, broker=None):
    topo = topology.Topology(prefix=f"ops-{uuid.uuid4().hex[:8]}",
                             retry_delays_ms=(200,))
    conn = kombu.Connection(URL)
    ch = conn.channel()
    topology.declare(ch, *topo.central())
    hosts = ["ops-a", "ops-b"] if case == "two-hosts" else ["ops-a"]
    if case != "no-queue":
        for host in hosts:
            topology.declare(conn.channel(), *topo.for_host(host))
    svc = service_mod.RouterService(service_mod.RouterSettings(
        transport_url=URL, topology=topo, name="ops",
        policy=Policy(lifecycle_trusted_users=frozenset({"guest"}),
                      no_host_timeout=2.0)))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        until(svc.ready.is_set, 30)
        server = None
        if case == "two-hosts":
            server = str(uuid.uuid4())
            env = contract.envelope(contract.LifecycleEvent(
                server, "ops-b", "STARTED", 0, 0, 1), "bench")
            kombu.Producer(conn.channel()).publish(
                contract.encode(env), exchange=topo.lifecycle_exchange_name,
                routing_key="", user_id="guest", message_id=env.id)
            until(lambda: svc.placement.hosts_for(server) == ("ops-b",), 10)
        time.sleep(0.5)
        calls = {}
        watching = (syscalls(broker.process.pid, calls) if broker is not None
                    else contextlib.nullcontext())
        with watching:
            before = counts.snapshot()
            key = topology.instance_routing_key(contract.VIF_PLUGGED)
            proc = multiprocessing.Process(target=publish, args=(
                topo.ingress_exchange_name, key, _bodies(n, "ops-a", server)),
                kwargs={"host": HOST})
            proc.start()
            if case == "no-queue":
                until(lambda: svc.stats["dead_lettered:unknown-host"] >= n, 300)
            else:
                until(lambda: svc.stats["out"] >= n * len(hosts), 300)
            time.sleep(0.5)      # the last acknowledgements leave
            after = counts.snapshot()
            if broker is not None:
                # what the broker writes after the acknowledgements
                time.sleep(2.0)
        proc.join(30)
    finally:
        svc.stop()
        thread.join(30)
        _delete(conn, topo, hosts)
    sent = after[0] - before[0]
    received = after[1] - before[1]
    stats = dict(svc.stats)
    return sent, received, stats, calls


def _per(counter, k):
    return ", ".join(f"{name} {v / k:.2f}" for name, v in sorted(counter.items())
                     if v / k >= 0.005)


def main(argv=None):
    p = argparse.ArgumentParser(prog="broker_ops")
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--syscalls", action="store_true",
                   help="also count the broker's fsyncs and writes per event "
                        "(strace, on a RabbitMQ node of its own)")
    p.add_argument("--case", action="append",
                   choices=("one-host", "two-hosts", "no-queue"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if not args.syscalls:
        return report(args, None)
    global URL, HOST
    with storm_broker.chosen("dedicated", name="evrouter-ops", port=5698) as broker:
        URL = f"amqp://guest:guest@127.0.0.1:{broker.port}//"
        HOST = f"127.0.0.1:{broker.port}"
        return report(args, broker)


def report(args, broker):
    counts = Counts()
    n = args.events
    print(f"AMQP methods per event on the router's connection ({n} events a case)")
    for case in args.case or ("one-host", "two-hosts", "no-queue"):
        k = n if case != "no-queue" else n // 10
        sent, received, stats, calls = run(case, k, counts, broker)
        print(f"{case}: sent: {_per(sent, k)}")
        print(f"{' ' * len(case)}  received: {_per(received, k)}")
        print(f"{' ' * len(case)}  router: in {stats.get('in', 0)}, out "
              f"{stats.get('out', 0)}, returned {stats.get('returned', 0)}, "
              f"retried {stats.get('retried', 0)}, dead-lettered "
              f"{stats.get('dead_lettered:unknown-host', 0)}")
        if broker is not None:
            print(f"{' ' * len(case)}  broker system calls: {_per(calls, k)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
