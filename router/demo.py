"""`evrouter demo`: the whole story in one process, then a timeline.

Two compute hosts (each a libvirt test-driver hypervisor, a lifecycle agent,
a waiter registry fed by its host consumer), the router, and a network side
that publishes port-status changes. Instances boot the OpenStack way
(created paused, VIF plugged, wait for network-vif-plugged, resume); then a
reboot (no STOPPED leaves the host) and a migration (the router's placement
follows the domain, so an event without a host hint finds it).

With no --transport-url it runs on kombu's in-process memory transport;
with one it runs the same over RabbitMQ, under a prefix of its own that it
deletes afterwards. Over RabbitMQ every part writes the journal of hops
(router/journal.py, the stream <prefix>.journal), and the demo ends with
vm-1's timeline from it, as `evrouter trace` prints it; --keep-journal
leaves the stream (and its exchange) for `evrouter trace` to read after.
"""

import contextlib
import dataclasses
import logging
import sys
import tempfile
import threading
import time
import uuid

import kombu
from oslo_config import cfg

from router import journal, options, routing, trace_cmd
from router.bus import connection as bus_connection
from router.bus import contract, topology
from router.service_entry import fail, parse

HOSTS = ("cmp-a", "cmp-b")

cli_opts = [
    cfg.IntOpt("instances", default=3, min=1, max=20,
               help="Instances to boot (spread over the two hosts)."),
    options.FloatOpt("stopped-delay", default=1.0, min=0.1,
                 help="Seconds the agents hold a STOPPED back (15 in production)."),
    cfg.BoolOpt("keep-journal", default=False,
                help="Over RabbitMQ: leave the journal stream <prefix>.journal "
                     "and its exchange when the demo ends, for `evrouter "
                     "trace --bus-prefix <prefix>` (the rest is deleted)."),
]


class Timeline:
    """What happened, when, who said so; printed live and summed up at the end."""

    def __init__(self, out=sys.stdout):
        self.start = time.monotonic()
        self.out = out
        self.lines = []
        self._lock = threading.Lock()

    def say(self, who, what):
        t = (time.monotonic() - self.start) * 1000
        with self._lock:
            self.lines.append((t, who, what))
            print(f"  {t:8.1f} ms  {who:<10} {what}", file=self.out, flush=True)

    def step(self, n, total, what):
        with self._lock:
            bar = "#" * n + "." * (total - n)
            print(f"[{bar}] step {n}/{total}: {what}", file=self.out, flush=True)


class Host:
    """One compute host: hypervisor, lifecycle agent, waiter registry."""

    def __init__(self, name, url, topo, node_file, timeline, stopped_delay, latencies,
                 journal_settings=None):
        import libvirt

        from compute import libvirt_watch
        from compute.agent import AgentSettings, LifecycleAgent
        from compute.events import InstanceEvents
        from compute.host_consumer import HostConsumer, HostConsumerSettings
        self.name = name
        self.timeline = timeline
        libvirt_watch.start_event_loop()
        # each open of a test:///<file> URI is a hypervisor of its own
        self.libvirt = libvirt.open(f"test://{node_file}")
        self.registry = InstanceEvents()
        self._latencies = latencies

        def deliver(event, message_id):
            outcome = self.registry.deliver(event, message_id)
            latencies.woken(name, event)
            timeline.say(name, f"waiter: {event.name} ({event.status}) for "
                               f"{event.server_uuid[:8]} port {event.tag} -> {outcome} "
                               f"(msg {message_id[:8]})")
            return outcome
        self.consumer = HostConsumer(HostConsumerSettings(
            host=name, transport_url=url, topology=topo, journal=journal_settings),
            deliver)
        self.agent = LifecycleAgent(AgentSettings(
            host=name, libvirt_uri=f"test://{node_file}", transport_url=url,
            topology=topo, stopped_delay=stopped_delay, reconnect_max=1.0),
            opener=lambda _uri: self.libvirt)
        self.threads = [threading.Thread(target=t.run, daemon=True, name=f"{what}-{name}")
                        for what, t in (("consumer", self.consumer), ("agent", self.agent))]
        for t in self.threads:
            t.start()

    def ready(self):
        return self.consumer.ready.is_set() and self.agent.healthy

    def stop(self):
        self.consumer.stop()
        self.agent.stop()
        for t in self.threads:
            t.join(15)


