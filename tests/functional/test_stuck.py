"""`evrouter stuck` on the real broker: each cause of a stuck wait, injected
and named (issue 23, item 3).

A world of its own per test: a router, two host consumers (each with its
waiter registry watched: stuck after 0.3 s) and a network publisher, every
one writing the journal of the test's prefix. A wait is a prepared event
left pending; its host consumer records it stuck; ``stuck_cmd.find`` reads
the journal back and must name the cause that was injected.
"""

import subprocess
import sys
import uuid

import pytest
from prometheus_client import CollectorRegistry

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router import journal, stuck_cmd
from router.bus import contract
from router.metrics import RouterCollector
from tests.conftest import BROKER_URL, Bus, RunningRouter, single_user_policy, wait_for

pytestmark = pytest.mark.timeout(90)

H1, H2 = "sh1", "sh2"
STUCK_AFTER = 0.3


class _Host:
    def __init__(self, bus, js, host, hold_seconds):
        bus.declare_host(host)
        self.registry = InstanceEvents(hold_seconds=hold_seconds)
        self.consumer = HostConsumer(HostConsumerSettings(
            host=host, transport_url=BROKER_URL, topology=bus.topology,
            journal=js, stuck_after=STUCK_AFTER), self.registry.deliver,
            waits=self.registry)
        self.thread = self.consumer.start()
        assert self.consumer.ready.wait(10)

    def stop(self):
        self.consumer.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


class World:
    def __init__(self, bus, js):
        self.bus = bus
        # no_host_timeout 1 s: an event for a host that does not exist is
        # dead-lettered within the test's time
        self.router = RunningRouter(bus, journal=js, policy=single_user_policy(
            no_host_timeout=1.0))
        self.hosts = {h: _Host(bus, js, h, hold_seconds=1.0) for h in (H1, H2)}
        self.pub = InstanceEventPublisher(PublisherSettings(
            transport_url=BROKER_URL, topology=bus.topology,
            journal=js)).start()

    def stop(self):
        self.pub.close()
        for host in self.hosts.values():
            host.stop()
        self.router.stop()

    def publish(self, name, server, port, host=None, **kw):
        return self.pub.publish(contract.InstanceEvent(name, server, port,
                                                       host=host), **kw)

    def stuck(self, host, n=1):
        """Wait until `host` recorded `n` stuck waits, then every journal
        wrote what it has."""
        waits = self.hosts[host].consumer.waits
        # 3 s for a 0.3 s threshold: an idle consumer is woken for it,
        # not left asleep until its next heartbeat check (7.5 s)
        wait_for(lambda: waits.stats["stuck"] >= n, 3,
                 what=f"{n} stuck wait(s) on {host}")
        self.flush()

    def flush(self):
        for j in [self.pub.journal, self.router.service.journal,
                  *(h.consumer.journal for h in self.hosts.values())]:
            assert j.flushed(10), f"journal {j.service} not written"

    def find(self, **kw):
        # every part is guest here: trusted to speak for every host
        waits, _ = stuck_cmd.find(BROKER_URL, self.bus.prefix, 600,
                                  policy=single_user_policy(), timeout=20, **kw)
        return waits


@pytest.fixture
def world():
    bus = Bus(BROKER_URL, retry_delays_ms=(100, 200, 400))
    bus.own(queues=[journal.stream_name(bus.prefix)],
            exchanges=[journal.stream_name(bus.prefix)])
    js = journal.JournalSettings(transport_url=BROKER_URL, prefix=bus.prefix,
                                 batch_seconds=0.05)
    w = None
    try:
        bus.declare_central()
        w = World(bus, js)
        yield w
    finally:
        if w is not None:
            w.stop()
        bus.cleanup()


def _ids():
    return str(uuid.uuid4()), f"port-{uuid.uuid4().hex[:8]}"


def _only(waits, server):
    assert len(waits) == 1, [w.as_json() for w in waits]
    w = waits[0]
    assert w.instance == server
    return w


