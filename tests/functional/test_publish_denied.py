"""A fault on every publish is not charged to each message.

With the router user's write permission revoked (its connections left
open), every copy is refused with 403, whatever it is for. Handled per copy,
each ran out its refused_patience: the review's 45 s revocation
dead-lettered 30 of 30 events `refused`, a 70 s one dropped 10 of 10 (their
dead letters refused too). Now the router holds what it has (the prefetch
window, once full, stops its intake), tries again with backoff, one copy
first, and routes everything once it may publish again: nothing
dead-lettered, nothing dropped, one session.

A partial grant (everything but one host's exchange: a host fenced off by
permissions) is that host's trouble only. Held as a revoked permission, it
stalled every host for good: the probe was always the fenced host's copy,
and every new copy queued behind it (79 of 85 healthy events undelivered in
40 s in the review). Now a copy for another destination that passes proves
the denial partial: the other hosts' copies flow, the fenced host's are
parked and then dead-lettered `refused`.
"""

import re
import subprocess
import time
import uuid

import kombu
import pytest

from router.bus import contract, topology
from router.delivery import HEADER_HOST
from tests.conftest import RunningRouter, collect, queue_depth, wait_for
from tests.functional.rabbitmq_users import BrokerUsers
from tests.functional.waiter_harness import Publisher

pytestmark = pytest.mark.timeout(120)

HOST = "cmp-denied"
FENCED = "cmp-fenced"


class _Bus:
    """Enough of tests.conftest.Bus for Publisher, in a vhost of its own."""

    def __init__(self, url, topo):
        self.url, self.topology = url, topo


def _permit(vhost, user, write):
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user,
                    ".*", write, ".*"], check=True, timeout=60,
                   capture_output=True)


def _lost(stats):
    """What the fault cost: events dropped or dead-lettered for refusals."""
    return [k for k, n in stats.items() if n and (
        k.startswith("dropped:") or k == "dead_lettered:refused")]


def test_a_revoked_write_permission_holds_events_and_loses_none():
    tag = uuid.uuid4().hex[:8]
    vhost, user = f"evt-denied-{tag}", f"evt-denied-{tag}-router"
    users = BrokerUsers(vhost, {user: ("pw", ".*", ".*", ".*")})
    topo = topology.Topology(prefix=f"evt-denied-{tag}")
    admin = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    router = publisher = None
    try:
        with kombu.Connection(admin) as conn:
            topology.declare(conn.channel(), *topo.central())
            topology.declare(conn.channel(), *topo.for_host(HOST))
        router = RunningRouter(_Bus(users.url(user), topo),
                               refused_patience=2.0, refused_hold=0.5)
        publisher = Publisher(_Bus(admin, topo))
        first = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
            contract.COMPLETED, HOST), "test")
        publisher.to_ingress(first)
        [m] = collect(admin, topo.host_queue_name(HOST), 1)
        _permit(vhost, user, "^$")          # revoked, connections left open
        # A channel checks a permission once per destination: the publish
        # channel, which wrote to the host exchange already, would go on.
        # An event for a host nobody knows is parked: a write to the
        # default exchange, checked now, refused, and every channel after
        # that one is refused outright, as in the review.
        publisher.to_ingress(contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
            contract.COMPLETED, "cmp-nowhere"), "test"))
        held = [contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
            contract.COMPLETED, HOST), "test") for _ in range(20)]
        for env in held:
            publisher.to_ingress(env)
        stats = router.service.stats
        wait_for(lambda: stats["in"] >= 22, 10, what="the router took them all")
        time.sleep(3 * 2.0)     # three patiences: the fault under test lasts
        assert not _lost(stats), dict(stats)
        assert stats["publish_denied"] >= 1
        _permit(vhost, user, ".*")
        got = collect(admin, topo.host_queue_name(HOST), 20, timeout=20)
        assert sorted(m.properties["message_id"] for m in got) == sorted(
            e.id for e in held)
        assert not _lost(stats), dict(stats)
        assert stats["sessions"] == 1
    finally:
        if publisher is not None:
            publisher.close()
        if router is not None:
            router.stop()
        users.remove()


def _event(host):
    return contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
        contract.COMPLETED, host), "test")