class NetworkSide:
    """What the network service does: port status changes, published at once."""

    def __init__(self, url, topo, timeline, latencies, journal_settings=None):
        from network.publisher import InstanceEventPublisher, PublisherSettings
        self.publisher = InstanceEventPublisher(PublisherSettings(
            transport_url=url, topology=topo, producer="demo-network",
            journal=journal_settings)).start()
        self.timeline = timeline
        self.latencies = latencies

    def set_status(self, port, previous, current):
        from network import transitions
        for event in transitions.status_changed(port, previous, current):
            self._publish(event, f"port {port['id']} {previous} -> {current}")
        port["status"] = current

    def address_changed(self, port):
        from network import transitions
        old = dict(port, fixed_ips=[])
        for event in transitions.port_updated(old, port):
            if event.name == contract.NETWORK_CHANGED:
                # no host hint: the router's placement decides
                self._publish(dataclasses.replace(event, host=None),
                              f"port {port['id']} addresses changed")

    def later(self, delay, fn, *args):
        t = threading.Timer(delay, fn, args)
        t.daemon = True
        t.start()
        return t

    def _publish(self, event, why):
        self.timeline.say("network", f"{why}: publishing {event.name} {event.status} "
                                     f"(host hint {event.host or '-'})")
        self.latencies.sent(event.key, time.monotonic())
        self.publisher.publish(event)   # returns once the broker confirmed

    def close(self):
        self.publisher.close()


class Latencies:
    """Publish -> waiter times, by event key (the waiter may run before the
    publisher's confirm returns)."""

    def __init__(self):
        self._sent, self.rows = {}, []

    def sent(self, key, at):
        self._sent[key] = at

    def woken(self, host, event):
        at = self._sent.pop(event.key, None)
        if at is not None:
            self.rows.append((event.name, event.server_uuid[:8], host,
                              (time.monotonic() - at) * 1000))


def _port(server, host):
    return {"id": f"port-{server[:8]}", "device_id": server, "device_owner": "compute:nova",
            "binding:host_id": host, "status": "DOWN",
            "fixed_ips": [{"ip_address": "10.0.0.%d" % (int(server[:2], 16) % 250 + 2)}]}


def _domain_xml(name, server):
    return (f"<domain type='test'><name>{name}</name><uuid>{server}</uuid>"
            f"<memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>")


def boot(host, network, timeline, name, server):
    """Nova's way: create paused, plug, wait for network-vif-plugged, resume."""
    port = _port(server, host.name)
    with host.registry.wait_for_instance_event(
            server, [(contract.VIF_PLUGGED, port["id"])], deadline=30):
        dom = host.libvirt.defineXML(_domain_xml(name, server))
        dom.create()
        dom.suspend()
        timeline.say(host.name, f"{name} created paused, VIF {port['id']} plugged; waiting "
                                f"for network-vif-plugged")
        # the network side's agent wires the port a little later
        network.later(0.05, network.set_status, port, "DOWN", "ACTIVE")
    dom.resume()
    timeline.say(host.name, f"{name} resumed: network-vif-plugged received")
    return dom, port


