"""One message, one fault: what a message or a broker object does to the
router costs no more than its blast radius (README, "Fault model").

Each test injects one failure class against the real broker and checks the
invariants around it: the router keeps its one session (no reconnect, no
redelivery), the innocent events beside it are delivered exactly once, and
the message at fault ends in the dead-letter queue with a reason, or is
dropped and counted when even that cannot be placed.
"""

import subprocess
import time
import uuid

import amqp.exceptions
import kombu
import pytest

from router.bus import contract
from router.bus.inbound import HEADER_CUT
from router.delivery import HEADER_HOST, REASON_REFUSED
from tests.conftest import (
    REJECT_ALL,
    RunningRouter,
    collect,
    collect_ids,
    queue_depth,
    rabbitmqctl,
    wait_for,
)
from tests.functional import poison
from tests.functional.waiter_harness import Publisher

pytestmark = pytest.mark.timeout(120)

HOST, OTHER = "cmp-one", "cmp-two"


# Headers that fit in the frame they arrive in but not, re-encoded by
# py-amqp, in the dead-letter copy's (frame_max 131,072).
INFLATING = {
    "long-string": poison.raw_string_entry(b"pad", "A" * 130_950),
    "byte-ints": poison.raw_array_entry(b"pad", b"b", [1] * 30_000),
    "floats": poison.raw_array_entry(b"pad", b"f", [1.5] * 20_000),
}


def _good(host):
    return contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1", contract.COMPLETED,
        host), "test")


def _exists(bus, queue):
    try:
        queue_depth(bus.url, queue)
    except amqp.exceptions.NotFound:
        return False
    return True


def _dead_letters(bus, count, timeout=20.0):
    return collect(bus.url, bus.topology.dead_letter_queue_name, count, timeout)




@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("case", sorted(INFLATING))
def test_a_message_whose_dead_letter_would_not_fit_a_frame(case, queue_type):
    from tests.conftest import BROKER_URL, Bus
    bus = Bus(BROKER_URL, queue_type=queue_type)
    try:
        bus.declare_central()
        bus.declare_host(HOST)
        router = RunningRouter(bus)
        publisher, raw = Publisher(bus), poison.RawPublisher(bus.url)
        try:
            before = [_good(HOST) for _ in range(10)]
            after = [_good(HOST) for _ in range(10)]
            for env in before:
                publisher.to_ingress(env)
            raw.publish_raw(bus.topology.ingress_exchange_name,
                            "instance.network-vif-plugged", b"not json",
                            poison.raw_properties(message_id=b"inflating",
                                                  headers=INFLATING[case]))
            for env in after:
                publisher.to_ingress(env)
            queue = bus.topology.host_queue_name(HOST)
            got = collect_ids(bus.url, queue, {e.id for e in before + after},
                              timeout=15)
            [dead] = _dead_letters(bus, 1)
            # Each good event once, and nothing else reached the host (a copy
            # of the inflating message would be in `got` or left queued).
            assert sorted(m.properties["message_id"] for m in got) == sorted(
                e.id for e in before + after)
            assert queue_depth(bus.url, queue) == 0
            assert dead.properties["message_id"] == "inflating"
            assert dead.headers[contract.HEADER_REASON] == contract.REASON_MALFORMED
            assert "pad" in dead.headers[HEADER_CUT]
            stats = router.service.stats
            assert stats["sessions"] == 1 and stats["redelivered"] == 0
        finally:
            raw.close()
            publisher.close()
            router.stop()
    finally:
        bus.cleanup()


def test_a_host_queue_deleted_costs_only_its_copies(bus):
    """A host's queue (and exchange) deleted under a routing router: its
    copies come back as returns on an open channel and are parked for it;
    the other host's events flow, no channel is closed, nothing is
    redelivered; once the host is declared again every parked copy
    arrives. (Before the hosts exchange, a deleted host exchange closed the
    publish channel and sent every copy in flight through quarantine.)"""
    bus.declare_central()
    bus.declare_host(HOST)
    bus.declare_host(OTHER)
    router = RunningRouter(bus)
    publisher = Publisher(bus)
    try:
        warm = [_good(HOST), _good(OTHER)]
        for env in warm:
            publisher.to_ingress(env)
        assert len(collect(bus.url, bus.topology.host_queue_name(HOST), 1)) == 1
        assert len(collect(bus.url, bus.topology.host_queue_name(OTHER), 1)) == 1
        ch = bus.channel()
        ch.queue_delete(bus.topology.host_queue_name(HOST))
        ch.exchange_delete(bus.topology.host_exchange_name(HOST))
        mine = [_good(HOST) for _ in range(10)]
        others = [_good(OTHER) for _ in range(10)]
        for a, b in zip(mine, others, strict=True):
            publisher.to_ingress(a)
            publisher.to_ingress(b)
        got = collect(bus.url, bus.topology.host_queue_name(OTHER), 10, timeout=8)
        assert sorted(m.properties["message_id"] for m in got) == sorted(
            e.id for e in others)
        stats = router.service.stats
        wait_for(lambda: stats["returned"] >= 10, 10,
                 what="every copy for the deleted host returned")
        assert stats["sessions"] == 1 and stats["redelivered"] == 0
        assert stats["publish_channel_faults"] == 0 and stats["quarantined"] == 0
        assert queue_depth(bus.url, bus.topology.dead_letter_queue_name) == 0
        bus.declare_host(HOST)
        back = collect_ids(bus.url, bus.topology.host_queue_name(HOST),
                           {e.id for e in mine}, timeout=40)
        back_ids = [m.properties["message_id"] for m in back]
        assert sorted(back_ids) == sorted(e.id for e in mine), "each once"
    finally:
        publisher.close()
        router.stop()


