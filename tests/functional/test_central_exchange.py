"""One central exchange for every host's copies (issue 22, item 1), on the
real broker.

The router publishes each host copy to `<prefix>.hosts` with the host's
name as routing key (mandatory); each host's queue is bound there with its
own name. So the router asks the broker nothing per host: before, the first
event to each new host cost a synchronous passive declare (budgeted: 2,000
new hosts took 33 s to reach), and a copy to a missing host exchange closed
the publish channel. Now a host without a queue is a return, parked for that
host and dead-lettered `unknown-host` after no_host_timeout.
"""

import logging
import subprocess
import threading
import time
import uuid

import kombu
import pytest

from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import contract, topology
from router.delivery import HEADER_HOST
from router.routing import Policy
from tests.conftest import (
    BROKER_URL,
    Bus,
    RunningRouter,
    collect,
    queue_depth,
    single_user_policy,
    wait_for,
)
from tests.functional.waiter_harness import Publisher

pytestmark = pytest.mark.timeout(120)


def _event(host, server=None):
    return contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, server or str(uuid.uuid4()), "port-1",
        contract.COMPLETED, host), "test")


@pytest.fixture
def fast_bus():
    b = Bus(BROKER_URL, retry_delays_ms=(200, 400))
    try:
        yield b
    finally:
        b.cleanup()


def test_a_router_that_may_write_no_host_exchange_reaches_every_host(
        router_vhost):
    """Write on the hosts exchange is all a router needs to reach any
    number of hosts, each new to it: nothing per host is asked or written
    but the copy. 300 hosts, one event each, all delivered once."""
    hosts = [f"cmp-{i:03d}" for i in range(300)]
    # [.], not \.: BrokerUsers sets permissions through `rabbitmqctl
    # eval`, where a backslash does not survive (\. came out as any char).
    rv = router_vhost("hosts", hosts, write=lambda topo: (
        "^(?!" + topo.prefix + "[.]host[.]).*$"))
    topo, admin = rv.topology, rv.admin
    router = rv.start_router()
    publisher = rv.start_publisher()
    sent = {}
    started = time.monotonic()
    for host in hosts:
        env = _event(host)
        sent[host] = env.id
        publisher.to_ingress(env)
    stats = router.service.stats
    wait_for(lambda: stats["out"] >= len(hosts), 30,
             what="a copy confirmed for every host")
    took = time.monotonic() - started
    with kombu.Connection(admin) as conn:
        for host in hosts:
            declared = conn.default_channel.queue_declare(
                topo.host_queue_name(host), passive=True)
            assert declared.message_count == 1, host
    got = collect(admin, topo.host_queue_name(hosts[7]), 1, timeout=5)
    assert got[0].properties["message_id"] == sent[hosts[7]]
    assert got[0].delivery_info["exchange"] == topo.hosts_exchange_name
    assert got[0].delivery_info["routing_key"] == hosts[7]
    assert stats["returned"] == 0 and stats["publish_denied"] == 0, dict(stats)
    assert stats["sessions"] == 1
    logging.getLogger(__name__).info("300 new hosts reached in %.2fs", took)


def test_a_copy_for_a_host_without_a_queue_waits_parked_for_it(fast_bus):
    """The host's consumer starts after its first event: the copy comes
    back (a return, not a closed channel), its event waits in the retry
    tiers, and reaches the queue by the round after it is declared."""
    b = fast_bus
    b.declare_central()
    b.declare_host("cmp-here")
    r = RunningRouter(b)
    pub = Publisher(b)
    try:
        env = _event("cmp-late")
        pub.to_ingress(env)
        stats = r.service.stats
        wait_for(lambda: stats["returned"] >= 2, 10,
                 what="the copy returned, twice")
        # Others are not held up meanwhile.
        other = _event("cmp-here")
        pub.to_ingress(other)
        [m] = collect(b.url, b.topology.host_queue_name("cmp-here"), 1, timeout=5)
        assert m.properties["message_id"] == other.id
        b.declare_host("cmp-late")
        [m] = collect(b.url, b.topology.host_queue_name("cmp-late"), 1, timeout=5)
        assert m.properties["message_id"] == env.id
        assert m.headers.get(contract.HEADER_PUBLISHER)
        assert queue_depth(b.url, b.topology.dead_letter_queue_name) == 0
        assert stats["publish_channel_faults"] == 0 and stats["sessions"] == 1
    finally:
        pub.close()
        r.stop()


