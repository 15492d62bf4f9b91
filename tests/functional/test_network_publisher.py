"""The network publisher on the real broker, through the router.

Outages are made two ways without disturbing the broker other tests share:
a dead port (nothing listens on 127.0.0.1:1), and a TCP proxy in front of
RabbitMQ that this test stops and starts again, cutting live connections.
"""

import os
import re
import select
import socket
import threading
import time
import uuid

import pytest

from network.publisher import InstanceEventPublisher, PublisherSettings, PublishRefused
from network.spool import Spool
from router.bus import contract, tracecontext
from tests.conftest import BROKER_URL, collect, wait_for

HOST = "compute-7"
DEAD_URL = "amqp://guest:guest@127.0.0.1:1//"


def plugged(i, host=HOST):
    return contract.InstanceEvent(contract.VIF_PLUGGED, str(uuid.UUID(int=i + 1)),
                                  f"port-{i}", host=host)


def settings(bus, url=BROKER_URL, **kw):
    kw.setdefault("retry_for", 0.3)
    kw.setdefault("connect_timeout", 1.0)
    return PublisherSettings(transport_url=url, topology=bus.topology,
                             producer="network-test", **kw)


def host_events(bus, count, host=HOST, timeout=15.0):
    """Envelopes on the host's queue: `count` of them, then make sure no more."""
    queue = bus.topology.host_queue_name(host)
    got = collect(bus.url, queue, count, timeout)
    assert len(got) == count, f"{len(got)} of {count} events reached {queue}"
    extra = collect(bus.url, queue, 1, timeout=0.3)
    assert extra == [], "more events than published reached the host"
    return [(m, contract.decode(m.body)) for m in got]


class Proxy:
    """A TCP forwarder to RabbitMQ that can be stopped and started again."""

    def __init__(self, target=("127.0.0.1", 5672)):
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._sockets, self._threads = [], []

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self):
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(16)
        self._spawn(self._accept)
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._sockets, self._threads = [], []

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self):
        while not self._stop.is_set():
            if not select.select([self._listener], [], [], 0.05)[0]:
                continue
            client, _ = self._listener.accept()
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    def _pipe(self, src, dst):
        while not self._stop.is_set():
            try:
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    return
                dst.sendall(data)
            except (OSError, ValueError):
                return


def test_event_reaches_the_host_with_the_broker_validated_publisher(bus, router):
    bus.declare_host(HOST)
    with InstanceEventPublisher(settings(bus)) as pub:
        receipt = pub.publish(plugged(1))
    assert not receipt.spooled
    [(message, env)] = host_events(bus, 1)
    assert env.id == receipt.message_id
    assert env.payload == plugged(1)
    # through the hosts exchange, the host its routing key
    assert message.delivery_info["exchange"] == bus.topology.hosts_exchange_name
    assert message.delivery_info["routing_key"] == HOST
    # The router copies the user_id RabbitMQ validated on ingress.
    assert message.headers[contract.HEADER_PUBLISHER] == "guest"
    assert router.service.stats["in"] == 1


def test_the_ingress_message_is_persistent_and_carries_our_user_id(bus):
    bus.declare_central()           # no router: read ingress as it arrives
    with InstanceEventPublisher(settings(bus)) as pub:
        receipt = pub.publish(plugged(3))
    [m] = collect(bus.url, bus.topology.router_queue_name, 1, timeout=5)
    assert m.properties["user_id"] == "guest"
    assert m.properties["delivery_mode"] == 2
    assert m.properties["message_id"] == receipt.message_id
    assert m.delivery_info["routing_key"] == "instance.network-vif-plugged"


def test_a_user_id_that_is_not_ours_is_refused_by_the_broker(bus, router):
    # What user_id buys: RabbitMQ itself refuses a claimed identity that is
    # not the connection's login. (Publishing directly, as an impostor would.)
    import kombu

    from router.bus.publishing import BlockingPublisher
    with kombu.Connection(bus.url) as conn:
        impostor = BlockingPublisher(conn, user_id="neutron")
        with pytest.raises(conn.channel_errors, match="user_id"):
            impostor.publish(bus.topology.ingress_exchange_name,
                             "instance.network-vif-plugged",
                             contract.encode(contract.envelope(plugged(1), "x")))