def test_a_partial_write_grant_costs_only_the_denied_hosts_events():
    tag = uuid.uuid4().hex[:8]
    vhost, user = f"evt-fenced-{tag}", f"evt-fenced-{tag}-router"
    topo = topology.Topology(prefix=f"evt-fenced-{tag}")
    # Everything but the fenced host's exchange.
    write = f"^(?!{re.escape(topo.host_exchange_name(FENCED))}$).*"
    users = BrokerUsers(vhost, {user: ("pw", ".*", write, ".*")})
    admin = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    router = publisher = None
    try:
        with kombu.Connection(admin) as conn:
            topology.declare(conn.channel(), *topo.central())
            for host in (HOST, FENCED):
                topology.declare(conn.channel(), *topo.for_host(host))
        router = RunningRouter(_Bus(users.url(user), topo),
                               refused_patience=2.0, refused_hold=0.5)
        publisher = Publisher(_Bus(admin, topo))
        fenced = _event(FENCED)
        publisher.to_ingress(fenced)
        stats = router.service.stats
        wait_for(lambda: stats["publish_denied"] >= 1, 10,
                 what="the fenced host's copy denied")
        # Every healthy event arrives in time, one at a time, while the
        # fenced host's copy is held, parked and tried again.
        for _ in range(8):
            env = _event(HOST)
            publisher.to_ingress(env)
            got = collect(admin, topo.host_queue_name(HOST), 1, timeout=2.0)
            assert [m.properties["message_id"] for m in got] == [env.id], \
                dict(stats)
            time.sleep(0.1)
        # Parked, then dead-lettered refused, naming its host.
        [dead] = collect(admin, topo.dead_letter_queue_name, 1, timeout=20)
        assert dead.properties["message_id"] == fenced.id
        assert dead.headers[contract.HEADER_REASON] == "refused"
        assert dead.headers[HEADER_HOST] == FENCED
        assert not collect(admin, topo.host_queue_name(FENCED), 1, timeout=0.2)
        assert stats["parked:refused"] >= 1, dict(stats)
        assert not [k for k in stats if k.startswith("dropped:")], dict(stats)
        assert stats["sessions"] == 1
        # One more after it: still prompt.
        env = _event(HOST)
        publisher.to_ingress(env)
        got = collect(admin, topo.host_queue_name(HOST), 1, timeout=2.0)
        assert [m.properties["message_id"] for m in got] == [env.id]
        # Nothing in hand: the router stops at once.
        started = time.monotonic()
        router.stop(timeout=3)
        router = None
        assert time.monotonic() - started < 3
    finally:
        if publisher is not None:
            publisher.close()
        if router is not None:
            router.stop()
        users.remove()


def test_a_router_holding_denied_events_stops_at_once_and_keeps_them():
    """Nothing held goes out by waiting: stop() does not wait drain_timeout
    (10 s), and the broker has the events back in the router's queue."""
    tag = uuid.uuid4().hex[:8]
    vhost, user = f"evt-denied-{tag}", f"evt-denied-{tag}-router"
    users = BrokerUsers(vhost, {user: ("pw", ".*", ".*", ".*")})
    topo = topology.Topology(prefix=f"evt-denied-{tag}")
    admin = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    router = publisher = None
    try:
        with kombu.Connection(admin) as conn:
            topology.declare(conn.channel(), *topo.central())
            topology.declare(conn.channel(), *topo.for_host(HOST))
        router = RunningRouter(_Bus(users.url(user), topo),
                               refused_patience=2.0, refused_hold=0.5)
        publisher = Publisher(_Bus(admin, topo))
        _permit(vhost, user, "^$")      # before its first publish
        for _ in range(3):
            publisher.to_ingress(_event(HOST))
        stats = router.service.stats
        wait_for(lambda: stats["in"] >= 3 and stats["publish_denied"] >= 1,
                 10, what="the events taken and held")
        started = time.monotonic()
        router.stop(timeout=5)
        router = None
        assert time.monotonic() - started < 3
        wait_for(lambda: queue_depth(admin, topo.router_queue_name) == 3, 5,
                 what="the held events back in the router queue")
    finally:
        if publisher is not None:
            publisher.close()
        if router is not None:
            router.stop()
        users.remove()


