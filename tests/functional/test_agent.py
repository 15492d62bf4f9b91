"""The lifecycle agent on libvirt's test driver and the real broker.

libvirt-python's test driver emits real lifecycle events (STARTED, STOPPED,
SUSPENDED, RESUMED, DEFINED, UNDEFINED) from create, destroy, suspend,
resume, define and undefine. Every test_default connection of one process
shares that driver's state; a `test:///<file>` URI opens a driver of its
own, which is how two hosts live in one process.
"""

import time
import uuid

import libvirt
import pytest

from compute import libvirt_watch
from router.bus import contract
from tests.conftest import wait_for
from tests.functional.agent_harness import (
    HOST,
    RunningAgent,
    TcpProxy,
    domain_xml,
)

pytestmark = pytest.mark.timeout(60)


def test_transitions_arrive_in_order_numbered_per_host(driver, listener,
                                                       start_agent):
    running = start_agent(stopped_delay=0.3)
    dom = driver.define()
    uid = dom.UUIDString()
    started_at = time.monotonic()
    dom.create()
    dom.suspend()
    dom.resume()
    dom.destroy()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "PAUSED",
                                    "RESUMED", "STOPPED"])
    dom.undefine()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "PAUSED",
                                    "RESUMED", "STOPPED", "UNDEFINED"])

    events = listener.events(uid)
    assert [(p.event, p.detail) for p in events] == [
        (libvirt.VIR_DOMAIN_EVENT_DEFINED, 0),
        (libvirt.VIR_DOMAIN_EVENT_STARTED, 0),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, 0),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED,
         libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
        (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0)]
    assert {p.host for p in events} == {HOST}
    # One sequence per host over everything it published, announce included.
    envelopes = listener.envelopes()
    seqs = [e.payload.seq for e in envelopes]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {e.producer for e in envelopes} == {f"evrouter-agent/{HOST}"}
    assert len({e.id for e in envelopes}) == len(envelopes)
    latency = listener.arrival(uid, "STARTED") - started_at
    print(f"libvirt create -> STARTED on the fanout: {latency * 1000:.1f} ms")
    assert latency < 1.0
    assert running.agent.stats["events"] >= 6


def test_reboot_within_the_delay_publishes_no_stopped(driver, listener,
                                                      start_agent):
    delay = 0.5
    running = start_agent(stopped_delay=delay)
    dom = driver.define()
    uid = dom.UUIDString()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED"])
    rebooted_at = time.monotonic()
    dom.destroy()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STARTED"])
    # The STOPPED would be due by now; whatever comes next comes after it.
    wait_for(lambda: time.monotonic() > rebooted_at + delay + 0.2,
             what="the STOPPED delay to pass")
    dom.suspend()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STARTED",
                                    "PAUSED"])
    assert running.agent.stats["stopped_cancelled"] == 1
    assert running.agent.held == 0


def test_stopped_alone_is_published_after_the_delay(driver, listener,
                                                    start_agent):
    delay = 0.6
    start_agent(stopped_delay=delay)
    dom = driver.define()
    uid = dom.UUIDString()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED"])
    destroyed_at = time.monotonic()
    dom.destroy()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STOPPED"])
    waited = listener.arrival(uid, "STOPPED") - destroyed_at
    assert delay <= waited < delay + 1.0


def test_snapshot_and_announce_on_start(driver, listener, start_agent):
    stopped, running, paused = driver.define(), driver.define(), driver.define()
    running.create()
    paused.create()
    paused.suspend()
    start_agent()

    first = wait_for(lambda: listener.envelopes()[:1], what="the snapshot")
    assert first[0].kind == contract.HOST_SNAPSHOT
    assert (first[0].payload.host, first[0].payload.seq) == (HOST, 1)
    snap = {dom.UUIDString(): listener.wait_snapshot(dom.UUIDString())
            for dom in (stopped, running, paused)}
    assert snap[stopped.UUIDString()].transition == "STOPPED"
    assert snap[running.UUIDString()].transition == "STARTED"
    assert snap[paused.UUIDString()].transition == "PAUSED"
    # One message for the whole host.
    assert {p.seq for p in snap.values()} == {1}
    assert all(p.host == HOST for p in snap.values())
    # No live events: nothing happened since the agent started.
    assert listener.events() == []


def test_stop_publishes_held_stopped(driver, listener, start_agent):
    running = start_agent(stopped_delay=60)
    dom = driver.define()
    uid = dom.UUIDString()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED"])
    dom.destroy()
    wait_for(lambda: running.agent.held == 1, what="the STOPPED to be held")
    stopping = time.monotonic()
    running.stop()
    assert time.monotonic() - stopping < 5
    # Published (and confirmed) before stop() returned.
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STOPPED"])