def test_failover_url_skips_a_dead_host(bus, router):
    bus.declare_host(HOST)
    url = "rabbit://guest:guest@127.0.0.1:1,guest:guest@127.0.0.1:5672/"
    with InstanceEventPublisher(settings(bus, url)) as pub:
        receipt = pub.publish(plugged(2))
    assert not receipt.spooled
    [(_, env)] = host_events(bus, 1)
    assert env.id == receipt.message_id


TRACES = [f"00-{i + 1:032x}-{i + 7:016x}-01" for i in range(6)]


def test_spooled_while_unreachable_then_delivered_once_in_order_after_restart(
        bus, router, tmp_path):
    bus.declare_host(HOST)
    spool_path = tmp_path / "network.spool"
    # The broker is unreachable: every publish is still accepted, on disk.
    with InstanceEventPublisher(settings(bus, DEAD_URL,
                                         spool_path=spool_path)) as pub:
        receipts = [pub.publish(plugged(i), traceparent=TRACES[i])
                    for i in range(6)]
    assert all(r.spooled for r in receipts)
    s = Spool(spool_path)
    assert len(s) == 6
    s.close()
    # The publishing process restarts with the broker back.
    with InstanceEventPublisher(settings(bus, spool_path=spool_path)) as pub:
        assert pub.wait_drained(15)
        after = pub.publish(plugged(6))
        assert not after.spooled
    events = host_events(bus, 7)
    assert [env.id for _, env in events] == [r.message_id for r in receipts] + [
        after.message_id]
    assert [env.payload for _, env in events] == [plugged(i) for i in range(7)]
    assert router.service.stats["in"] == 7
    # each spooled event kept its publishing context's trace
    assert [tracecontext.trace_id_of(m.headers[tracecontext.HEADER])
             for m, _ in events[:6]] == [t[3:35] for t in TRACES]


def test_a_gone_processs_spool_is_sent_by_the_next_process(bus, router, tmp_path):
    """Neutron's workers spool to <spool_path>.<pid>: the process that comes
    after a restart (another pid) takes the file over and sends it, after
    what a process without any publisher wrote straight to its own spool."""
    from network.spool import adopt_orphans, append_now
    bus.declare_host(HOST)
    prefix = str(tmp_path / "evrouter-spool.")
    with InstanceEventPublisher(settings(bus, DEAD_URL,
                                         spool_path=prefix + "101")) as pub:
        receipts = [pub.publish(plugged(i)) for i in range(3)]
    assert all(r.spooled for r in receipts)
    late = contract.envelope(plugged(3), "network-test")
    append_now(prefix + "102", [("instance.network-vif-plugged",
                                 contract.encode(late))])
    mine = prefix + "200"
    assert adopt_orphans(mine, prefix) == 4
    with InstanceEventPublisher(settings(bus, spool_path=mine)) as pub:
        assert pub.wait_drained(15)
    events = host_events(bus, 4)
    ids = [env.id for _, env in events]
    # Each file's records in their order; files are taken oldest first by
    # mtime, which orders nothing between two processes' events.
    assert sorted(ids) == sorted([r.message_id for r in receipts] + [late.id])
    assert [i for i in ids if i != late.id] == [r.message_id for r in receipts]
    assert sorted(os.listdir(tmp_path)) == ["evrouter-spool.200"]


