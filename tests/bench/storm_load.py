"""The boot storm's load, whatever carries the events: hosts, boots, the network side.

A *compute side* (evrouter's, or the oslo.messaging reference's) is a
class, named "module:Class" so that a spawned process can build it, with
``start_host(host, deliver) -> handle``; a handle has ``ready()``,
``lifecycle(server, transition)``, ``stop()`` (begins) and ``join()``. Every host gets its own
waiter registry (compute.events.InstanceEvents), fed through ``deliver``.
A *network side* has ``warm()``, ``publish(server, port, hint)`` (blocks
until the event is accepted) and ``close()``.

The storm is the same for both: instance i boots on host i mod H at
``t0 + spread * i / instances``. Its boot prepares both
``network-vif-plugged`` waits in one ``wait_for_instance_event`` (as Nova
does), and in the body its host reports the guest STARTED and PAUSED; once
woken, RESUMED. The network side publishes each port's transition
``plug_delay`` after the boot started (the L2 agent seeing the tap device),
every other instance without a host hint.

Each process records wall-clock times (same machine, one clock): when each
event was handed to the publisher, when it reached its prepared wait, when
each waiting thread ran again.

The processes serve other loads over the same hosts too: host_worker runs
any job on a schedule (the boot is one), network_worker any list of events
(tests/bench/bench_sustained.py's steady stream is the other load).
"""

import functools
import importlib
import multiprocessing
import queue
import resource
import threading
import time
import uuid
from dataclasses import dataclass

import psutil

from compute import waiting
from compute.events import DELIVERED, HELD, InstanceEvents
from router.bus import contract


@dataclass(frozen=True)
class Boot:
    index: int
    server: str
    host: str
    ports: tuple
    at: float           # seconds after t0

    @property
    def hint(self):
        """Every other instance's events carry no host hint."""
        return self.host if self.index % 2 == 0 else None


def plan(hosts, instances, spread, ports=2):
    return [Boot(i, str(uuid.uuid4()), hosts[i % len(hosts)],
                 tuple(str(uuid.uuid4()) for _ in range(ports)),
                 spread * i / instances)
            for i in range(instances)]


def raise_fd_limit(wanted=None):
    """Soft fd limit up to the hard one (or `wanted`); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else min(max(soft, wanted), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def resolve(spec):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def usage(pid=None):
    """(RSS bytes, CPU seconds user+system, threads) of a process."""
    p = psutil.Process(pid)
    cpu = p.cpu_times()
    return p.memory_info().rss, cpu.user + cpu.system, p.num_threads()


def sleep_until(when):
    pause = when - time.time()
    if pause > 0:
        time.sleep(pause)


def _recorder(registry, arrivals):
    """deliver() for the host consumer / endpoint: the registry's, timed."""
    def deliver(event, message_id):
        outcome = registry.deliver(event, message_id)
        if outcome in (DELIVERED, HELD):
            arrivals[(event.server_uuid, event.tag)] = (time.time(), outcome)
        return outcome
    return deliver


# --- a process of compute hosts ------------------------------------------------

_BATCH = 25