def test_broker_loss_keeps_events_and_publishes_them_in_order(
        bus, driver, listener, start_agent):
    proxy = TcpProxy()
    try:
        running = start_agent(url=proxy.url, stopped_delay=0)
        agent = running.agent
        proxy.cut()
        wait_for(lambda: not agent.healthy and "down" in agent.health,
                 what="the agent to notice the broker is gone")
        dom = driver.define()
        uid = dom.UUIDString()
        dom.create()
        dom.suspend()
        wait_for(lambda: agent.stats["events"] >= 3, what="events seen")
        assert len(agent.outbox) >= 3       # kept, not published
        assert listener.transitions(uid) == []
        seen_before = len(listener.envelopes())

        proxy.restore()
        running.wait_healthy()
        listener.wait_transitions(uid, ["DEFINED", "STARTED", "PAUSED"])
        # The reconnect is followed by a fresh snapshot.
        entry = listener.wait_snapshot(uid, after=seen_before)
        assert entry.transition == "PAUSED"
        after = listener.envelopes()[seen_before:]
        paused_at = next(i for i, e in enumerate(after)
                         if e.kind == contract.LIFECYCLE_EVENT
                         and e.payload.transition == "PAUSED")
        snapshot_at = next(i for i, e in enumerate(after)
                           if e.kind == contract.HOST_SNAPSHOT)
        assert paused_at < snapshot_at
        seqs = [e.payload.seq for e in after]
        assert seqs == sorted(set(seqs))    # increasing, no duplicate
        assert agent.outbox.dropped == 0
    finally:
        proxy.close()


def test_placement_follows_a_domain_from_host_to_host(bus, router, tmp_path):
    # Each open of a test:///<file> URI is a hypervisor of its own, so each
    # agent is handed the connection the test drives its domains through
    # (and closes it when it stops).
    libvirt_watch.start_event_loop()
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    uri = f"test://{node}"
    agents = {}
    try:
        for host in ("compute-a", "compute-b"):
            conn = libvirt.open(uri)
            agents[host] = (conn, RunningAgent(
                bus, host=host, libvirt_uri=uri, stopped_delay=0.2,
                opener=lambda _, conn=conn: conn))
        for _, running in agents.values():
            running.wait_healthy()
        hosts_for = router.service.placement.hosts_for
        uid = str(uuid.uuid4())
        on_a, on_b = (agents[host][0].defineXML(domain_xml("evt-moving", uid))
                      for host in ("compute-a", "compute-b"))

        on_a.create()
        wait_for(lambda: hosts_for(uid) == ("compute-a",),
                 what="placement on compute-a")
        on_b.create()           # as during a migration: live on both
        wait_for(lambda: set(hosts_for(uid)) == {"compute-a", "compute-b"},
                 what="placement on both hosts")
        on_a.destroy()
        wait_for(lambda: hosts_for(uid) == ("compute-b",),
                 what="placement on compute-b only")
        on_a.undefine()
        on_b.destroy()          # stopped, but it still lives on compute-b
        wait_for(lambda: router.service.stats["lifecycle_seen"] >= 7,
                 what="the router to see every event")
        assert hosts_for(uid) == ("compute-b",)
    finally:
        for _, running in agents.values():
            running.stop()


def test_a_router_started_later_learns_placement_from_periodic_snapshots(
        bus, driver, listener, start_agent):
    from tests.conftest import RunningRouter
    dom = driver.define()
    dom.create()
    start_agent(snapshot_interval=0.5)
    uid = dom.UUIDString()
    listener.wait_snapshot(uid)            # the start-up snapshot: nobody routing yet
    bus.declare_central()
    late = RunningRouter(bus)              # its placement queue missed that one
    try:
        wait_for(lambda: late.service.placement.hosts_for(uid) == (HOST,), timeout=10,
                 what="the late router learning where the domain runs")
        assert late.service.stats["snapshots_seen"] >= 1
    finally:
        late.stop()


def test_openstack_hard_reboot_shows_neither_stopped_nor_undefined(
        bus, router, driver, listener, start_agent):
    # nova's hard reboot: destroy, undefine, define the same domain, create.
    delay = 0.5
    running = start_agent(stopped_delay=delay)
    dom = driver.define()
    uid = dom.UUIDString()
    name = dom.name()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED"])
    hosts_for = router.service.placement.hosts_for
    wait_for(lambda: hosts_for(uid) == (HOST,), what="placement")
    rebooted_at = time.monotonic()
    dom.destroy()
    dom.undefine()
    seen = []       # placement while the instance is away mid-reboot
    seen.append(hosts_for(uid))
    dom = driver.conn.defineXML(domain_xml(name, uid))
    driver.made.append(dom)
    seen.append(hosts_for(uid))
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "DEFINED",
                                    "STARTED"])
    wait_for(lambda: time.monotonic() > rebooted_at + delay + 0.3,
             what="the hold delay to pass")
    dom.suspend()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "DEFINED",
                                    "STARTED", "PAUSED"])
    # DEFINED cancelled the UNDEFINED, STARTED the STOPPED.
    assert running.agent.stats["stopped_cancelled"] == 2
    assert running.agent.held == 0
    wait_for(lambda: router.service.placement.hosts_for(uid) == (HOST,),
             what="placement after the reboot")
    assert seen == [(HOST,), (HOST,)]


def test_undefine_for_good_is_published_after_the_delay(driver, listener,
                                                        start_agent):
    delay = 0.4
    start_agent(stopped_delay=delay)
    dom = driver.define()
    uid = dom.UUIDString()
    dom.create()
    listener.wait_transitions(uid, ["DEFINED", "STARTED"])
    gone_at = time.monotonic()
    dom.destroy()
    dom.undefine()
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STOPPED",
                                    "UNDEFINED"])
    assert listener.arrival(uid, "UNDEFINED") - gone_at >= delay