def test_a_live_connection_cut_spools_and_drains_in_the_same_process(
        bus, router, tmp_path):
    bus.declare_host(HOST)
    proxy = Proxy().start()
    try:
        pub = InstanceEventPublisher(settings(bus, proxy.url,
                                              spool_path=tmp_path / "s",
                                              heartbeat=2)).start()
        first = pub.publish(plugged(0))
        assert not first.spooled
        proxy.stop()                                  # the broker goes away
        during = [pub.publish(plugged(i)) for i in range(1, 5)]
        assert all(r.spooled for r in during)
        assert pub.spooled == 4
        proxy.start()                                 # ... and comes back
        assert pub.wait_drained(15)
        last = pub.publish(plugged(5))
        assert not last.spooled
        pub.close()
    finally:
        proxy.stop()
    events = host_events(bus, 6)
    assert [env.id for _, env in events] == [
        r.message_id for r in [first, *during, last]]
    assert pub.stats == {"sent": 2, "spooled": 4, "drained": 4, "failed": 0, "set_aside": 0}


def test_unroutable_ingress_is_retried_then_spooled_not_lost(bus, tmp_path):
    # No router queue bound yet (no router ever started): the broker returns
    # the message. It is kept, and delivered once the queue exists.
    ingress = bus.topology.ingress_exchange()
    ingress(bus.channel()).declare()
    with InstanceEventPublisher(settings(bus, spool_path=tmp_path / "s")) as pub:
        receipt = pub.publish(plugged(1))
        assert receipt.spooled
        bus.declare_central()
        bus.declare_host(HOST)      # bound to the hosts exchange, there now
        from tests.conftest import RunningRouter
        router = RunningRouter(bus)
        try:
            assert pub.wait_drained(15)
            [(_, env)] = host_events(bus, 1)
            assert env.id == receipt.message_id
        finally:
            router.stop()


def test_burst_from_many_threads(bus, router):
    bus.declare_host(HOST)
    n_threads, per_thread = 8, 50
    with InstanceEventPublisher(settings(bus)) as pub:
        def caller(t):
            for i in range(per_thread):
                pub.publish(plugged(t * 1000 + i))
        threads = [threading.Thread(target=caller, args=(t,))
                   for t in range(n_threads)]
        started = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        elapsed = time.monotonic() - started
    total = n_threads * per_thread
    assert pub.stats["sent"] == total
    events = host_events(bus, total, timeout=30)
    tags = [env.payload.tag for _, env in events]
    assert len(set(tags)) == total
    print(f"\n{total} confirmed publishes from {n_threads} threads in "
          f"{elapsed:.2f}s ({total / elapsed:.0f}/s)")


def test_refused_by_the_broker_is_an_error_not_a_spool(bus, tmp_path):
    # A vhost we may not use: configuration, not weather. Not spooled.
    url = "amqp://guest:guest@127.0.0.1:5672/evrouter-no-such-vhost"
    with InstanceEventPublisher(settings(bus, url,
                                         spool_path=tmp_path / "s")) as pub:
        with pytest.raises(PublishRefused):
            pub.publish(plugged(1))
        assert pub.spooled == 0


def test_spooled_records_this_release_cannot_send_never_hold_the_rest(
        bus, router, tmp_path):
    """The spool file is input (another release, a disk, a hand). Set aside
    when the file is opened: a routing key AMQP cannot carry (over 255
    bytes) or that is not UTF-8. Set aside before a drain sends anything: a
    key this release never publishes (a topic permission's 403 closed the
    channel for the whole batch, for ever; no binding takes `instance.a.b`).
    Sent, for the router to judge: a body nested 30,000 deep (its id was
    read with a RecursionError that stopped every drain) and an id of 300
    bytes (AMQP's message_id is a short string: struct.error every drain).
    None of them holds the events behind it, nor new ones."""
    bus.declare_host(HOST)
    path = tmp_path / "s"
    good = [contract.envelope(plugged(i), "network-test") for i in range(3)]
    key = "instance.network-vif-plugged"
    spool = Spool(path)
    spool.append([(key, contract.encode(good[0])),
                  ("instance.a.b", contract.encode(good[0])),
                  ("evrouter.network-vif-plugged", contract.encode(good[0])),
                  (key, b"[" * 30_000 + b"]" * 30_000),
                  (key, b'{"id": "' + b"x" * 300 + b'"}'),
                  (key, contract.encode(good[1]))])
    spool.close()
    with open(path, "ab") as f:
        f.write(b"P instance." + b"x" * 300 + b" {}\n")
        f.write(b"P instance.\xff {}\n")
        f.write(b"P %s %s\n" % (key.encode(), contract.encode(good[2])))
    with InstanceEventPublisher(settings(bus, spool_path=path)) as pub:
        receipt = pub.publish(plugged(3))       # behind them in the spool
        assert pub.wait_drained(15)
        assert pub.stats["set_aside"] == 2
        after = pub.publish(plugged(4))
        assert not after.spooled                # no spool left to queue behind
    events = host_events(bus, 5)
    assert sorted(env.id for _, env in events) == sorted(
        [e.id for e in good] + [receipt.message_id, after.message_id])
    rejected = (tmp_path / "s.rejected").read_bytes().splitlines()
    assert len(rejected) == 4
    assert rejected[0].startswith(b"P instance.xxx") and rejected[1] == b"P instance.\xff {}"
    assert [line.split(b" ", 2)[1] for line in rejected[2:]] == [
        b"instance.a.b", b"evrouter.network-vif-plugged"]