def host_worker(side_spec, side_args, hosts, job, schedule, conn):
    """Runs `hosts`, each with its own registry; at the parent's go, for
    each (seconds after go, item) of `schedule`, ``job(registries, handles,
    item)`` on a thread of its own; reports the jobs' results back."""
    raise_fd_limit()
    rss_empty = usage()[0]
    side = resolve(side_spec)(**side_args)
    arrivals, registries, handles = {}, {}, {}
    deadline = time.monotonic() + 300
    for i, host in enumerate(hosts):
        registries[host] = InstanceEvents()
        handles[host] = side.start_host(host, _recorder(registries[host], arrivals))
        # Hosts come up a batch at a time: thousands of connects at once
        # would overflow the broker's listen backlog (128) and the load
        # would begin with SYN retries instead of with events.
        if i % _BATCH == _BATCH - 1 or i == len(hosts) - 1:
            while not all(h.ready() for h in handles.values()):
                if time.monotonic() > deadline:
                    conn.send(("failed", f"{sum(not h.ready() for h in handles.values())}"
                                          f" host(s) not ready after 300 s"))
                    return
                time.sleep(0.05)
    conn.send(("ready", rss_empty, usage()))
    _, t0 = conn.recv()
    results = []

    def run(item):
        results.append(job(registries, handles, item))

    threads = []
    for at, item in schedule:
        sleep_until(t0 + at)
        t = threading.Thread(target=run, args=(item,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    conn.send(("done", results, arrivals, usage()))
    conn.recv()                             # stop
    for handle in handles.values():     # all at once, then wait for each
        handle.stop()
    for handle in handles.values():
        handle.join()
    conn.send(("stopped",))


def boot(timeout, registries, handles, b):
    """One boot (a host_worker job): (index, started, woken, outcome)."""
    registry, handle = registries[b.host], handles[b.host]
    started, woken, outcome = time.time(), None, "woken"
    try:
        with registry.wait_for_instance_event(
                b.server, [(contract.VIF_PLUGGED, p) for p in b.ports],
                timeout=timeout):
            # The work that causes the events: the guest is created paused.
            handle.lifecycle(b.server, "STARTED")
            handle.lifecycle(b.server, "PAUSED")
        woken = time.time()
        handle.lifecycle(b.server, "RESUMED")
    except waiting.InstanceEventTimeout:
        outcome = "timeout"
    except Exception as exc:   # reported, not raised: the count must add up
        outcome = f"{type(exc).__name__}: {exc}"
    return b.index, started, woken, outcome


# --- the network side --------------------------------------------------------------

def network_worker(side_spec, side_args, events, conn, callers):
    """Publishes `events`, (seconds after t0, server, port, hint) in order,
    on schedule from `callers` threads (a network service's workers);
    reports when each was handed over and accepted."""
    raise_fd_limit()
    side = resolve(side_spec)(**side_args)
    side.warm()
    conn.send(("ready", usage()))
    _, t0 = conn.recv()
    work = queue.Queue()
    published, errors = {}, []

    def caller():
        while (item := work.get()) is not None:
            server, port, hint = item
            t = time.time()
            try:
                side.publish(server, port, hint)
            except Exception as exc:
                errors.append(f"{server} {port}: {type(exc).__name__}: {exc}")
                continue
            published[(server, port)] = (t, time.time())

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    for at, server, port, hint in events:
        sleep_until(t0 + at)
        work.put((server, port, hint))
    for _ in threads:
        work.put(None)
    for t in threads:
        t.join()
    conn.send(("done", published, errors, usage()))
    conn.recv()
    side.close()
    conn.send(("stopped",))


# --- the parent's side ----------------------------------------------------------------

class Load:
    """Compute worker processes and one network process, driven by the parent.

    Each worker (host_worker) runs a share of the hosts and `job` (a
    module-level function, or a partial of one: it is pickled) over
    `schedule(share)`; the network process publishes `events`
    (network_worker).
    """

    def __init__(self, compute, network, hosts, events, *, workers, job, schedule,
                 callers):
        ctx = multiprocessing.get_context("spawn")
        self.hosts = hosts
        self.compute = []
        for w in range(min(workers, len(hosts))):
            mine = hosts[w::workers]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=host_worker, daemon=True, args=(
                compute[0], compute[1], mine, job, schedule(mine), child))
            self.compute.append((proc, parent))
        parent, child = ctx.Pipe()
        self.network = (ctx.Process(target=network_worker, daemon=True, args=(
            network[0], network[1], events, child, callers)), parent)

    @property
    def pids(self):
        return [p.pid for p, _ in self.compute], self.network[0].pid

    def start(self, timeout=600):
        """Start every process; (compute ready reports, network's)."""
        for proc, _ in self.compute:
            proc.start()
        ready = [self._recv(conn, timeout) for _, conn in self.compute]
        # After the hosts: the network side's warm-up event goes to one.
        self.network[0].start()
        return ready, self._recv(self.network[1], timeout)

    def go(self, lead=1.0):
        t0 = time.time() + lead
        for _, conn in self.compute + [self.network]:
            conn.send(("go", t0))
        return t0

    def wait_done(self, timeout):
        compute = [self._recv(conn, timeout) for _, conn in self.compute]
        return compute, self._recv(self.network[1], timeout)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Interrupted or failed: the workers are still running their jobs
        # and would read "stop" only after the last one; do not wait for them.
        self.stop(90 if exc_type is None else 5)

    def stop(self, patience=90):
        """Every process at once; any still there after `patience` s is killed."""
        everyone = self.compute + [self.network]
        for proc, conn in everyone:
            if proc.is_alive():
                try:
                    conn.send(("stop",))
                except OSError:
                    pass
        deadline = time.monotonic() + patience
        for proc, _ in everyone:
            if proc.pid is not None:
                proc.join(max(0.1, deadline - time.monotonic()))
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)

    @staticmethod
    def _recv(conn, timeout):
        if not conn.poll(timeout):
            raise RuntimeError(f"no word from a storm process in {timeout:.0f} s")
        msg = conn.recv()
        if msg[0] == "failed":
            raise RuntimeError(msg[1])
        return msg[1:]


class Storm(Load):
    """The boot storm: `boots` over compute_worker processes."""

    def __init__(self, compute, network, hosts, boots, *, workers, timeout,
                 callers, plug_delay):
        self.boots = boots

        def schedule(mine):
            owned = set(mine)
            return sorted(((b.at, b) for b in boots if b.host in owned),
                          key=lambda x: x[0])
        events = sorted((b.at + plug_delay, b.server, p, b.hint)
                        for b in boots for p in b.ports)
        super().__init__(compute, network, hosts, events, workers=workers,
                         job=functools.partial(boot, timeout), schedule=schedule,
                         callers=callers)
