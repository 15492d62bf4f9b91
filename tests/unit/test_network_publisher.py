"""The publisher without a broker: kombu's memory transport and a dead port.

What needs RabbitMQ (confirms, user_id, the router) is in
tests/functional/test_network_publisher.py.
"""

import threading
import time
import uuid

import kombu
import pytest

from network.publisher import BrokerUnavailable, InstanceEventPublisher, PublisherSettings, Receipt
from network.spool import Spool, SpoolFull
from router.bus import contract, topology
from router.bus.topology import Topology

DEAD = "amqp://guest:guest@127.0.0.1:1//"
SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"


def event(i=0, name=contract.VIF_PLUGGED):
    return contract.InstanceEvent(name, SERVER, f"port-{i}", host="compute-1")


@pytest.fixture
def memory_bus():
    """A topology under a unique prefix on the in-process transport."""
    topo = Topology(prefix=f"unit-{uuid.uuid4().hex[:8]}")
    conn = kombu.Connection("memory://")
    ch = conn.channel()
    topology.declare(ch, *topo.central())

    def received():
        out = []
        while True:
            m = ch.basic_get(topo.router_queue_name, no_ack=True)
            if m is None:
                return out
            out.append(m)
    yield topo, received
    conn.release()


def settings(topo, url="memory://", **kw):
    kw.setdefault("retry_for", 0.2)
    kw.setdefault("connect_timeout", 0.5)
    return PublisherSettings(transport_url=url, topology=topo, producer="unit",
                             **kw)


def test_publish_returns_a_receipt_once_handed_to_the_transport(memory_bus):
    topo, received = memory_bus
    with InstanceEventPublisher(settings(topo)) as pub:
        receipt = pub.publish(event(1))
    assert receipt == Receipt(receipt.message_id, spooled=False)
    [m] = received()
    assert m.delivery_info["routing_key"] == "instance.network-vif-plugged"
    assert m.properties["message_id"] == receipt.message_id
    assert m.properties["delivery_mode"] == 2
    env = contract.decode(m.body)
    assert env.id == receipt.message_id and env.payload == event(1)
    assert env.producer == "unit"


def test_concurrent_callers_keep_their_own_order(memory_bus):
    topo, received = memory_bus
    with InstanceEventPublisher(settings(topo)) as pub:
        def caller(t):
            for i in range(40):
                pub.publish(contract.InstanceEvent(
                    contract.VIF_PLUGGED, SERVER, f"t{t}-{i}"))
        threads = [threading.Thread(target=caller, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
    tags = [contract.decode(m.body).payload.tag for m in received()]
    assert len(tags) == 240 and len(set(tags)) == 240
    for t in range(6):
        mine = [tag for tag in tags if tag.startswith(f"t{t}-")]
        assert mine == [f"t{t}-{i}" for i in range(40)]


def test_an_event_the_contract_refuses_is_refused_before_any_io(tmp_path):
    with InstanceEventPublisher(settings(Topology(), DEAD,
                                         spool_path=tmp_path / "s")) as pub:
        with pytest.raises(contract.ContractError, match="server_uuid"):
            pub.publish(contract.InstanceEvent(contract.VIF_PLUGGED, "nope"))
        with pytest.raises(contract.ContractError, match="tag"):
            pub.publish(contract.InstanceEvent("power-update", SERVER))
        assert pub.spooled == 0


def test_without_a_spool_an_unreachable_broker_is_an_error():
    with InstanceEventPublisher(settings(Topology(), DEAD)) as pub:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="127.0.0.1:1"):
            pub.publish(event())
        assert time.monotonic() - started < 5
        assert pub.stats["failed"] == 1


def test_unreachable_broker_spools_in_order_and_a_restart_drains(
        tmp_path, memory_bus):
    topo, received = memory_bus
    spool_path = tmp_path / "spool"
    with InstanceEventPublisher(settings(topo, DEAD,
                                         spool_path=spool_path)) as pub:
        receipts = [pub.publish(event(i)) for i in range(5)]
        assert all(r.spooled for r in receipts)
        assert pub.spooled == 5
    # The publishing process is gone; its spool is on disk.
    s = Spool(spool_path)
    assert [contract.decode(r.body).id for r in s.peek(10)] == [
        r.message_id for r in receipts]
    s.close()
    with InstanceEventPublisher(settings(topo, spool_path=spool_path)) as pub:
        assert pub.wait_drained(10)
        later = pub.publish(event(5))
        assert not later.spooled
    ids = [m.properties["message_id"] for m in received()]
    assert ids == [r.message_id for r in receipts] + [later.message_id]
    assert Spool(spool_path).peek(10) == []


def test_a_full_spool_is_an_error_not_a_silent_drop(tmp_path):
    with InstanceEventPublisher(settings(Topology(), DEAD,
                                         spool_path=tmp_path / "s",
                                         spool_max_records=2)) as pub:
        pub.publish(event(1))
        pub.publish(event(2))
        with pytest.raises(SpoolFull):
            pub.publish(event(3))
        assert pub.spooled == 2
        assert pub.stats == {"sent": 0, "spooled": 2, "drained": 0,
                             "failed": 1, "set_aside": 0}


def test_publish_needs_a_running_publisher(memory_bus):
    pub = InstanceEventPublisher(settings(memory_bus[0]))
    with pytest.raises(RuntimeError):
        pub.publish(event())
    pub.start()
    pub.close()
    with pytest.raises(RuntimeError):
        pub.publish(event())
