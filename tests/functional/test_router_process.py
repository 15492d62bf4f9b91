"""The router as operators run it: a process, killed or stopped mid-stream."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import kombu

from router.bus import contract, topology
from router.bus.publishing import ConfirmedPublisher
from tests.conftest import collect, wait_for

N = 3000


def start_router(bus, name, ops_listen="", extra=()):
    # Output to a file, not a pipe: nobody reads a pipe while the test runs,
    # and a router whose log fills the pipe's buffer blocks on its next line.
    with tempfile.NamedTemporaryFile(prefix=f"evrouter-{name}-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "router",
             "--transport-url", bus.url.replace("amqp://", "rabbit://"),
             "--bus-prefix", bus.prefix, "--router-name", name,
             "--router-prefetch", "200", "--router-ops_listen", ops_listen,
             # one broker user for every service here: it speaks for all hosts
             "--router-lifecycle_trusted_users", kombu.Connection(bus.url).userid,
             *extra],
            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log_path = log.name
    return proc


def consumers(bus):
    with kombu.Connection(bus.url) as conn:
        return conn.channel().queue_declare(
            bus.topology.router_queue_name, passive=True).consumer_count


def publish_pipelined(bus, envs):
    """Publish with pipelined confirms; returns once the broker confirmed all."""
    outcomes = []
    with kombu.Connection(bus.url) as conn:
        pub = ConfirmedPublisher(conn.channel(),
                                 lambda token, outcome: outcomes.append(outcome),
                                 user_id=conn.userid)
        for i, env in enumerate(envs):
            pub.publish(bus.topology.ingress_exchange_name,
                        topology.instance_routing_key(env.payload.name),
                        contract.encode(env), i, message_id=env.id)
            if i % 500 == 499:
                conn.drain_events(timeout=5)
        deadline = time.monotonic() + 60
        while len(outcomes) < len(envs) and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except socket.timeout:
                pass
    assert outcomes.count("ack") == len(envs), "the broker did not confirm every publish"


def publish_stream(bus, host, n):
    """Publish n events with pipelined confirms; return their ids in order."""
    envs = [contract.envelope(contract.InstanceEvent(
        "network-vif-plugged", "0f5d3c1e-2b1a-4c9e-8f00-%012d" % i, f"port-{i}",
        host=host), "stream") for i in range(n)]
    publish_pipelined(bus, envs)
    return [env.id for env in envs]


def stop(proc, sig=signal.SIGTERM, timeout=30):
    """Stop a process from start_router: (exit code, everything it printed)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    if not hasattr(proc, "log_path"):           # a process with a pipe
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    proc.wait(timeout)
    with open(proc.log_path) as f:
        out = f.read()
    os.unlink(proc.log_path)
    return proc.returncode, out


def test_kill_9_of_one_router_mid_stream_loses_nothing(bus):
    bus.declare_central()
    bus.declare_host("cmp-k")
    routers = [start_router(bus, "r1"), start_router(bus, "r2")]
    try:
        wait_for(lambda: consumers(bus) == 2, what="two routers consuming")
        host_q = bus.topology.host_queue_name("cmp-k")
        ids = publish_stream(bus, "cmp-k", N // 2)
        # kill one while messages are in flight through it
        wait_for(lambda: collect_depth(bus, host_q) > N // 8, what="stream flowing")
        routers[0].send_signal(signal.SIGKILL)
        ids += publish_stream(bus, "cmp-k", N // 2)
        got = collect(bus.url, host_q, N, timeout=60)
        # redeliveries may duplicate; the waiter deduplicates by message id
        received = [contract.decode(m.body).id for m in got]
        extra = collect(bus.url, host_q, N, timeout=2.0)
        received += [contract.decode(m.body).id for m in extra]
        lost = set(ids) - set(received)
        print(f"\nkill -9: sent={len(ids)} delivered={len(set(received))} "
              f"copies={len(received)} duplicates={len(received) - len(set(received))} "
              f"lost={len(lost)}")
        assert not lost
        # and the killed one, restarted, takes its share again
        routers[0] = start_router(bus, "r1-again")
        wait_for(lambda: consumers(bus) == 2, what="restarted router consuming")
    finally:
        for p in routers:
            stop(p, signal.SIGKILL)


def collect_depth(bus, queue):
    with kombu.Connection(bus.url) as conn:
        return conn.channel().queue_declare(queue, passive=True).message_count


def test_sigterm_finishes_in_flight_messages_and_exits_cleanly(bus):
    bus.declare_central()
    bus.declare_host("cmp-t")
    proc = start_router(bus, "r-term")
    try:
        wait_for(lambda: consumers(bus) == 1, what="router consuming")
        ids = publish_stream(bus, "cmp-t", 1000)
        wait_for(lambda: collect_depth(bus, bus.topology.host_queue_name("cmp-t")) > 100,
                 what="stream flowing")
        code, out = stop(proc, signal.SIGTERM)
        assert code == 0, out
        assert "stopped" in out
        # whatever it did not take stays in ingress, unacked ones went back
        with kombu.Connection(bus.url) as conn:
            left = conn.channel().queue_declare(
                bus.topology.router_queue_name, passive=True).message_count
        routed = collect(bus.url, bus.topology.host_queue_name("cmp-t"), 1000,
                         timeout=10)
        routed_ids = [contract.decode(m.body).id for m in routed]
        assert len(routed_ids) == len(set(routed_ids)), \
            "a clean stop must not duplicate: every routed message was acked"
        assert len(routed_ids) + left == len(ids)
    finally:
        if proc.poll() is None:
            stop(proc, signal.SIGKILL)


def test_cli_help_and_bad_options():
    out = subprocess.run([sys.executable, "-m", "router.cli", "router", "--help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "--router-no_host_timeout" in out.stdout and "--bus-queue_type" in out.stdout
    out = subprocess.run([sys.executable, "-m", "router.cli", "nonsense"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "unknown command" in out.stderr
    out = subprocess.run([sys.executable, "-m", "router.cli", "router",
                          "--bus-queue_type", "stream"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "queue_type" in out.stderr
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "router.cli", "topology",
                          "--bus-prefix", "shown", "--host", "cmp-9"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0
    assert "shown.host.cmp-9.events" in out.stdout


def test_topology_declare_is_idempotent(bus):
    cmd = [sys.executable, "-m", "router.cli", "topology", "--declare",
           "--transport-url", bus.url.replace("amqp://", "rabbit://"),
           "--bus-prefix", bus.prefix, "--host", "cmp-d"]
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    bus.own(exchanges=[bus.topology.host_exchange_name("cmp-d")],
            queues=[bus.topology.host_queue_name("cmp-d")])
    with kombu.Connection(bus.url) as conn:
        ch = conn.channel()
        for q in (bus.topology.router_queue_name, bus.topology.host_queue_name("cmp-d"),
                  bus.topology.dead_letter_queue_name):
            ch.queue_declare(q, passive=True)
    out = subprocess.run(cmd[:4] + ["--declare", "--transport-url",
                                    "rabbit://guest:guest@127.0.0.1:1/"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach the broker" in out.stderr
