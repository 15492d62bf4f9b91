"""The router as deployed: ghost hosts, restarts, snapshots, UUID case,
lingering placement queues, partly returned events (real broker)."""

import uuid

import kombu
import pytest

from router.bus import contract
from router.bus.publishing import BlockingPublisher
from router.service import HEADER_HOST
from tests.conftest import (
    RunningRouter,
    collect,
    queue_depth,
    single_user_policy,
    wait_for,
)
from tests.functional.waiter_harness import get_dead_letter

pytestmark = pytest.mark.timeout(90)


def _publish(bus, exchange, env, key=None):
    with kombu.Connection(bus.url) as conn:
        BlockingPublisher(conn, user_id=conn.userid).publish(
            exchange, key if key is not None else
            f"instance.{getattr(env.payload, 'name', 'x')}",
            contract.encode(env), message_id=env.id,
            mandatory=exchange == bus.topology.ingress_exchange_name)


def _lifecycle(bus, payload):
    env = contract.envelope(payload, "agent")
    _publish(bus, bus.topology.lifecycle_exchange_name, env, key="")
    return env


def _event(server, host=None, name=contract.VIF_PLUGGED):
    return contract.envelope(contract.InstanceEvent(name, server, "port-1",
                                                    contract.COMPLETED, host), "test")


def test_an_announced_host_without_an_exchange_does_not_kill_the_session(bus, router):
    """Agent started before its host consumer: announced, no exchange yet."""
    bus.declare_host("cmp-real")
    _lifecycle(bus, contract.HostAnnounce("cmp-ghost", 1))
    ghost_server = str(uuid.uuid4())
    _lifecycle(bus, contract.LifecycleEvent(ghost_server, "cmp-ghost", "STARTED",
                                            2, 0, 2))
    wait_for(lambda: router.service.placement.hosts_for(ghost_server), 10,
             what="placement of the ghost host's instance")
    sessions = router.service.stats["sessions"]
    for _ in range(3):
        _publish(bus, bus.topology.ingress_exchange_name, _event(ghost_server))
        _publish(bus, bus.topology.ingress_exchange_name,
                 _event(ghost_server, host="cmp-ghost"))
    good = _event(str(uuid.uuid4()), host="cmp-real")
    _publish(bus, bus.topology.ingress_exchange_name, good)
    [m] = collect(bus.url, bus.topology.host_queue_name("cmp-real"), 1)
    assert m.properties["message_id"] == good.id
    # The ghost's copies come back (no queue bound for it) and their events
    # wait in the retry tiers; the session lives.
    wait_for(lambda: router.service.stats["returned"] >= 6, 10,
             what="ghost copies returned")
    assert router.service.stats["publish_channel_faults"] == 0
    assert router.service.stats["sessions"] == sessions
    assert router.service.ready.is_set()
    # Once the host's consumer declares its exchange and queue, they get there.
    bus.declare_host("cmp-ghost")
    got = collect(bus.url, bus.topology.host_queue_name("cmp-ghost"), 6, timeout=30)
    assert len(got) == 6


def test_upper_case_server_uuids_find_their_host(bus, router):
    bus.declare_host("cmp-case")
    server = str(uuid.uuid4())
    _lifecycle(bus, contract.LifecycleEvent(server.upper(), "cmp-case", "STARTED",
                                            2, 0, 1))
    wait_for(lambda: router.service.placement.hosts_for(server), 10,
             what="placement")
    env = _event(server.upper())
    _publish(bus, bus.topology.ingress_exchange_name, env)
    [m] = collect(bus.url, bus.topology.host_queue_name("cmp-case"), 1)
    assert contract.decode(m.body).payload.server_uuid == server
    assert router.service.placement.hosts_for(server.upper()) == ("cmp-case",)


def test_a_router_asks_the_agents_for_snapshots_when_it_connects(bus):
    bus.declare_central()
    with kombu.Connection(bus.url) as conn:
        ch = conn.channel()
        q = kombu.Queue(f"{bus.prefix}.test-control", kombu.Exchange(
            bus.topology.control_exchange_name, "fanout", no_declare=True),
            exclusive=True)(ch)
        q.declare()
        r = RunningRouter(bus, name="router-snap")
        try:
            msg = wait_for(lambda: q.get(no_ack=True), 10, what="a resync request")
            env = contract.decode(msg.body)
            assert env.kind == contract.RESYNC_REQUEST
            assert env.payload.router == "router-snap"
            assert r.service.placement.is_warming()
        finally:
            r.stop()


def test_a_host_snapshot_replaces_what_the_router_knew_of_the_host(bus, router):
    bus.declare_host("cmp-snap")
    gone, kept, new = (str(uuid.uuid4()) for _ in range(3))
    for n, server in enumerate((gone, kept), 1):
        _lifecycle(bus, contract.LifecycleEvent(server, "cmp-snap", "STARTED", 2, 0, n))
    wait_for(lambda: router.service.placement.hosts_for(kept), 10, what="placement")
    _lifecycle(bus, contract.HostSnapshot("cmp-snap", 3, ((kept, "PAUSED"),
                                                          (new, "STARTED"))))
    wait_for(lambda: router.service.placement.hosts_for(new), 10, what="snapshot")
    assert router.service.placement.hosts_for(gone) == ()
    assert router.service.placement.is_hostless(gone)
    assert router.service.placement.hosts_for(kept) == ("cmp-snap",)