def test_a_dead_letter_queue_that_refuses_everything_stops_nothing(bus, policy):
    """Four malformed messages at prefetch 4, their dead letters refused: each
    is dropped and counted after the patience, and routing goes on. Dropped
    is acknowledged: no dead letter without our reason appears (a queue of
    the test's own on the dead-letter fanout sees what the broker routes)."""
    bus.declare_central()
    bus.declare_host(HOST)
    observer = f"{bus.prefix}.observer"
    bus.channel().queue_declare(observer, durable=True, auto_delete=False)
    bus.channel().queue_bind(observer, bus.topology.dead_letter_exchange_name)
    bus.own(queues=[observer])
    policy(bus.topology.dead_letter_queue_name, REJECT_ALL)
    router = RunningRouter(bus, prefetch=4, refused_patience=1.0)
    publisher, raw = Publisher(bus), poison.RawPublisher(bus.url)
    try:
        for i in range(4):
            raw.publish(bus.topology.ingress_exchange_name,
                        "instance.network-vif-plugged", b"not json",
                        message_id=f"bad-{i}")
        good = [_good(HOST) for _ in range(10)]
        for env in good:
            publisher.to_ingress(env)
        got = collect(bus.url, bus.topology.host_queue_name(HOST), 10, timeout=15)
        assert len(got) == 10
        stats = router.service.stats
        wait_for(lambda: stats["dropped:malformed"] == 4, 10,
                 what="four refused dead letters dropped")
        assert stats["sessions"] == 1
        seen = collect(bus.url, observer, 100, timeout=2)
        assert seen and all(contract.HEADER_REASON in m.headers for m in seen), \
            [m.headers for m in seen]
    finally:
        raw.close()
        publisher.close()
        router.stop()


def test_a_host_queue_refusing_copies_gets_them_dead_lettered_for_it(bus, policy):
    bus.declare_central()
    bus.declare_host(HOST)
    bus.declare_host(OTHER)
    policy(bus.topology.host_queue_name(HOST), REJECT_ALL)
    router = RunningRouter(bus, refused_patience=1.0)
    publisher = Publisher(bus)
    try:
        refused, fine = _good(HOST), _good(OTHER)
        publisher.to_ingress(refused)
        publisher.to_ingress(fine)
        [m] = collect(bus.url, bus.topology.host_queue_name(OTHER), 1)
        assert m.properties["message_id"] == fine.id
        [dead] = _dead_letters(bus, 1)
        assert dead.properties["message_id"] == refused.id
        assert dead.headers[contract.HEADER_REASON] == REASON_REFUSED
        assert dead.headers[HEADER_HOST] == HOST
        assert router.service.stats["sessions"] == 1
    finally:
        publisher.close()
        router.stop()


def test_a_refused_copy_is_delivered_once_the_refusal_ends(bus, policy):
    bus.declare_central()
    bus.declare_host(HOST)
    name = policy(bus.topology.host_queue_name(HOST), REJECT_ALL)
    router = RunningRouter(bus, refused_patience=30.0)
    publisher = Publisher(bus)
    try:
        env = _good(HOST)
        publisher.to_ingress(env)
        wait_for(lambda: router.service.stats["refused"] >= 2, 10,
                 what="the copy refused twice")
        rabbitmqctl("clear_policy", name)
        [m] = collect(bus.url, bus.topology.host_queue_name(HOST), 1, timeout=15)
        assert m.properties["message_id"] == env.id
        assert router.service.stats["sessions"] == 1
    finally:
        publisher.close()
        router.stop()


def _routes_in_the_same_session(bus, router, publisher):
    """A good event still reaches its host, and the router never needed a
    new session for the fault."""
    env = _good(HOST)
    publisher.to_ingress(env)
    [m] = collect(bus.url, bus.topology.host_queue_name(HOST), 1)
    assert m.properties["message_id"] == env.id
    assert router.service.stats["sessions"] == 1


