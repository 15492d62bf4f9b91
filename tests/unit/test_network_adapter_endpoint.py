"""The notification endpoint: stable message ids, contained failures.

A redelivered notification must publish the same message ids (issue 11,
item 7); a notification that cannot be handled is dropped, loudly, never
requeued for ever, and the next one flows (issue 10).
"""

import logging
import types

import oslo_messaging
import pytest

from network import adapter, notifications
from network.adapter import PortNotificationEndpoint
from network.notifications import NotificationTranslator
from router.bus.contract import InstanceEvent
from tests.unit.test_network_notifications import SERVER, port

HANDLED = oslo_messaging.NotificationResult.HANDLED
REQUEUE = oslo_messaging.NotificationResult.REQUEUE


class Publish:
    """Records (event, message id) like the publisher would send them."""

    def __init__(self, fail=None):
        self.sent, self.fail = [], fail

    def __call__(self, event, message_id=None):
        if self.fail is not None:
            raise self.fail
        self.sent.append((event, message_id))


def endpoint(publish=None):
    return PortNotificationEndpoint(NotificationTranslator(),
                                    publish or Publish(), requeue_delay=0)


def notify(ep, payload, message_id, event_type="port.update.end"):
    return ep.info({}, "network.h1", event_type, payload,
                   {"message_id": message_id, "timestamp": "t"})


def test_a_redelivered_notification_publishes_the_same_ids():
    first, second = endpoint(), endpoint()     # second: a restarted adapter
    for ep in (first, second):
        assert notify(ep, {"port": port("ACTIVE")}, "n-1") == HANDLED
    (event, id1), = first.publish.sent
    (again, id2), = second.publish.sent
    assert event == again == InstanceEvent("network-vif-plugged", SERVER, "p1",
                                           "completed", "compute-1")
    assert id1 and id1 == id2


def test_a_requeued_notification_keeps_its_ids():
    ep = endpoint()
    payload = {"port": port("DOWN", ips=("10.0.0.9",))}
    notify(ep, {"port": port("ACTIVE")}, "n-0")
    ep.publish = Publish(fail=OSError("disk"))
    assert notify(ep, payload, "n-1") == REQUEUE
    ep.publish = Publish()
    assert notify(ep, payload, "n-1") == HANDLED
    ids = [i for _, i in ep.publish.sent]
    # One notification, two events (unplugged, address change): two ids.
    assert len(ids) == 2 and len(set(ids)) == 2
    assert ids == [notifications.event_message_id("n-1", e) for e, _ in ep.publish.sent]


def test_other_notifications_get_other_ids():
    ep = endpoint()
    notify(ep, {"port": port("ACTIVE")}, "n-1")
    notify(ep, {"port": port("DOWN")}, "n-2")
    notify(ep, {"port": port("ACTIVE")}, "n-3")
    ids = [i for _, i in ep.publish.sent]
    assert len(ids) == 3 and len(set(ids)) == 3


def test_without_a_notification_id_the_publisher_picks_one():
    ep = endpoint()
    assert ep.info({}, "network.h1", "port.update.end",
                   {"port": port("ACTIVE")}, {}) == HANDLED
    assert [i for _, i in ep.publish.sent] == [None]


@pytest.mark.parametrize("payload", [
    {"port": port("ACTIVE", fixed_ips=5)},
    {"port": port({"a": 1})},
    {"port_id": ["x"]},
], ids=["fixed-ips-not-a-list", "status-a-dict", "port-id-a-list"])
def test_a_notification_the_translator_chokes_on_is_dropped(payload, caplog):
    ep = endpoint()
    notify(ep, {"port": port("DOWN")}, "n-0", "port.create.end")
    event_type = "port.delete.end" if "port_id" in payload else "port.update.end"
    with caplog.at_level(logging.WARNING, "network.adapter"):
        assert notify(ep, payload, "bad-1", event_type) == HANDLED
    assert ep.dropped == 1 and ep.publish.sent == []
    assert "bad-1" in caplog.text and "dropped" in caplog.text
    # The next good one flows, judged against the last good state.
    assert notify(ep, {"port": port("ACTIVE")}, "n-2") == HANDLED
    assert [e.name for e, _ in ep.publish.sent] == ["network-vif-plugged"]


class Refused:
    """A translator whose event the contract refuses (the real one checks
    what it reads; this is the net under it)."""

    def translate(self, event_type, payload):
        return [InstanceEvent("network-vif-plugged", "not-a-uuid", "p1",
                              "completed")], lambda: None


def test_an_event_the_contract_refuses_is_dropped_not_requeued(caplog):
    ep = PortNotificationEndpoint(Refused(), Publish(), requeue_delay=0)
    with caplog.at_level(logging.WARNING, "network.adapter"):
        assert notify(ep, {"port": port("ACTIVE")}, "bad-2") == HANDLED
    assert ep.dropped == 1 and ep.publish.sent == []
    assert "(invalid)" in caplog.text


def test_a_failing_publisher_still_requeues():
    ep = endpoint(Publish(fail=RuntimeError("publisher is not running")))
    assert notify(ep, {"port": port("ACTIVE")}, "n-1") == REQUEUE
    assert ep.dropped == 0


def incoming(message):
    return types.SimpleNamespace(ctxt={}, message=message)


def test_the_dispatcher_drops_what_oslo_messaging_cannot_dispatch():
    ep = endpoint()
    dispatcher = adapter.ContainedDispatcher([ep], ep.drop)
    # oslo.messaging calls .lower() on the priority: an int raises there,
    # before any endpoint, and the base dispatcher would requeue it.
    bad = {"priority": 5, "event_type": "port.update.end",
           "publisher_id": "x", "message_id": "bad-3", "payload": {}}
    assert dispatcher.dispatch(incoming(bad)) == HANDLED
    assert ep.dropped == 1
    good = {"priority": "info", "event_type": "port.update.end",
            "publisher_id": "network.h1", "message_id": "n-4",
            "payload": {"port": port("ACTIVE")}, "timestamp": "t"}
    assert dispatcher.dispatch(incoming(good)) == HANDLED
    assert [e.name for e, _ in ep.publish.sent] == ["network-vif-plugged"]


FORGED = "n-9\n2026-12-06 ERROR nova.compute.manager [req-x] FORGED LINE\x1b[31m"


@pytest.mark.parametrize("case", ["dropped", "requeued"])
def test_what_the_notification_bus_says_is_one_log_line(case, caplog):
    """message_id and publisher_id come from whoever writes the notification
    exchange: a newline in them forged a whole line in the adapter's log."""
    ep = endpoint(Publish(fail=OSError("broker away")) if case == "requeued" else None)
    payload = {"port": port("ACTIVE")} if case == "requeued" else {"port_id": ["x"]}
    event_type = "port.update.end" if case == "requeued" else "port.delete.end"
    with caplog.at_level(logging.DEBUG, "network.adapter"):
        ep.info({}, FORGED, event_type, payload, {"message_id": FORGED, "timestamp": "t"})
    said = [r.getMessage() for r in caplog.records]
    assert said and all("\n" not in m and "\x1b" not in m for m in said), said