def test_a_queue_refusing_everything_for_a_while_sets_nothing_aside(
        bus, tmp_path, monkeypatch):
    """Nacks are the queue's state (at its length limit with reject-publish,
    a quorum queue without a leader), and a queue with room for one gives
    partial batches: no record is blamed, however long it lasts."""
    import subprocess

    import network.publisher as publisher_mod
    monkeypatch.setattr(publisher_mod, "SET_ASIDE_AFTER", 0.5)
    bus.declare_central()
    bus.declare_host(HOST)
    policy = f"{bus.topology.prefix}-full"
    subprocess.run(["rabbitmqctl", "-q", "set_policy", "--apply-to", "queues", policy,
                    f"^{re.escape(bus.topology.router_queue_name)}$",
                    '{"max-length": 1, "overflow": "reject-publish"}'],
                   check=True, timeout=60, capture_output=True)
    try:
        path = tmp_path / "s"
        with InstanceEventPublisher(settings(bus, DEAD_URL, spool_path=path)) as pub:
            receipts = [pub.publish(plugged(i)) for i in range(3)]
        assert all(r.spooled for r in receipts)
        with InstanceEventPublisher(settings(bus, spool_path=path)) as pub:
            wait_for(lambda: pub.stats["drained"] >= 1, 15, what="one taken")
            time.sleep(2.0)         # four times SET_ASIDE_AFTER of refusals
            assert pub.stats["set_aside"] == 0 and pub.spooled == 2
            subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy],
                           check=True, timeout=60, capture_output=True)
            from tests.conftest import RunningRouter
            router = RunningRouter(bus)
            try:
                assert pub.wait_drained(30)
                assert len(host_events(bus, 3)) == 3
            finally:
                router.stop()
        assert not (tmp_path / "s.rejected").exists()
    finally:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy], timeout=60,
                       capture_output=True)


def test_a_write_permission_refused_for_a_while_spools_and_loses_nothing(
        router_vhost, tmp_path):
    """A 403 is a permission or a password, usually put right within minutes
    (a rotation, `evrouter permissions --apply` run late): with a spool the
    event is kept and sent once allowed, not raised to a caller (Neutron's
    plugin) that can only log it as lost."""
    v = router_vhost("pubdeny", write="^$")
    with InstanceEventPublisher(settings(v.bus(v.url), v.url,
                                         spool_path=tmp_path / "s")) as pub:
        receipts = [pub.publish(plugged(i)) for i in range(3)]
        assert all(r.spooled for r in receipts)
        assert pub.stats["failed"] == 0
        v.permit(".*")
        assert pub.wait_drained(30)
    got = collect(v.admin, v.topology.router_queue_name, 3, timeout=15)
    assert sorted(m.properties["message_id"] for m in got) == sorted(
        r.message_id for r in receipts)
