"""The notification adapter on the real broker: bad notifications are
dropped once and the next good one flows (issue 10); a notification
delivered twice publishes the same message ids (issue 11, item 7)."""

import contextlib
import json
import uuid

import kombu
import pytest

from network.adapter import AdapterSettings, NetworkAdapter
from network.publisher import InstanceEventPublisher, PublisherSettings
from tests.conftest import wait_for
from tests.functional.test_network_adapter import (  # noqa: F401
    HOST,
    OSLO_URL,
    _queue_exists,
    emit_lifecycle,
    expected,
    network_service,
    port,
)
from tests.functional.test_network_publisher import host_events


@contextlib.contextmanager
def running_adapter(bus, names):
    with InstanceEventPublisher(PublisherSettings(
            transport_url=bus.url, topology=bus.topology)) as publisher:
        svc = NetworkAdapter(AdapterSettings(
            transport_url=OSLO_URL, exchange=names["exchange"],
            topics=(names["topic"],), pool=names["pool"], requeue_delay=0.1),
            publisher.publish).start()
        wait_for(lambda: _queue_exists(bus, names["pool"]), timeout=15,
                 what="the adapter's pool queue")
        try:
            yield svc
        finally:
            svc.stop()


@pytest.fixture
def adapter(bus, router, network_service):  # noqa: F811
    notifier, names = network_service
    bus.declare_host(HOST)
    with running_adapter(bus, names) as svc:
        yield svc, notifier, names


def send_raw(bus, names, message, priority="info"):
    """A notification as oslo.messaging's driver puts it on the wire (the
    2.0 envelope), written by hand so it can be anything."""
    body = {"oslo.version": "2.0", "oslo.message": json.dumps(message)}
    with kombu.Connection(bus.url) as conn:
        kombu.Producer(conn.channel()).publish(
            body, exchange=names["exchange"],
            routing_key=f"{names['topic']}.{priority}",
            serializer="json", delivery_mode=2)


def notification(server, status, message_id, **port_kw):
    return {"message_id": message_id, "publisher_id": "network.controller-1",
            "event_type": "port.update.end", "priority": "INFO",
            "payload": {"port": port(server, status, **port_kw)},
            "timestamp": "2026-01-01 00:00:00.000000", "_context_user_id": "u"}


def queue_depth(bus, name):
    ch = bus.conn.channel()
    try:
        return ch.queue_declare(name, passive=True).message_count
    finally:
        ch.close()


def test_bad_notifications_are_dropped_once_and_good_ones_flow(bus, adapter):
    svc, notifier, names = adapter
    server = str(uuid.uuid4())
    ctxt = {"user_id": "admin", "project_id": "p"}
    # 1. the translator chokes on it (a status that is not a string);
    notifier.info(ctxt, "port.update.end",
                  {"port": port(server, {"not": "a status"})})
    # 2. oslo.messaging chokes on it before any endpoint (priority not a
    #    string), which it would requeue for ever.
    bad = notification(server, "ACTIVE", "bad-priority")
    bad["priority"] = 5
    send_raw(bus, names, bad)
    emit_lifecycle(notifier, server)
    wait_for(lambda: svc.endpoint.handled == 4, timeout=20,
             what="the 4 good notifications handled")
    assert [env.payload for _, env in host_events(bus, 3, HOST)] == \
        expected(server)
    svc.stop()
    # Nothing went back to the queue to come round again...
    assert queue_depth(bus, names["pool"]) == 0
    # ...because each bad one was dropped, once.
    assert getattr(svc.endpoint, "dropped", None) == 2


def test_a_notification_delivered_again_publishes_the_same_ids(
        bus, router, network_service):  # noqa: F811
    """The copy an adapter handled but could not acknowledge (killed
    first) comes back to another adapter, which has never seen the port."""
    _, names = network_service
    bus.declare_host(HOST)
    server = str(uuid.uuid4())
    message = notification(server, "ACTIVE", str(uuid.uuid4()))
    for copy in ("first", "again"):
        with running_adapter(bus, names) as svc:
            send_raw(bus, names, message)
            wait_for(lambda: svc.endpoint.handled == 1, timeout=20,
                     what=f"the {copy} copy handled")
    with running_adapter(bus, names) as svc:
        # An equal notification, but another one: another event.
        send_raw(bus, names, notification(server, "ACTIVE", str(uuid.uuid4())))
        wait_for(lambda: svc.endpoint.handled == 1, timeout=20,
                 what="the other notification handled")
    events = host_events(bus, 3, HOST)
    assert {env.payload.name for _, env in events} == {"network-vif-plugged"}
    ids = [env.id for _, env in events]
    assert ids[0] == ids[1] != ids[2]
