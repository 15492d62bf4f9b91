"""What the lifecycle agent's functional tests share.

A listener bound to the lifecycle fanout on the real broker, an agent on
its own thread, domains on libvirt's test driver, and a TCP proxy in front
of the broker that a test can cut (nameko's way to fault-test connections).
"""

import collections
import socket
import threading
import time
import uuid

import kombu
import libvirt

from compute import libvirt_watch
from compute.agent import AgentSettings, LifecycleAgent
from router.bus import contract, topology
from tests.conftest import wait_for

HOST = "compute-1"      # the agent's host name unless a test says otherwise


class FanoutListener:
    """A private queue on the lifecycle fanout; decoded envelopes, in order."""

    def __init__(self, bus):
        exchange = bus.topology.lifecycle_exchange()
        bus.own(exchanges=[exchange.name])
        self.conn = kombu.Connection(bus.url)
        self.conn.connect()
        queue = kombu.Queue(f"{bus.prefix}.listener.{uuid.uuid4().hex[:8]}",
                            exchange, durable=False, exclusive=True,
                            auto_delete=True)
        self.received = []          # (arrival monotonic time, Envelope)
        self._consumer = kombu.Consumer(self.conn.channel(), [queue],
                                        no_ack=True,
                                        on_message=self._on_message)
        self._consumer.consume()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True,
                                        name="fanout-listener")
        self._thread.start()

    def _on_message(self, message):
        body = message.body
        if type(body) is str:
            body = body.encode()
        self.received.append((time.monotonic(), contract.decode(body)))

    def _drain(self):
        while not self._stop.is_set():
            try:
                self.conn.drain_events(timeout=0.1)
            except socket.timeout:
                pass

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.conn.release()

    # --- reading what arrived ---------------------------------------------
    def envelopes(self):
        return [env for _, env in list(self.received)]

    def events(self, instance_uuid=None, *, snapshot=False):
        """Lifecycle event payloads, in order."""
        return [e.payload for e in self.envelopes()
                if e.kind == contract.LIFECYCLE_EVENT
                and e.payload.snapshot is snapshot
                and instance_uuid in (None, e.payload.instance_uuid)]

    def transitions(self, instance_uuid):
        return [p.transition for p in self.events(instance_uuid)]

    def wait_transitions(self, instance_uuid, expected, timeout=10):
        """Wait until the domain's transitions start with `expected`."""
        wait_for(lambda: self.transitions(instance_uuid)[:len(expected)]
                 == expected or len(self.transitions(instance_uuid))
                 > len(expected), timeout,
                 what=f"transitions {expected} of {instance_uuid}")
        assert self.transitions(instance_uuid) == expected

    def arrival(self, instance_uuid, transition, nth=1):
        """When the nth `transition` of the domain arrived (monotonic)."""
        times = [t for t, e in list(self.received)
                 if e.kind == contract.LIFECYCLE_EVENT
                 and not e.payload.snapshot
                 and e.payload.instance_uuid == instance_uuid
                 and e.payload.transition == transition]
        return times[nth - 1]

    def snapshots(self):
        """HostSnapshot payloads, in order."""
        return [e.payload for e in self.envelopes()
                if e.kind == contract.HOST_SNAPSHOT]

    def wait_snapshot(self, instance_uuid, after=0, timeout=15):
        """The domain's entry in the first snapshot after envelope `after`
        that lists it: (host, transition, seq of the snapshot)."""
        def entry():
            for env in self.envelopes()[after:]:
                p = env.payload
                if env.kind == contract.HOST_SNAPSHOT:
                    for uid, transition in p.instances:
                        if uid == instance_uuid:
                            return SnapshotEntry(p.host, transition, p.seq)
            return None
        return wait_for(entry, timeout, what=f"a snapshot of {instance_uuid}")


class SnapshotEntry(collections.namedtuple("SnapshotEntry",
                                           "host transition seq")):
    """One domain as a host snapshot reported it."""


