"""TLS benchmark: the hot path with and without TLS, same node, same run.

    python -m tests.bench.bench_tls [--events 20000] [--latency-events 2000]

Runs on the TLS node of tests/tls (tls1@localhost: plain AMQP on 5694,
AMQPS on 5695; started here and stopped afterwards unless it was already
running), so plain and TLS share one broker and differ only in the wire.

1. Throughput end to end, as bench_router's first figure: a publisher
   process with pipelined confirms -> ingress -> one router process -> host
   queue -> host consumer and waiter registry in this process. Best of 2
   alternating rounds per mode.
2. Latency at a paced 200 events/s, publish -> waiter resolved, p50 / p99.

Modes: plain TCP (evrouter's buffered transport); TLS with evrouter's
buffered TLS reads (what services use); TLS with py-amqp's own per-frame
TLS reads (to tell whether the buffering is worth keeping). Figures are
printed as ratios to plain, measured in the same run.
"""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import kombu

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import connection as bus_connection
from router.bus import contract, topology
from router.bus import transport as bus_transport
from router.bus.publishing import ConfirmedPublisher
from tests.bench.bench_router import _drain, _until, bodies, free_port, pct, uuids

SCRIPT = Path(__file__).parents[1] / "tls" / "rabbitmq-tls.sh"
PLAIN_URL = "rabbit://guest:guest@localhost:5694/"
TLS_URL = "rabbit://guest:guest@localhost:5695/"
KEY = topology.instance_routing_key(contract.VIF_PLUGGED)
HOST = "tls-bench-host"

# How the router subprocess runs with py-amqp's unbuffered TLS reads.
_UNBUFFERED = ("import sys, router.bus.transport as t; "
               "t._Connection.SSLTransport = t.VerifiedSSLTransport; "
               "from router.cli import main; sys.exit(main(sys.argv[1:]))")


class Mode:
    def __init__(self, name, url, tls, buffered=True):
        self.name, self.url, self.tls, self.buffered = name, url, tls, buffered

    def use(self):
        """Select this mode's TLS reads in this process (and its forks)."""
        bus_transport._Connection.SSLTransport = (
            bus_transport.BufferedSSLTransport if self.buffered
            else bus_transport.VerifiedSSLTransport)

    def flags(self):
        if not self.tls:
            return []
        return ["--bus-ssl", "--bus-ssl_ca_file", self.tls.ca_file]


def _script(*args):
    return subprocess.run(["bash", str(SCRIPT), *args], check=True,
                          capture_output=True, text=True, timeout=180).stdout


