"""Router CPU per event, in process: the router thread's own CPU clock.

    PYTHONPATH=<checkout>[:tenacity] python tests/bench/router_cpu.py [--events N]
        [--mode stream|prefill] [--profile out.prof]

A RouterService runs in a thread of this process against the shared broker,
on a topology of its own (deleted afterwards). Its thread CPU time
(pthread_getcpuclockid) is read once the router consumes and again once
every event's host copy was confirmed and every ingress message acked.
stream: a publisher process (plain py-amqp, pipelined confirms, user_id
set) publishes while the router routes, as tests/bench/bench_router.py
does; flat out, or --rate events/s (each event then arrives alone: the
cost of a steady load, where nothing is batched). prefill: the ingress
queue is filled first, then the router starts.
The collector is tuned as `evrouter router` tunes it (--default-gc: not).
--profile: cProfile enabled inside the router thread for the measured
window only (switched at its next drain), stats dumped to the file.

On a shared 2-core VM, alternating runs of two checkouts vary by +-10%;
running them at the same time (same noise) and comparing each pair's ratio
varies by about +-2%:

    (PYTHONPATH=$A python tests/bench/router_cpu.py > a.txt &
     PYTHONPATH=$B python tests/bench/router_cpu.py > b.txt; wait)
"""

import argparse
import cProfile
import gc
import multiprocessing
import sys
import threading
import time
import uuid

import amqp
import kombu

from router import main as router_main
from router import service as service_mod
from router.bus import connection as bus_connection
from router.bus import contract, topology

URL = "amqp://guest:guest@127.0.0.1:5672//"
HOST = "cpu-host"


def bodies(n):
    return [contract.encode(contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.UUID(int=i + 1)), "port", host=HOST),
        "bench")) for i in range(n)]


def publish(exchange, key, payloads, rate=None, host="127.0.0.1:5672"):
    conn = amqp.Connection(host, userid="guest", password="guest")
    conn.connect()
    ch = conn.channel()
    ch.confirm_select()
    acked = [0]

    def on_ack(tag, multiple):
        acked[0] = tag
    ch.events["basic_ack"].add(on_ack)
    start = time.monotonic()
    for i, body in enumerate(payloads):
        if rate:            # paced: each event alone, as in a steady load
            pause = start + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        msg = amqp.Message(body, content_type="application/json",
                           delivery_mode=2, user_id="guest",
                           message_id=uuid.uuid4().hex)
        ch.basic_publish(msg, exchange=exchange, routing_key=key)
        if rate or i % 256 == 255:
            while True:
                try:
                    conn.drain_events(timeout=0)
                except Exception:
                    break
    while acked[0] < len(payloads):
        conn.drain_events(timeout=10)
    conn.close()


class Hook:
    """Switch cProfile on/off inside the router thread, at its next drain."""

    def __init__(self, profile):
        self.profile = profile
        self.want = False
        self.on = False
        real = bus_connection.drain

        def drain(conn, timeout, *a, **kw):
            if self.profile is not None and self.want != self.on:
                (self.profile.enable if self.want else self.profile.disable)()
                self.on = self.want
            return real(conn, timeout, *a, **kw)
        bus_connection.drain = drain


def until(pred, timeout, interval=0.02):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError("condition not reached")
        time.sleep(interval)


def run(n, mode, profile_path, gc_tuning=True, rate=None):
    topo = topology.Topology(prefix=f"cpu-{uuid.uuid4().hex[:8]}")
    conn = kombu.Connection(URL)
    ch = conn.channel()
    topology.declare(ch, *topo.central())
    topology.declare(ch, *topo.for_host(HOST))
    payloads = bodies(n)
    key = topology.instance_routing_key(contract.VIF_PLUGGED)
    prof = cProfile.Profile() if profile_path else None
    hook = Hook(prof)
    svc = service_mod.RouterService(service_mod.RouterSettings(
        transport_url=URL, topology=topo, name="cpu"))
    try:
        if mode == "prefill":
            publish(topo.ingress_exchange_name, key, payloads)
        t = threading.Thread(target=svc.run, daemon=True)
        t.start()
        until(svc.ready.is_set, 30)
        if gc_tuning and hasattr(router_main, "tune_collector"):
            router_main.tune_collector()    # as `evrouter router` does
        time.sleep(0.3)
        clock = time.pthread_getcpuclockid(t.ident)
        hook.want = True
        time.sleep(0.3)      # the router's next drain switches profiling on
        gcs = {"t": 0.0, "n": 0, "s": 0.0}

        def on_gc(phase, info):
            if threading.get_ident() != t.ident:
                return
            if phase == "start":
                gcs["s"] = time.clock_gettime(clock)
            else:
                gcs["t"] += time.clock_gettime(clock) - gcs["s"]
                gcs["n"] += 1
        gc.callbacks.append(on_gc)
        c0, ticks0 = time.clock_gettime(clock), _ticks(t.native_id)
        done0 = svc.stats["out"]     # prefill: the router has started already
        w0 = time.monotonic()
        if mode == "stream":
            proc = multiprocessing.Process(
                target=publish, args=(topo.ingress_exchange_name, key, payloads, rate))
            proc.start()
        until(lambda: svc.stats["out"] >= n, 600, 0.01)
        c1, ticks1 = time.clock_gettime(clock), _ticks(t.native_id)
        gc.callbacks.remove(on_gc)
        wall = time.monotonic() - w0
        hook.want = False
        time.sleep(0.6)
        if mode == "stream":
            proc.join(30)
        svc.stop()
        t.join(30)
    finally:
        ex, qs = topo.central()
        ch = conn.channel()
        for q in [q.name for q in qs] + [topo.host_queue_name(HOST)]:
            ch.queue_delete(q)
        for e in [e.name for e in ex] + [topo.host_exchange_name(HOST)]:
            ch.exchange_delete(e)
        conn.release()
    if prof is not None:
        prof.dump_stats(profile_path)
    us = (c1 - c0) / (n - done0) * 1e6
    print(f"{mode} n={n}: router thread CPU {us:.1f} us/event, "
          f"wall {wall:.2f}s ({n / wall:,.0f}/s), stats in={svc.stats['in']} "
          f"out={svc.stats['out']} measured {n - done0}; gc in the router thread "
          f"{gcs['t'] / (n - done0) * 1e6:.1f} us/event ({gcs['n']} collections); "
          f"user/system {_share(ticks0, ticks1)}", flush=True)
    return us


def _ticks(native_id):
    """(user, system) clock ticks of a thread of this process (/proc)."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _share(before, after):
    user, system = (b - a for a, b in zip(before, after, strict=True))
    return f"{user}/{system} ticks" if user + system else "-"


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--mode", choices=["stream", "prefill"], default="stream")
    p.add_argument("--profile")
    p.add_argument("--rate", type=float,
                   help="stream: publish at this many events/s (default: flat out)")
    p.add_argument("--default-gc", action="store_true",
                   help="leave the collector as Python sets it (the router "
                        "process tunes it: router.main.tune_collector)")
    a = p.parse_args()
    sys.exit(0 if run(a.events, a.mode, a.profile, not a.default_gc, a.rate) else 1)