def test_a_host_that_never_comes_is_dead_lettered_unknown_host_alone(fast_bus):
    """Only the missing host's copy is dead-lettered, after no_host_timeout,
    naming the host; the other host named for the same event (placement)
    got its copy at once, and nothing is left in hand."""
    from tests.functional.test_router import publish_lifecycle
    b = fast_bus
    b.declare_central()
    b.declare_host("cmp-real")
    r = RunningRouter(b, policy=single_user_policy(b.url, no_host_timeout=2.0))
    pub = Publisher(b)
    try:
        server = str(uuid.uuid4())
        publish_lifecycle(b, "cmp-real", "STARTED", server)
        wait_for(lambda: r.service.placement.hosts_for(server) == ("cmp-real",),
                 5, what="the placement known")
        env = _event("cmp-ghost", server)
        started = time.monotonic()
        pub.to_ingress(env)
        [m] = collect(b.url, b.topology.host_queue_name("cmp-real"), 1, timeout=5)
        assert m.properties["message_id"] == env.id
        [dead] = collect(b.url, b.topology.dead_letter_queue_name, 1, timeout=15)
        assert time.monotonic() - started >= 2.0
        assert dead.properties["message_id"] == env.id
        assert dead.headers[contract.HEADER_REASON] == contract.REASON_UNKNOWN_HOST
        assert dead.headers[HEADER_HOST] == "cmp-ghost"
        assert "cmp-ghost" in dead.headers[contract.HEADER_DETAIL]
        assert contract.decode(dead.body).id == env.id
        stats = r.service.stats
        assert stats["dead_lettered:unknown-host"] == 1, dict(stats)
        assert not collect(b.url, b.topology.host_queue_name("cmp-real"), 1,
                           timeout=0.3), "delivered twice"
    finally:
        pub.close()
        r.stop()


def test_a_host_started_before_the_central_topology_is_bound_once_it_exists(
        fast_bus, caplog):
    """A compute host whose consumer starts first: its queue cannot be bound
    to a hosts exchange that does not exist yet. It says so at ERROR,
    consumes, and its queue watch binds it once a router declared the
    central topology: the events routed meanwhile (parked) arrive."""
    b = fast_bus
    host = "cmp-early"
    received = []
    consumer = HostConsumer(HostConsumerSettings(
        transport_url=b.url, topology=b.topology, host=host,
        consume_check=0.5), lambda event, msg_id: received.append(msg_id))
    with caplog.at_level(logging.ERROR, logger="compute.host_session"):
        thread = consumer.start()
        try:
            assert consumer.ready.wait(10), "the consumer did not start"
            assert any(b.topology.hosts_exchange_name in r.getMessage()
                       for r in caplog.records), caplog.text
            b.own(exchanges=[b.topology.host_exchange_name(host)],
                  queues=[b.topology.host_queue_name(host)])
            b.declare_central()
            r = RunningRouter(b)
            try:
                env = _event(host)
                Publisher(b).to_ingress(env)
                wait_for(lambda: env.id in received, 15,
                         what="the event reached the early host")
            finally:
                r.stop()
        finally:
            consumer.stop()
            thread.join(10)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_the_hosts_exchange_deleted_is_declared_again_and_rebound(fast_bus, busy):
    """An operator deletes <prefix>.hosts under a running deployment: every
    host binding goes with it. The router's next copy finds it gone (404)
    and declares it again; each host consumer's queue watch binds its queue
    again, busy or idle (busy: fed through its own exchange meanwhile, as
    by a router of the earlier release; the review's host was never bound
    again); the events returned meanwhile arrive. Nothing lost, one router
    session."""
    b = fast_bus
    b.declare_central()
    host = "cmp-watched"
    received = []
    consumer = HostConsumer(HostConsumerSettings(
        transport_url=b.url, topology=b.topology, host=host,
        consume_check=0.5), lambda event, msg_id: received.append(msg_id))
    b.own(exchanges=[b.topology.host_exchange_name(host)],
          queues=[b.topology.host_queue_name(host)])
    thread = consumer.start()
    r = RunningRouter(b)
    pub = Publisher(b)
    feeding = threading.Event()
    try:
        assert consumer.ready.wait(10)
        first = _event(host)
        pub.to_ingress(first)
        wait_for(lambda: first.id in received, 10, what="the first event")
        if busy:
            def feed():
                direct = Publisher(b)
                try:
                    while not feeding.is_set():
                        direct.to_host(host, contract.encode(_event(host)))
                        feeding.wait(0.1)
                finally:
                    direct.close()
            threading.Thread(target=feed, daemon=True).start()
        with kombu.Connection(b.url) as conn:
            conn.default_channel.exchange_delete(b.topology.hosts_exchange_name)
        later = [_event(host) for _ in range(5)]
        for env in later:
            pub.to_ingress(env)
        wait_for(lambda: all(e.id in received for e in later), 20,
                 what="every event after the deletion")
        feeding.set()
        stats = r.service.stats
        assert stats["topology_repairs"] >= 1, dict(stats)
        assert stats["sessions"] == 1
        assert queue_depth(b.url, b.topology.dead_letter_queue_name) == 0
    finally:
        feeding.set()
        pub.close()
        r.stop()
        consumer.stop()
        thread.join(10)