class Router:
    def __init__(self, mode, prefix):
        self.port = free_port()
        code = ["-m", "router.cli"] if mode.buffered else ["-c", _UNBUFFERED]
        self.proc = subprocess.Popen(
            [sys.executable, *code, "router", "--transport-url", mode.url,
             *mode.flags(), "--bus-prefix", prefix,
             "--router-ops_listen", f"127.0.0.1:{self.port}",
             "--bus-host_message_ttl", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _until(self.consuming, 60)

    def consuming(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                        timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Slice:
    """A topology under its own prefix on the node (set up over plain AMQP)."""

    def __init__(self):
        self.topo = topology.Topology(prefix=f"bench-tls-{uuid.uuid4().hex[:8]}")
        self.conn = kombu.Connection("amqp://guest:guest@127.0.0.1:5694//")
        topology.declare(self.conn.channel(), *self.topo.central())
        topology.declare(self.conn.channel(), *self.topo.for_host(HOST))

    def cleanup(self):
        ex, qs = self.topo.central()
        hex_, hqs = self.topo.for_host(HOST)
        ch = self.conn.channel()
        for q in qs + hqs:
            ch.queue_delete(q.name)
        for e in ex + hex_:
            ch.exchange_delete(e.name)
        self.conn.release()


def _consumer(mode, sl, deliver):
    consumer = HostConsumer(HostConsumerSettings(
        host=HOST, transport_url=mode.url, topology=sl.topo, prefetch=512,
        ssl=mode.tls), deliver)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    if not consumer.ready.wait(20):
        raise RuntimeError(f"host consumer ({mode.name}): {consumer.health()}")
    return consumer, thread


def _publish_process(mode, exchange, payloads):
    import multiprocessing

    def run():
        conn = bus_connection.connection(mode.url, ssl_opts=mode.tls)
        with bus_connection.connect_once(conn):
            outcomes = []
            pub = ConfirmedPublisher(conn.channel(), lambda t, o: outcomes.append(o),
                                     user_id=bus_connection.user_of(conn))
            for i, body in enumerate(payloads):
                pub.publish(exchange, KEY, body, i)
                if i % 256 == 255:
                    _drain(conn)
            while len(outcomes) < len(payloads):
                conn.drain_events(timeout=10)
    proc = multiprocessing.Process(target=run, daemon=True)
    proc.start()
    return proc


def rate(mode, n):
    mode.use()
    sl = Slice()
    router = Router(mode, sl.topo.prefix)
    registry = InstanceEvents(max_seen_ids=n * 2)
    servers = uuids(n)
    for s in servers:
        registry.prepare(s, contract.VIF_PLUGGED, "port")
    consumer, thread = _consumer(mode, sl, registry.deliver)
    try:
        start = time.monotonic()
        pub = _publish_process(mode, sl.topo.ingress_exchange_name,
                               bodies(servers, [HOST]))
        _until(lambda: consumer.stats["delivered"] >= n, 300, 0.01)
        result = n / (time.monotonic() - start)
        pub.join(10)
    finally:
        consumer.stop()
        thread.join(10)
        router.stop()
        sl.cleanup()
    return result


def latency(mode, n, per_second=200):
    mode.use()
    sl = Slice()
    router = Router(mode, sl.topo.prefix)
    registry = InstanceEvents()
    sent, woken = {}, {}

    def timed(event, message_id):
        outcome = registry.deliver(event, message_id)
        woken[message_id] = time.time()
        return outcome
    servers = uuids(n)
    for s in servers:
        registry.prepare(s, contract.VIF_PLUGGED, "port")
    consumer, thread = _consumer(mode, sl, timed)
    envs = [contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, s, "port", host=HOST), "bench") for s in servers]
    try:
        conn = bus_connection.connection(mode.url, ssl_opts=mode.tls)
        with bus_connection.connect_once(conn):
            pub = ConfirmedPublisher(conn.channel(), lambda t, o: None,
                                     user_id=bus_connection.user_of(conn))
            start = time.monotonic()
            for i, env in enumerate(envs):
                pause = start + i / per_second - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent[env.id] = time.time()
                pub.publish(sl.topo.ingress_exchange_name, KEY, contract.encode(env), i,
                            message_id=env.id)
                _drain(conn)
            _until(lambda: len(woken) >= n, 60, 0.05)
    finally:
        consumer.stop()
        thread.join(10)
        router.stop()
        sl.cleanup()
    samples = [(woken[k] - sent[k]) * 1000 for k in sent]
    return pct(samples, 0.5), pct(samples, 0.99)


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_tls")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--latency-events", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    running = "down" not in _script("status")
    _script("start")
    try:
        ca = str(Path(_script("dir").strip()) / "certs" / "ca.pem")
        tls = bus_connection.ssl_options(True, ca)
        modes = [Mode("plain", PLAIN_URL, False),
                 Mode("TLS", TLS_URL, tls),
                 Mode("TLS, py-amqp reads", TLS_URL, tls, buffered=False)]
        print(f"evrouter TLS benchmark: {os.cpu_count()} cores, Python "
              f"{sys.version.split()[0]}, one RabbitMQ node for every mode "
              f"(tls1@localhost)", flush=True)
        best = {m.name: 0.0 for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                best[m.name] = max(best[m.name], rate(m, args.events))
        plain = best["plain"]
        print(f"1. throughput end to end ({args.events} events, best of "
              f"{args.rounds}):", flush=True)
        for m in modes:
            print(f"   {m.name:20s} {best[m.name]:8,.0f} events/s  ratio to plain "
                  f"{best[m.name] / plain:.2f}")
        print(f"2. latency at 200 events/s ({args.latency_events} events), publish "
              f"-> waiter:", flush=True)
        lat = {m.name: latency(m, args.latency_events) for m in modes}
        for m in modes:
            p50, p99 = lat[m.name]
            print(f"   {m.name:20s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
                  f"p99 ratio to plain {p99 / lat['plain'][1]:.2f}", flush=True)
    finally:
        if not running:
            _script("stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