@pytest.mark.parametrize("queue", ["router", "probation", "placement"])
def test_a_consumed_queue_deleted_under_the_router(bus, queue):
    """The broker cancels the consumer: the router declares the queue again
    (or a new placement queue, and asks for snapshots) and goes on."""
    bus.declare_central()
    bus.declare_host(HOST)
    router = RunningRouter(bus)
    publisher = Publisher(bus)
    try:
        if queue == "placement":
            [name] = [q for q in _queues(bus) if ".placement." in q]
        else:
            name = getattr(bus.topology, f"{queue}_queue_name")
        rabbitmqctl("delete_queue", name)      # as an operator would
        faults = ("placement_channel_faults" if queue == "placement"
                  else "lane_channel_faults")
        wait_for(lambda: router.service.stats[faults] >= 1, 10,
                 what="the router noticed the cancelled consumer")
        if queue == "placement":
            wait_for(lambda: [q for q in _queues(bus)
                              if ".placement." in q and q != name], 10,
                     what="a new placement queue")
        else:
            wait_for(lambda: _consumers(bus, name), 10,
                     what=f"the {queue} queue consumed again")
        _routes_in_the_same_session(bus, router, publisher)
        assert router.service.ready.is_set()
    finally:
        publisher.close()
        router.stop()


@pytest.mark.parametrize("queue", ["router", "probation"])
def test_a_consumed_queue_deleted_without_a_cancel(bus, queue, monkeypatch):
    """RabbitMQ 3.10 does not always cancel the consumers of a deleted
    quorum queue (1 deletion in 10 on the test cluster): here the cancel
    never arrives. The idle lane finds its queue gone by asking for it
    (router/bus/consuming.py), declares it again and consumes."""
    from router.bus import transport
    monkeypatch.setattr(transport.Channel, "_on_basic_cancel",
                        lambda self, consumer_tag: None)
    bus.declare_central()
    bus.declare_host(HOST)
    router = RunningRouter(bus, consume_check=0.3)
    publisher = Publisher(bus)
    try:
        time.sleep(1.0)             # idle and consuming: checked, nothing ends
        assert router.service.stats["lane_channel_faults"] == 0
        name = getattr(bus.topology, f"{queue}_queue_name")
        bus.channel().queue_delete(name)
        wait_for(lambda: router.service.stats["lane_channel_faults"] >= 1, 10,
                 what="the router noticed its queue gone")
        wait_for(lambda: _consumers(bus, name), 10,
                 what=f"the {queue} queue consumed again")
        _routes_in_the_same_session(bus, router, publisher)
    finally:
        publisher.close()
        router.stop()


def _queues(bus):
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"],
                         check=True, capture_output=True, text=True, timeout=60)
    return [line.strip() for line in out.stdout.splitlines()
            if line.startswith(bus.prefix)]


def _consumers(bus, name):
    with kombu.Connection(bus.url) as conn:
        try:
            return conn.channel().queue_declare(name, passive=True).consumer_count
        except conn.channel_errors:
            return 0


def _ids_at(bus, host, count, timeout):
    """The ids of `count` messages at the host's queue, and of any more that
    came within a second after (duplicates)."""
    queue = bus.topology.host_queue_name(host)
    got = collect(bus.url, queue, count, timeout)
    if len(got) == count:
        got += collect(bus.url, queue, 1, 1.0)
    return [m.properties["message_id"] for m in got]


def test_a_host_that_refuses_everything_holds_up_no_other_host(bus, policy):
    """A host queue that refuses every copy (a compromised host's own
    max-length 0, an operator's policy) once held each of its copies' ingress
    messages for the whole refused_patience, and with them the prefetch
    window every host shares: 8 slots, 40 refused events, and the other
    host's events waited 5 x patience. Now a refused host copy is parked
    for its host after refused_hold, the slot freed; it comes back for that
    host alone and is delivered, once, when the refusal ends."""
    bus.declare_central()
    bus.declare_host(HOST)
    bus.declare_host(OTHER)
    name = policy(bus.topology.host_queue_name(HOST), REJECT_ALL)
    router = RunningRouter(bus, prefetch=8, refused_patience=60.0,
                           refused_hold=0.25)
    publisher = Publisher(bus)
    try:
        held = [_good(HOST) for _ in range(40)]
        for env in held:
            publisher.to_ingress(env)
        innocent = [_good(OTHER) for _ in range(10)]
        sent = time.monotonic()
        for env in innocent:
            publisher.to_ingress(env)
        got = _ids_at(bus, OTHER, 10, timeout=20)
        took = time.monotonic() - sent
        assert sorted(got) == sorted(e.id for e in innocent)
        assert took < 10, f"the other host's events took {took:.1f}s"
        assert router.service.stats["parked:refused"] >= 40
        rabbitmqctl("clear_policy", name)
        got = _ids_at(bus, HOST, 40, timeout=30)
        assert sorted(got) == sorted(e.id for e in held)
        assert router.service.stats["sessions"] == 1
        assert queue_depth(bus.url, bus.topology.dead_letter_queue_name) == 0
    finally:
        publisher.close()
        router.stop()