def _wait(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise RuntimeError(f"demo: timed out waiting for {what}")
        time.sleep(0.01)


# The demo's journal: small, and short-lived if kept (--keep-journal).
DEMO_JOURNAL = {"max_bytes": 8 << 20, "max_age": "1h", "segment_bytes": 1 << 20,
                "batch_seconds": 0.05}


def run(url, instances, stopped_delay, out=sys.stdout, keep_journal=False):
    from router.service import RouterService, RouterSettings
    timeline = Timeline(out)
    latencies = Latencies()
    topo = topology.Topology(prefix=f"demo-{uuid.uuid4().hex[:8]}")
    memory = url.startswith("memory://")
    # the journal is a RabbitMQ stream: none on the memory transport
    journal_settings = None if memory else journal.JournalSettings(
        transport_url=url, prefix=topo.prefix, **DEMO_JOURNAL)
    print(f"evrouter demo on {'memory:// (in-process)' if memory else url}: router, "
          f"hosts {', '.join(HOSTS)} (libvirt test driver), network side; "
          f"topology prefix {topo.prefix}"
          + ("" if memory else f", journal {journal.stream_name(topo.prefix)}"),
          file=out)
    traced = None
    total = 5
    with contextlib.ExitStack() as stack:
        setup = bus_connection.connect_once(bus_connection.connection(url))
        stack.callback(setup.release)
        topology.declare(setup.channel(), *topo.central())
        if not memory:
            stack.callback(_delete, setup, topo, keep_journal)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        timeline.step(1, total, "start the router, two compute hosts, the network side")
        # Every part of the demo is one broker user (one trusted process):
        # that user speaks for both hosts' lifecycle.
        one_user = frozenset({bus_connection.user_of(setup)} - {None})
        router = RouterService(RouterSettings(
            transport_url=url, topology=topo, name="demo-router",
            policy=routing.Policy(lifecycle_trusted_users=one_user),
            journal=journal_settings))
        rt = threading.Thread(target=router.run, daemon=True, name="router")
        rt.start()
        stack.callback(rt.join, 15)
        stack.callback(router.stop)
        hosts = {}
        for name in HOSTS:
            node = f"{tmp}/{name}.xml"
            with open(node, "w") as f:
                f.write("<node/>")
            hosts[name] = Host(name, url, topo, node, timeline, stopped_delay, latencies,
                               journal_settings)
            stack.callback(hosts[name].stop)
        lifecycle = _LifecycleWatch(url, topo, timeline)
        stack.callback(lifecycle.close)
        network = NetworkSide(url, topo, timeline, latencies, journal_settings)
        stack.callback(network.close)
        _wait(lambda: router.ready.is_set() and all(h.ready() for h in hosts.values()),
              30, "every part to connect")
        timeline.say("demo", "all parts connected")

        timeline.step(2, total, f"boot {instances} instance(s) the OpenStack way")
        booted = []
        for i in range(instances):
            host = hosts[HOSTS[i % 2]]
            server = str(uuid.uuid4())
            dom, port = boot(host, network, timeline, f"vm-{i + 1}", server)
            booted.append((host, dom, port, server))
        placement = router.placement
        _wait(lambda: all(placement.hosts_for(s) == (h.name,) for h, _, _, s in booted),
              10, "the router to learn where every instance runs")
        timeline.say("router", "placement: " + ", ".join(
            f"{s[:8]}@{placement.hosts_for(s)[0]}" for _, _, _, s in booted))

        timeline.step(3, total, "reboot vm-1 (destroy + create within the STOPPED delay)")
        host, dom, port, server = booted[0]
        seen_before = lifecycle.count(server, "STOPPED")
        dom.destroy()
        dom.create()
        timeline.say(host.name, "vm-1 destroyed and created again")
        time.sleep(stopped_delay + 0.5)     # let a STOPPED show, if one were coming
        stopped = lifecycle.count(server, "STOPPED") - seen_before
        timeline.say("demo", f"STOPPED events on the fanout during the reboot: {stopped} "
                             f"(held {stopped_delay:.1f}s and cancelled by STARTED)")

        timeline.step(4, total, "migrate vm-1 from cmp-a to cmp-b")
        target = hosts["cmp-b"]
        moved = target.libvirt.defineXML(_domain_xml("vm-1", server))
        moved.create()
        _wait(lambda: set(placement.hosts_for(server)) == {"cmp-a", "cmp-b"}, 10,
              "placement on both hosts")
        timeline.say("router", f"placement of vm-1 during the migration: "
                               f"{', '.join(placement.hosts_for(server))}")
        dom.destroy()
        dom.undefine()
        _wait(lambda: placement.hosts_for(server) == ("cmp-b",), stopped_delay + 10,
              "placement on cmp-b only")
        timeline.say("router", "placement of vm-1 after the migration: cmp-b")

        timeline.step(5, total, "an address change on vm-1's port, with no host hint")
        port["fixed_ips"] = [{"ip_address": "10.0.0.99"}]
        with target.registry.wait_for_instance_event(
                server, [(contract.NETWORK_CHANGED, port["id"])], deadline=30):
            network.address_changed(port)
        timeline.say("cmp-b", "network-changed for vm-1 reached its new host")
        for _, other, _, _ in booted[1:]:
            other.destroy()
        if journal_settings is not None:
            traced = _trace(url, topo.prefix, server, [
                router.journal, network.publisher.journal,
                *(h.consumer.journal for h in hosts.values())])

    print("\nper-event latency, network publish -> waiter woken:", file=out)
    print(f"  {'event':<22} {'instance':<9} {'host':<6} {'ms':>7}", file=out)
    for name, inst, host, ms in latencies.rows:
        print(f"  {name:<22} {inst:<9} {host:<6} {ms:7.1f}", file=out)
    if latencies.rows:
        ordered = sorted(r[3] for r in latencies.rows)
        print(f"  median {ordered[len(ordered) // 2]:.1f} ms over {len(ordered)} events",
              file=out)
    if traced is None:
        print("\nthe journal: off on memory:// (it is a RabbitMQ stream; run the demo "
              "with --transport-url to see `evrouter trace`)", file=out)
        return 0
    server, lines = traced
    name = journal.stream_name(topo.prefix)
    print(f"\nthe journal ({name}): every hop of vm-1's events, as "
          f"`evrouter trace {server}` prints them:", file=out)
    for line in lines:
        print(f"  {line}", file=out)
    if keep_journal:
        print(f"kept {name} (stream and exchange): evrouter trace ID --bus-prefix "
              f"{topo.prefix} --transport-url {url}; rabbitmqctl delete_queue {name} "
              f"removes the stream", file=out)
    return 0


def _trace(url, prefix, server, journals):
    """(server, lines): every hop of the instance's events in the journal,
    once each part's journal wrote what it recorded."""
    for j in journals:
        if not j.flushed(10):
            raise RuntimeError(f"demo: journal {j.service} not written in 10s")
    found, stats = trace_cmd.read(url, prefix, server, 600, timeout=10)
    lines = [trace_cmd.format_record(rec) for rec in found]
    lines.append(f"# {len(found)} hop(s) for {server}; {stats['records']} record(s) "
                 f"decoded from {stats['messages']} message(s) in {stats['seconds']:.2f}s")
    return server, lines


class _LifecycleWatch:
    """A listener on the lifecycle fanout, feeding the timeline."""

    def __init__(self, url, topo, timeline):
        self.timeline = timeline
        self.seen = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, topo), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def count(self, server, transition):
        return sum(1 for p in list(self.seen) if getattr(p, "instance_uuid", None) == server
                   and p.transition == transition and not p.snapshot)

    def _run(self, url, topo):
        conn = bus_connection.connect_once(bus_connection.connection(url))
        queue = kombu.Queue(exclusive=True, auto_delete=True,
                            exchange=topo.lifecycle_exchange())
        with kombu.Consumer(conn.channel(), [queue], on_message=self._on_message,
                            no_ack=True):
            self._ready.set()
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=0.1)
                except TimeoutError:
                    pass
        conn.release()

    def _on_message(self, message):
        env = contract.decode(message.body)
        p = env.payload
        self.seen.append(p)
        if type(p) is contract.LifecycleEvent and not p.snapshot:
            self.timeline.say(f"agent {p.host[-1]}", f"lifecycle {p.transition} of "
                                                    f"{p.instance_uuid[:8]} (seq {p.seq})")

    def close(self):
        self._stop.set()
        self._thread.join(5)


def _delete(conn, topo, keep_journal=False):
    exchanges, queues = topo.central()
    ch = conn.channel()
    journal_ = [] if keep_journal else [journal.stream_name(topo.prefix)]
    for q in [q.name for q in queues] + [topo.host_queue_name(h) for h in HOSTS] + journal_:
        ch.queue_delete(q)
    for e in [e.name for e in exchanges] + [topo.host_exchange_name(h) for h in HOSTS] \
            + journal_:
        ch.exchange_delete(e)


def main(argv):
    conf = parse(argv, "evrouter demo",
                 "Run the whole story in one process and print its timeline: "
                 "boots the OpenStack way, a reboot, a migration.",
                 cli_opts=cli_opts, defaults={"transport_url": "memory://"})
    if not conf.debug:
        # the timeline is the output; warnings and errors still show
        logging.getLogger().setLevel(logging.WARNING)
    try:
        return run(conf.transport_url, conf.instances, conf.stopped_delay,
                   keep_journal=conf.keep_journal)
    except (RuntimeError, OSError, trace_cmd.TraceError) as exc:
        return fail(str(exc), 1)