def test_a_denied_dead_letter_exchange_costs_only_the_dead_letters():
    """A central destination denied: its copies are refused with backoff
    and given up after patience (a dead letter: dropped, said at ERROR);
    every host's events go on."""
    tag = uuid.uuid4().hex[:8]
    vhost, user = f"evt-nodlx-{tag}", f"evt-nodlx-{tag}-router"
    topo = topology.Topology(prefix=f"evt-nodlx-{tag}")
    users = BrokerUsers(vhost, {user: ("pw", ".*", ".*", ".*")})
    admin = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    router = publisher = None
    try:
        with kombu.Connection(admin) as conn:
            topology.declare(conn.channel(), *topo.central())
            topology.declare(conn.channel(), *topo.for_host(HOST))
        router = RunningRouter(_Bus(users.url(user), topo),
                               refused_patience=2.0, refused_hold=0.5)
        publisher = Publisher(_Bus(admin, topo))
        # Not at the start: the dead-letter queue, bound then, has its name.
        _permit(vhost, user,
                f"^(?!{re.escape(topo.dead_letter_exchange_name)}$).*")
        publisher._blocking.publish(
            topo.ingress_exchange_name,
            topology.instance_routing_key(contract.VIF_PLUGGED),
            b"not json", message_id="malformed-1")
        stats = router.service.stats
        wait_for(lambda: stats["publish_denied"] >= 1, 10,
                 what="the dead letter denied")
        for _ in range(6):
            env = _event(HOST)
            publisher.to_ingress(env)
            got = collect(admin, topo.host_queue_name(HOST), 1, timeout=2.0)
            assert [m.properties["message_id"] for m in got] == [env.id], \
                dict(stats)
            time.sleep(0.1)
        wait_for(lambda: stats["dropped:malformed"] == 1, 15,
                 what="the dead letter given up")
        assert stats["sessions"] == 1
        assert queue_depth(admin, topo.router_queue_name) == 0
        started = time.monotonic()
        router.stop(timeout=3)
        router = None
        assert time.monotonic() - started < 3
    finally:
        if publisher is not None:
            publisher.close()
        if router is not None:
            router.stop()
        users.remove()


def test_a_router_holding_only_copies_for_a_denied_destination_stops_at_once():
    """A dead letter refused by its denied exchange, patience 30 s to go:
    stop() does not wait drain_timeout (10 s) for it."""
    tag = uuid.uuid4().hex[:8]
    vhost, user = f"evt-nodlx-{tag}", f"evt-nodlx-{tag}-router"
    users = BrokerUsers(vhost, {user: ("pw", ".*", ".*", ".*")})
    topo = topology.Topology(prefix=f"evt-nodlx-{tag}")
    admin = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    router = publisher = None
    try:
        with kombu.Connection(admin) as conn:
            topology.declare(conn.channel(), *topo.central())
            topology.declare(conn.channel(), *topo.for_host(HOST))
        router = RunningRouter(_Bus(users.url(user), topo),
                               refused_patience=30.0, refused_hold=0.5)
        publisher = Publisher(_Bus(admin, topo))
        _permit(vhost, user,
                f"^(?!{re.escape(topo.dead_letter_exchange_name)}$).*")
        publisher._blocking.publish(
            topo.ingress_exchange_name,
            topology.instance_routing_key(contract.VIF_PLUGGED),
            b"not json", message_id="malformed-1")
        stats = router.service.stats
        wait_for(lambda: stats["publish_denied"] >= 1, 10,
                 what="the dead letter denied")
        env = _event(HOST)      # passes: the grant is partial
        publisher.to_ingress(env)
        assert collect(admin, topo.host_queue_name(HOST), 1, timeout=2.0)
        wait_for(lambda: stats["refused"] >= 1, 10,
                 what="the dead letter refused by its destination")
        started = time.monotonic()
        router.stop(timeout=5)
        router = None
        assert time.monotonic() - started < 3
        assert not [k for k in stats if k.startswith("dropped:")], dict(stats)
        # Its ingress message is the broker's again (and the healthy one's
        # too, if its ack waited behind it: acknowledgements go in order).
        wait_for(lambda: queue_depth(admin, topo.router_queue_name) >= 1, 5,
                 what="the malformed message back in the router queue")
    finally:
        if publisher is not None:
            publisher.close()
        if router is not None:
            router.stop()
        users.remove()