def test_never_published(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    # another instance's event, published and woken: not this wait's
    other, other_port = _ids()
    world.hosts[H1].registry.prepare(other, contract.VIF_PLUGGED, other_port)
    world.publish(contract.VIF_PLUGGED, other, other_port, host=H1)
    world.stuck(H1)
    w = _only(world.find(), server)
    assert (w.host, w.port, w.event) == (H1, port, contract.VIF_PLUGGED)
    assert w.kind == stuck_cmd.NEVER_PUBLISHED, w.why
    assert port in w.why and w.evidence == []
    assert isinstance(w.started, float) and w.started <= w.since


def test_dead_lettered(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    # placement's hint names a host that has no exchange: parked, then
    # dead-lettered unknown-host after no_host_timeout
    world.publish(contract.VIF_PLUGGED, server, port, host="sh-gone")
    world.stuck(H1)
    wait_for(lambda: world.router.service.stats.get("dead_lettered:unknown-host"),
             15, what="the event dead-lettered")
    world.flush()
    w = _only(world.find(), server)
    assert w.kind == stuck_cmd.DEAD, (w.kind, w.why)
    assert contract.REASON_UNKNOWN_HOST in w.why
    assert [r["hop"] for r in w.evidence] == [journal.DEAD]


def test_routed_to_another_host(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    # placement says H2: routed and delivered there (and held, unasked)
    world.publish(contract.VIF_PLUGGED, server, port, host=H2)
    world.stuck(H1)
    wait_for(lambda: world.hosts[H2].consumer.stats["held"], 10,
             what="the event held on the other host")
    world.flush()
    w = _only(world.find(), server)
    assert w.kind == stuck_cmd.ELSEWHERE, (w.kind, w.why)
    assert f"host {H2}" in w.why
    assert {r["hop"] for r in w.evidence} == {journal.ROUTED, journal.DELIVERED}


def test_delivered_but_not_matched(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    # the same instance's event for another port (a tag the backend named
    # differently) comes to this host
    world.publish(contract.VIF_PLUGGED, server, "port-other", host=H1)
    world.stuck(H1)
    wait_for(lambda: world.hosts[H1].consumer.stats["held"], 10,
             what="the other port's event held")
    world.flush()
    w = _only(world.find(), server)
    assert w.kind == stuck_cmd.NOT_MATCHED, (w.kind, w.why)
    assert "port-other" in w.why and port in w.why


def test_held_early_and_expired(world):
    server, port = _ids()
    h1 = world.hosts[H1]
    world.publish(contract.VIF_PLUGGED, server, port, host=H1)
    wait_for(lambda: h1.consumer.stats["held"], 10, what="the event held")
    # held for hold_seconds (1 s): the prepare after that finds it expired
    wait_for(lambda: h1.registry.clock() - next(iter(
        h1.registry._held.values())).held_at > 1.0, 5,
        what="the held event past its hold")
    h1.registry.prepare(server, contract.VIF_PLUGGED, port)
    assert h1.registry.stats["early_expired"] == 1
    world.stuck(H1)
    w = _only(world.find(), server)
    assert w.kind == stuck_cmd.EXPIRED, (w.kind, w.why)
    assert "expired" in w.why
    assert [r["hop"] for r in w.evidence] == [journal.MATCHED, journal.UNUSED]


def test_duplicate_suppressed(world):
    server, port = _ids()
    h1 = world.hosts[H1]
    first = h1.registry.prepare(server, contract.VIF_PLUGGED, port)
    sent = world.publish(contract.VIF_PLUGGED, server, port, host=H1)
    wait_for(lambda: first.how is not None, 10, what="the first wait woken")
    # the retry of the boot waits again; the event comes again under the
    # message id already seen
    h1.registry.prepare(server, contract.VIF_PLUGGED, port)
    world.publish(contract.VIF_PLUGGED, server, port, host=H1,
                  message_id=sent.message_id)
    wait_for(lambda: h1.consumer.stats["duplicate"], 10,
             what="the duplicate seen")
    world.stuck(H1)
    w = _only(world.find(), server)
    assert w.kind == stuck_cmd.DUPLICATE, (w.kind, w.why)
    assert sent.message_id in w.why


def test_no_host_known_yet(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    # no hint, and placement has never heard of the instance: parked
    world.publish(contract.VIF_PLUGGED, server, port)
    world.stuck(H1)
    wait_for(lambda: world.router.service.stats.get("retried"), 10,
             what="the event parked")
    world.flush()
    w = _only(world.find(), server)
    # parked, or already given up on (no_host_timeout is 1 s here)
    assert w.kind in (stuck_cmd.NO_HOST, stuck_cmd.DEAD), (w.kind, w.why)
    assert "no known host" in w.why or contract.REASON_NO_HOST in w.why


def test_a_stuck_wait_that_ends_is_no_longer_listed(world):
    server, port = _ids()
    h1 = world.hosts[H1]
    prepared = h1.registry.prepare(server, contract.VIF_PLUGGED, port)
    world.stuck(H1)
    assert [w.wid for w in world.find()]
    # the router follows the journal: its gauge counts the stuck wait
    wait_for(lambda: _gauge(world) == 1, 10, what="evrouter_stuck_waits 1")
    world.publish(contract.VIF_PLUGGED, server, port, host=H1)
    wait_for(lambda: prepared.how is not None, 10, what="the late event")
    assert h1.consumer.waits.stuck == 0
    world.flush()
    wait_for(lambda: _gauge(world) == 0, 10, what="evrouter_stuck_waits 0")
    assert world.router.service.stuck.seen == 1
    assert world.find() == []
    ended = world.find(include_ended=True)
    assert len(ended) == 1 and ended[0].ended.startswith("was stuck; woken by")


def _gauge(world):
    registry = CollectorRegistry()
    registry.register(RouterCollector(world.router.service))
    return registry.get_sample_value("evrouter_stuck_waits")


def test_the_command_prints_each_stuck_wait_and_its_cause(world):
    server, port = _ids()
    world.hosts[H1].registry.prepare(server, contract.VIF_PLUGGED, port)
    world.stuck(H1)
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "stuck", "--transport-url",
         BROKER_URL, "--bus-prefix", world.bus.prefix, "--since", "10m",
         "--router-lifecycle_trusted_users", "guest"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("wait w-") and f"host {H1}" in lines[0]
    assert lines[1].startswith(f"  {stuck_cmd.NEVER_PUBLISHED}: ")
    assert lines[-1].startswith("# 1 stuck wait(s)")
    # without guest trusted, a wait guest recorded for sh1 is not believed
    out = subprocess.run(
        [sys.executable, "-m", "router.cli", "stuck", "--transport-url",
         BROKER_URL, "--bus-prefix", world.bus.prefix, "--since", "10m"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# 0 stuck wait(s)"), out.stdout
