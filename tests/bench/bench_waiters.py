"""Waiter benchmark: memory per pending event, wake-up latency. Not a test.

    python -m tests.bench.bench_waiters [--eventlet] [--pending 10000]
                                        [--samples 300] [--url amqp://...]

Memory (tracemalloc): what the library allocates for 10,000 pending events,
the caller's own strings (instance uuids, port ids) made beforehand and not
counted. Three shapes: bare prepares; one wait per event (each with its own
wake-up gate); waits of ten events.

Latency, on the real broker with 10,000 unrelated events pending: one waiter
at a time prepares, a publisher sends its event, and we time
- arrival → waiter running: from the host consumer handing the decoded event
  to the registry, to the waiting thread running after its wait;
- publish → waiter running: from just before the publish, straight to the
  host exchange and through the router.
With --eventlet the process is monkey-patched first, as OpenStack services are.
"""

import argparse
import sys


def parse(argv):
    p = argparse.ArgumentParser(prog="bench_waiters")
    p.add_argument("--eventlet", action="store_true",
                   help="monkey-patch with eventlet before anything else")
    p.add_argument("--pending", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672//")
    p.add_argument("--no-broker", action="store_true",
                   help="memory only")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.eventlet:
        # Nothing has imported threading or socket yet (imports are below).
        import eventlet
        eventlet.monkey_patch()
    mode = "eventlet (green threads)" if args.eventlet else "native threads"
    print(f"evrouter waiter benchmark, {mode}, Python {sys.version.split()[0]}")
    memory(args.pending)
    if not args.no_broker:
        latency(args)
    return 0


# --- memory ---------------------------------------------------------------------

def _measure(build, count):
    import gc
    import tracemalloc
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return (after - before) / count


def memory(pending):
    import uuid

    from compute.events import InstanceEvents
    from router.bus.contract import VIF_PLUGGED

    servers = [str(uuid.uuid4()) for _ in range(pending)]
    ports = [str(uuid.uuid4()) for _ in range(pending)]

    def bare():
        registry = InstanceEvents()
        for s, p in zip(servers, ports, strict=True):
            registry.prepare(s, VIF_PLUGGED, p)
        assert registry.pending == pending
        return registry

    pairs = [(VIF_PLUGGED, p) for p in ports]

    def waits(per_wait, blocked):
        def build():
            registry = InstanceEvents()
            kept = []
            for i in range(0, pending, per_wait):
                cm = registry.wait_for_instance_event(
                    servers[i], pairs[i:i + per_wait], 300)
                wait = cm.__enter__()   # prepared; the body would run now
                if blocked:
                    # What blocking in the wait adds: the wake-up gate.
                    with registry._lock:
                        wait._wake._arm()
                kept.append((cm, wait))
            assert registry.pending == pending
            return registry, kept
        return build

    print(f"\nmemory per pending event ({pending:,} pending, tracemalloc;"
          f" the caller's uuid and port strings not counted):")
    for label, build in [
            ("registry.prepare() only", bare),
            ("1-event waits, body running", waits(1, False)),
            ("1-event waits, blocked", waits(1, True)),
            ("10-event waits, blocked", waits(10, True))]:
        print(f"  {label:<30} {_measure(build, pending):8.0f} bytes")


# --- latency --------------------------------------------------------------------

def _percentiles(samples):
    ordered = sorted(samples)

    def at(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return f"p50 {at(0.50):7.3f} ms   p99 {at(0.99):7.3f} ms   max {ordered[-1] * 1e3:7.3f} ms"


def latency(args):
    import threading
    import time
    import uuid

    from compute.events import InstanceEvents
    from compute.host_consumer import HostConsumer, HostConsumerSettings
    from router.bus import connection, contract, publishing, topology
    from router.service import RouterService, RouterSettings

    topo = topology.Topology(prefix=f"bench-{uuid.uuid4().hex[:8]}")
    host = "bench-host"
    registry = InstanceEvents()
    for _ in range(args.pending):       # background load: never delivered
        registry.prepare(str(uuid.uuid4()), contract.VIF_PLUGGED, "idle")
    arrivals = {}

    def deliver(event, message_id):
        arrivals[message_id] = time.perf_counter()
        return registry.deliver(event, message_id)

    conn = connection.connection(args.url)
    conn.connect()
    ch = conn.channel()
    topology.declare(ch, *topo.central())
    topology.declare(ch, *topo.for_host(host))
    from router.routing import Policy
    router = RouterService(RouterSettings(
        transport_url=args.url, topology=topo,
        policy=Policy(lifecycle_trusted_users=frozenset({connection.user_of(conn)}))))
    consumer = HostConsumer(HostConsumerSettings(
        host=host, transport_url=args.url, topology=topo), deliver)
    threads = [threading.Thread(target=router.run, daemon=True),
               threading.Thread(target=consumer.run, daemon=True)]
    for t in threads:
        t.start()
    try:
        if not (router.ready.wait(15) and consumer.ready.wait(15)):
            raise SystemExit("router or consumer did not start")
        publisher = publishing.BlockingPublisher(conn, user_id=connection.user_of(conn))
        key = topology.instance_routing_key(contract.VIF_PLUGGED)
        print(f"\nwake-up latency ({args.samples} sequential events, "
              f"{registry.pending:,} other events pending):")
        for label, exchange in [("host exchange", topo.host_exchange_name(host)),
                                ("via the router", topo.ingress_exchange_name)]:
            to_wake, from_publish = _run(args.samples, registry, publisher,
                                         exchange, key, host, arrivals)
            print(f"  {label}:")
            print(f"    arrival -> waiter running   {_percentiles(to_wake)}")
            print(f"    publish -> waiter running   {_percentiles(from_publish)}")
    finally:
        consumer.stop()
        router.stop()
        for t in threads:
            t.join(15)
        for q in [topo.host_queue_name(host), topo.router_queue_name,
                  topo.dead_letter_queue_name,
                  *(topo.retry_queue_name(d) for d in topo.retry_delays_ms)]:
            conn.channel().queue_delete(q)
        for e in [topo.host_exchange_name(host), topo.ingress_exchange_name,
                  topo.lifecycle_exchange_name, topo.dead_letter_exchange_name]:
            conn.channel().exchange_delete(e)
        conn.release()


def _run(samples, registry, publisher, exchange, key, host, arrivals):
    import threading
    import time
    import uuid

    from router.bus import contract

    prepared = threading.Event()
    woken = []
    go = []

    def waiter():
        for server in go:
            with registry.wait_for_instance_event(
                    server, [(contract.VIF_PLUGGED, "port")], deadline=30):
                prepared.set()
            woken.append(time.perf_counter())

    go.extend(str(uuid.uuid4()) for _ in range(samples))
    thread = threading.Thread(target=waiter)
    thread.start()
    published, ids = [], []
    for server in go:
        if not prepared.wait(30):
            raise SystemExit("waiter did not prepare")
        prepared.clear()
        env = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, "port", host=host), "bench")
        ids.append(env.id)
        published.append(time.perf_counter())
        publisher.publish(exchange, key, contract.encode(env), message_id=env.id)
    thread.join(60)
    to_wake = [w - arrivals[i] for w, i in zip(woken, ids, strict=True)]
    from_publish = [w - p for w, p in zip(woken, published, strict=True)]
    return to_wake, from_publish


if __name__ == "__main__":
    sys.exit(main())