def test_a_host_exchange_made_internal_costs_nothing(bus):
    """A compromised host may declare its own exchange internal. Before the
    hosts exchange every publish to it closed the router's publish channel
    (403), and the review's run duplicated 237 to 261 of 300 other hosts'
    events through quarantine; then that host's copies were parked and
    dead-lettered. Now the router never publishes there: its queue is bound
    to the hosts exchange, which no host may configure. Every event of
    both hosts arrives once, and no channel is closed."""
    bus.declare_central()
    bus.declare_host(HOST)
    bus.declare_host(OTHER)
    ch = bus.conn.default_channel
    exchange = bus.topology.host_exchange_name(HOST)
    ch.exchange_delete(exchange)
    poison.declare_internal_exchange(ch, exchange)
    ch.queue_bind(bus.topology.host_queue_name(HOST), exchange, "#")
    router = RunningRouter(bus, refused_patience=1.0, refused_hold=0.5)
    publisher = Publisher(bus)
    try:
        theirs = [_good(HOST) for _ in range(30)]
        innocent = [_good(OTHER) for _ in range(30)]
        for a, b in zip(theirs, innocent, strict=True):
            publisher.to_ingress(a)
            publisher.to_ingress(b)
        assert sorted(_ids_at(bus, OTHER, 30, timeout=10)) == sorted(
            e.id for e in innocent)
        assert sorted(_ids_at(bus, HOST, 30, timeout=10)) == sorted(
            e.id for e in theirs)
        stats = router.service.stats
        assert stats["publish_channel_faults"] == 0 and stats["refused"] == 0
        assert stats["sessions"] == 1
        assert queue_depth(bus.url, bus.topology.dead_letter_queue_name) == 0
    finally:
        publisher.close()
        router.stop()


@pytest.mark.parametrize("gone", ["retry-queue", "dead-letter-queue",
                                  "dead-letter-exchange"])
def test_a_central_object_an_operator_deleted_is_declared_again(bus, gone):
    """The router publishes to the retry queues and the dead-letter exchange
    and queue without consuming from them, so no cancel tells it they are
    gone; it declared them at session start only, and an operator's delete
    lost every event parked and every dead letter until it restarted (the
    review: 0 of 5 parked events, 3 of 3 dead letters). A return or a 404
    on one now has the router declare the central topology again, within
    the same session, and the copy goes through."""
    bus.declare_central()
    topo = bus.topology
    router = RunningRouter(bus, refused_patience=15.0)
    raw = poison.RawPublisher(bus.url)
    publisher = Publisher(bus)
    try:
        ch = bus.channel()
        if gone == "retry-queue":
            ch.queue_delete(topo.retry_queue_name(topo.retry_delay_ms(1)))
            late = "cmp-late"
            env = contract.envelope(contract.InstanceEvent(
                contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
                contract.COMPLETED, late), "test")
            publisher.to_ingress(env)       # its host is unknown: parked
            wait_for(lambda: router.service.stats["topology_repairs"] >= 1, 10,
                     what="the central topology declared again")
            bus.declare_host(late)
            [m] = collect(bus.url, topo.host_queue_name(late), 1, timeout=20)
            assert m.properties["message_id"] == env.id
        else:
            if gone == "dead-letter-queue":
                ch.queue_delete(topo.dead_letter_queue_name)
            else:
                ch.exchange_delete(topo.dead_letter_exchange_name)
            for i in range(3):
                raw.publish(topo.ingress_exchange_name,
                            "instance.network-vif-plugged", b"not json",
                            message_id=f"bad-{i}")
            # Read once the router has declared it again: a consumer of the
            # deleted queue would be refused (404) before that. The repair
            # is counted as it starts, so wait for the queue itself.
            wait_for(lambda: _exists(bus, topo.dead_letter_queue_name), 10,
                     what="the dead-letter queue declared again")
            dead = _dead_letters(bus, 3, timeout=15)
            assert sorted(m.properties["message_id"] for m in dead) == [
                "bad-0", "bad-1", "bad-2"]
            assert {m.headers[contract.HEADER_REASON] for m in dead} == {
                contract.REASON_MALFORMED}
            # The broker vouches for who said so (the router's user).
            assert {m.properties.get("user_id") for m in dead} == {
                kombu.Connection(bus.url).userid}
        stats = router.service.stats
        assert stats["topology_repairs"] >= 1
        assert not [k for k in stats if k.startswith("dropped:")], dict(stats)
        assert stats["sessions"] == 1
    finally:
        publisher.close()
        raw.close()
        router.stop()