def test_the_memory_transport_dead_letters_a_copy_for_no_host():
    """kombu's memory transport has no returns: the publisher says
    returned for a mandatory message no queue is bound for, and the router
    dead-letters that host's copy unknown-host rather than lose it."""
    from router.service import RouterService, RouterSettings
    topo = topology.Topology(prefix=f"evt-mem-{uuid.uuid4().hex[:8]}")
    url = "memory://localhost/"
    with kombu.Connection(url) as conn:
        topology.declare(conn.default_channel, *topo.central())
        topology.declare(conn.default_channel, *topo.for_host("cmp-m"))
    svc = RouterService(RouterSettings(transport_url=url, topology=topo,
                                       policy=Policy()))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        assert svc.ready.wait(10)
        with kombu.Connection(url) as conn:
            producer = kombu.Producer(conn.default_channel)
            for host in ("cmp-m", "cmp-none"):
                env = _event(host)
                producer.publish(contract.encode(env),
                                 exchange=topo.ingress_exchange_name,
                                 routing_key="instance.network-vif-plugged",
                                 message_id=env.id)
        wait_for(lambda: svc.stats["dead_lettered:unknown-host"] == 1
                 and svc.stats["out"] == 1, 10,
                 what="one delivered, one dead-lettered")
        with kombu.Connection(url) as conn:
            q = topo.dead_letter_queue()(conn.default_channel)
            dead = q.get()
            assert dead.headers[HEADER_HOST] == "cmp-none"
    finally:
        svc.stop()
        thread.join(10)


def test_a_hint_naming_no_host_does_not_keep_the_event_from_its_placement(
        fast_bus):
    """The review's case: the hint names a host without a queue (stale, a
    name mismatch) and no host had reported the instance yet. Parked for
    the hinted host alone, the event never reached the host placement named
    a moment later and was dead-lettered unknown-host. Its only copy back,
    it is decided again after a tier: it reaches the real host."""
    from tests.functional.test_router import publish_lifecycle
    b = fast_bus
    b.declare_central()
    b.declare_host("cmp-real")
    r = RunningRouter(b, policy=single_user_policy(b.url, no_host_timeout=30.0))
    pub = Publisher(b)
    try:
        server = str(uuid.uuid4())
        env = _event("cmp-stale", server)
        pub.to_ingress(env)
        stats = r.service.stats
        wait_for(lambda: stats["returned"] >= 1, 10,
                 what="the stale hint's copy returned")
        publish_lifecycle(b, "cmp-real", "STARTED", server)
        [m] = collect(b.url, b.topology.host_queue_name("cmp-real"), 1, timeout=10)
        assert m.properties["message_id"] == env.id
        assert stats["retried"] >= 1 and stats["dead_lettered:unknown-host"] == 0
    finally:
        pub.close()
        r.stop()


def test_rounds_parked_for_a_missing_queue_do_not_spend_the_refused_patience(
        fast_bus, policy):
    """The review's case: a host whose queue came late, then refused a
    moment (full, a leader election). Returned rounds and refused rounds
    shared one count, so its copy was dead-lettered `refused` at its first
    refusal. Each kind now has its own budget: the copy waits out the
    refusal and arrives."""
    from tests.conftest import REJECT_ALL
    from tests.functional.test_router import publish_lifecycle
    b = fast_bus
    b.declare_central()
    b.declare_host("cmp-other")
    r = RunningRouter(b, refused_patience=2.0, refused_hold=0.3)
    pub = Publisher(b)
    try:
        server = str(uuid.uuid4())
        publish_lifecycle(b, "cmp-other", "STARTED", server)
        wait_for(lambda: r.service.placement.hosts_for(server) == ("cmp-other",),
                 5, what="the placement known")
        env = _event("cmp-late", server)
        pub.to_ingress(env)
        stats = r.service.stats
        # parked for cmp-late, round after round: 0.2 + 0.4 + 0.4 + ... s,
        # past refused_patience (2 s) before the queue exists
        wait_for(lambda: stats["parked:unknown-host"] >= 7, 15,
                 what="cmp-late's copy parked past refused_patience")
        name = policy(b.topology.host_queue_name("cmp-late"), REJECT_ALL)
        b.declare_host("cmp-late")
        wait_for(lambda: stats["parked:refused"] >= 1, 15,
                 what="cmp-late's copy refused and parked")
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", name], timeout=60,
                       check=True, capture_output=True)
        [m] = collect(b.url, b.topology.host_queue_name("cmp-late"), 1, timeout=10)
        assert m.properties["message_id"] == env.id
        assert stats["dead_lettered:refused"] == 0, dict(stats)
    finally:
        pub.close()
        r.stop()