class RunningAgent:
    """A LifecycleAgent on its own thread, publishing to a Bus's topology."""

    def __init__(self, bus, *, url=None, opener=None, declare=True,
                 **settings):
        settings.setdefault("reconnect_max", 0.2)
        if declare:
            # The central exchanges the agent needs; in a deployment
            # `evrouter topology --declare` makes them (an agent's user
            # may not).
            exchanges = [bus.topology.lifecycle_exchange(),
                         bus.topology.control_exchange()]
            topology.declare(bus.channel(), exchanges, [])
            bus.own(exchanges=[e.name for e in exchanges])
        self.agent = LifecycleAgent(AgentSettings(
            transport_url=url or bus.url, topology=bus.topology, **settings),
            opener=opener)
        self.thread = threading.Thread(target=self.agent.run, daemon=True,
                                       name=f"agent-{settings['host']}")
        self.thread.start()

    def wait_healthy(self, healthy=True, timeout=15):
        wait_for(lambda: self.agent.healthy is healthy, timeout,
                 what=f"agent healthy={healthy} ({self.agent.health})")

    def stop(self, timeout=30):
        self.agent.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "agent did not stop"


def domain_xml(name, domain_uuid=None):
    """A domain for libvirt's test driver."""
    uuid_element = f"<uuid>{domain_uuid}</uuid>" if domain_uuid else ""
    return (f"<domain type='test'><name>{name}</name>{uuid_element}"
            f"<memory unit='MiB'>32</memory><os><type>hvm</type></os>"
            f"</domain>")


def remove_domain(dom):
    """Destroy and undefine, whatever state the domain is in."""
    import libvirt
    for undo in (dom.destroy, dom.undefine):
        try:
            undo()
        except libvirt.libvirtError:
            pass


class Driver:
    """Domains on a test-driver connection, removed at teardown."""

    def __init__(self, uri="test:///default"):
        libvirt_watch.start_event_loop()
        self.conn = libvirt.open(uri)
        self.made = []

    def define(self, domain_uuid=None):
        dom = self.conn.defineXML(domain_xml(
            f"evt-{uuid.uuid4().hex[:10]}", domain_uuid))
        self.made.append(dom)
        return dom

    def close(self):
        for dom in self.made:
            remove_domain(dom)
        self.conn.close()


class TcpProxy:
    """127.0.0.1:port → upstream. cut() drops every connection and refuses
    new ones until restore(): the broker, as far as the client can tell,
    is gone. half_open() drops only the clients' side: the broker, as far
    as it can tell, still has them."""

    def __init__(self, upstream=("127.0.0.1", 5672)):
        self.upstream = upstream
        self._lock = threading.Lock()
        self._sockets = []
        self._orphans = set()       # broker sides left open by half_open()
        self._threads = []
        self.port = None
        self.accepted = []      # monotonic time of each client connection
        self._listen()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _listen(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port or 0))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def _spawn(self, target, *args):
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name="tcp-proxy")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener):
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                self._spawn(self._pump, a, b)

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data or src in self._orphans or dst in self._orphans:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                if s in self._orphans:
                    continue        # left open, unread, on purpose
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def half_open(self):
        """Drop the client side of every connection, leave the broker side
        open and unread: a client that vanished without a FIN (a crashed
        host, a NAT that forgot the flow). To the broker that connection
        and its consumers live on until its heartbeat timeout; the client
        sees the connection die and connects again, through this proxy."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
            # accept() makes (client, server) pairs in this order
            clients, servers = sockets[0::2], sockets[1::2]
            self._orphans.update(servers)
        for s in clients:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self):
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.drop()

    def drop(self):
        """Drop every connection, and keep accepting new ones."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self):
        self._listen()

    def close(self):
        """Everything down, half-open connections too; threads joined."""
        self.cut()
        with self._lock:
            orphans, self._orphans = self._orphans, set()
            threads = list(self._threads)
        for s in orphans:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for thread in threads:
            thread.join(5)