def test_a_lingering_placement_queue_does_not_lock_the_router_out(bus):
    """A half-open old connection still holds the router's exclusive
    placement queue: the restarted router must consume at once anyway."""
    bus.declare_central()
    name = "router-fixed"
    with kombu.Connection(bus.url) as old:
        held = bus.topology.placement_queue(name)(old.channel())
        held.declare()
        r = RunningRouter(bus, name=name)
        try:
            assert r.service.ready.is_set()
        finally:
            r.stop()


def test_one_returned_copy_dead_letters_only_that_hosts_copy(bus):
    """cmp-noq has an exchange but no queue bound for it: its copy comes
    back, is parked for it, and is dead-lettered unknown-host after
    no_host_timeout; cmp-ok's copy of the same event stands."""
    bus.declare_central()
    bus.declare_host("cmp-ok")
    router = RunningRouter(bus, policy=single_user_policy(bus.url,
                                                          no_host_timeout=1.0))
    try:
        with kombu.Connection(bus.url) as conn:
            kombu.Exchange(bus.topology.host_exchange_name("cmp-noq"), "topic",
                           durable=True)(conn.channel()).declare()
        bus.own(exchanges=[bus.topology.host_exchange_name("cmp-noq")])
        server = str(uuid.uuid4())
        _lifecycle(bus, contract.LifecycleEvent(server, "cmp-noq", "STARTED", 2, 0, 1))
        wait_for(lambda: router.service.placement.hosts_for(server), 10,
                 what="placement")
        env = _event(server, host="cmp-ok")
        _publish(bus, bus.topology.ingress_exchange_name, env)
        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-ok"), 1)
        assert m.properties["message_id"] == env.id
        dead = get_dead_letter(bus)
        assert dead.headers[contract.HEADER_REASON] == contract.REASON_UNKNOWN_HOST
        assert dead.headers[HEADER_HOST] == "cmp-noq"
        wait_for(lambda: queue_depth(bus.url, bus.topology.router_queue_name) == 0,
                 5, what="nothing left in the router queue")
    finally:
        router.stop()


def test_health_says_why_the_router_cannot_connect(bus):
    import threading

    from compute.host_consumer import HostConsumer, HostConsumerSettings
    from router.service import RouterService, RouterSettings
    url = "rabbit://guest:guest@127.0.0.1:1/"      # nothing listens there
    svc = RouterService(RouterSettings(transport_url=url, topology=bus.topology))
    consumer = HostConsumer(HostConsumerSettings(host="cmp-x", transport_url=url,
                                                 topology=bus.topology),
                            lambda event, message_id: "held")
    threads = [threading.Thread(target=svc.run, daemon=True), consumer.start()]
    threads[0].start()
    try:
        for part in (svc, consumer):
            ok, why = wait_for(lambda p=part: (lambda h: h if h[1].startswith(
                "cannot connect") else None)(p.health()), 15, what="health")
            assert not ok and "refused" in why.lower(), why
    finally:
        svc.stop()
        consumer.stop()
        for t in threads:
            t.join(15)


def test_a_copy_the_broker_refuses_is_published_again_not_requeued(bus, router):
    """A nack (here: a full queue that rejects publishes, as a quorum queue
    without a leader does for a while) keeps the ingress message in hand
    and publishes the copy again; it never comes back as a redelivery to
    be counted towards poison."""
    host = "cmp-full"
    exchange = bus.topology.host_exchange_name(host)
    queue_name = bus.topology.host_queue_name(host)
    with kombu.Connection(bus.url) as conn:
        ch = conn.channel()
        kombu.Queue(queue_name, durable=True, bindings=[
            kombu.binding(kombu.Exchange(exchange, "topic", durable=True),
                          routing_key="instance.*"),
            kombu.binding(bus.topology.hosts_exchange(), routing_key=host)],
            queue_arguments={"x-max-length": 1,
                             "x-overflow": "reject-publish"})(ch).declare()
    bus.own(exchanges=[exchange], queues=[queue_name])
    first, second = _event(str(uuid.uuid4()), host=host), _event(str(uuid.uuid4()), host=host)
    _publish(bus, bus.topology.ingress_exchange_name, first)
    wait_for(lambda: queue_depth(bus.url, queue_name) == 1, 10, what="the queue full")
    _publish(bus, bus.topology.ingress_exchange_name, second)
    wait_for(lambda: router.service.stats["refused"] >= 2, 10, what="refusals")
    [m] = collect(bus.url, queue_name, 1)            # room for one more
    assert m.properties["message_id"] == first.id
    [m] = collect(bus.url, queue_name, 1, timeout=10)
    assert m.properties["message_id"] == second.id
    assert router.service.stats["redelivered"] == 0
    assert queue_depth(bus.url, bus.topology.probation_queue_name) == 0
    wait_for(lambda: queue_depth(bus.url, bus.topology.router_queue_name) == 0, 10,
             what="the ingress message acknowledged")
