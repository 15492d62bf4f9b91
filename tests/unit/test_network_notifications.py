"""Notifications of the network service -> events, and the listener endpoint."""

import re

import oslo_messaging

from network.adapter import PortNotificationEndpoint
from network.notifications import EVENT_TYPE_PATTERN, EVENT_TYPES, NotificationTranslator
from router.bus.contract import InstanceEvent

SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"


def port(status, port_id="p1", ips=("10.0.0.2",), **kw):
    p = {"id": port_id, "device_id": SERVER, "device_owner": "compute:nova",
         "status": status, "binding:host_id": "compute-1",
         "fixed_ips": [{"subnet_id": "s", "ip_address": ip} for ip in ips],
         "name": "", "admin_state_up": True}
    p.update(kw)
    return p


def ev(name, status="completed", tag="p1"):
    return InstanceEvent(name, SERVER, tag, status, "compute-1")


def feed(translator, event_type, payload):
    events, remember = translator.translate(event_type, payload)
    remember()
    return events


def test_a_port_lifecycle():
    tr = NotificationTranslator()
    assert feed(tr, "port.create.end", {"port": port("DOWN")}) == []
    assert feed(tr, "port.update.end", {"port": port("BUILD")}) == []
    assert feed(tr, "port.update.end", {"port": port("ACTIVE")}) == [
        ev("network-vif-plugged")]
    # A rename: same status, same addresses.
    assert feed(tr, "port.update.end", {"port": port("ACTIVE", name="x")}) == []
    assert feed(tr, "port.update.end",
                {"port": port("ACTIVE", ips=("10.0.0.9",))}) == [
        ev("network-changed")]
    assert feed(tr, "port.update.end", {"port": port("DOWN")}) == [
        ev("network-vif-unplugged"), ev("network-changed")]
    assert feed(tr, "port.update.end", {"port": port("DOWN")}) == []
    assert feed(tr, "port.update.end", {"port": port("ERROR")}) == [
        ev("network-vif-plugged", "failed")]
    assert feed(tr, "port.delete.end",
                {"port_id": "p1", "port": port("ERROR")}) == [
        ev("network-vif-deleted")]
    assert len(tr) == 0


def test_delete_with_only_the_port_id_uses_what_it_remembers():
    tr = NotificationTranslator()
    feed(tr, "port.create.end", {"port": port("DOWN")})
    assert feed(tr, "port.delete.end", {"port_id": "p1"}) == [
        ev("network-vif-deleted")]
    assert feed(tr, "port.delete.end", {"port_id": "never-seen"}) == []


def test_unknown_previous_state_counts_as_unset():
    tr = NotificationTranslator()
    assert feed(tr, "port.update.end", {"port": port("ACTIVE")}) == [
        ev("network-vif-plugged")]
    tr = NotificationTranslator()
    assert feed(tr, "port.update.end", {"port": port("DOWN")}) == []


def test_nothing_is_remembered_until_told():
    tr = NotificationTranslator()
    feed(tr, "port.create.end", {"port": port("DOWN")})
    first, _ = tr.translate("port.update.end", {"port": port("ACTIVE")})
    again, remember = tr.translate("port.update.end", {"port": port("ACTIVE")})
    assert first == again == [ev("network-vif-plugged")]
    remember()
    assert feed(tr, "port.update.end", {"port": port("ACTIVE")}) == []


def test_memory_is_bounded_least_recently_seen_first():
    tr = NotificationTranslator(max_ports=2)
    for pid in ("a", "b", "c"):
        feed(tr, "port.create.end", {"port": port("DOWN", port_id=pid)})
    assert len(tr) == 2
    # "a" was forgotten: ACTIVE is judged from unset, still a plug.
    assert feed(tr, "port.update.end", {"port": port("ACTIVE", port_id="a")}) \
        == [ev("network-vif-plugged", tag="a")]


def _retained(obj):
    """Bytes of what a translator keeps (containers and their strings)."""
    import sys
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(_retained(k) + _retained(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sys.getsizeof(obj) + sum(map(_retained, obj))
    return sys.getsizeof(obj)


def test_memory_per_port_is_bounded_in_bytes_too():
    # A review fed 300 notifications of ~400 KB of fixed_ips each: the
    # adapter grew 520 MB, keeping every byte of every port.
    tr = NotificationTranslator()
    huge = [{"subnet_id": "s" * 40, "ip_address": f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}",
             "pad": "x" * 1000} for i in range(400)]
    for n in range(50):
        feed(tr, "port.create.end", {"port": port(
            "DOWN", port_id=f"p{n}", fixed_ips=huge, name="n" * 100_000,
            device_owner="o" * 100_000)})
    per_port = _retained(dict(tr._ports)) / 50
    assert per_port < 4096, per_port
    # and what is kept still judges an address change of an ordinary port
    feed(tr, "port.create.end", {"port": port("ACTIVE", ips=("10.0.0.2",))})
    assert feed(tr, "port.update.end", {"port": port("ACTIVE", ips=("10.0.0.3",))}) \
        == [ev("network-changed")]


def test_floating_ips():
    tr = NotificationTranslator()
    feed(tr, "port.create.end", {"port": port("ACTIVE", port_id="p1")})
    feed(tr, "port.create.end", {"port": port("ACTIVE", port_id="p2")})
    fip = {"id": "f1", "floating_ip_address": "203.0.113.5"}
    assert feed(tr, "floatingip.create.end",
                {"floatingip": dict(fip, port_id=None)}) == []
    assert feed(tr, "floatingip.update.end",
                {"floatingip": dict(fip, port_id="p1")}) == [
        ev("network-changed", tag="p1")]
    assert feed(tr, "floatingip.update.end",
                {"floatingip": dict(fip, port_id="p1", description="x")}) == []
    assert feed(tr, "floatingip.update.end",
                {"floatingip": dict(fip, port_id="p2")}) == [
        ev("network-changed", tag="p1"), ev("network-changed", tag="p2")]
    assert feed(tr, "floatingip.delete.end", {"floatingip_id": "f1"}) == [
        ev("network-changed", tag="p2")]


def test_irrelevant_or_malformed_notifications_say_nothing():
    tr = NotificationTranslator()
    for event_type, payload in [
            ("port.update.start", {"port": port("ACTIVE")}),
            ("network.create.end", {"network": {"id": "n"}}),
            ("port.update.end", None), ("port.update.end", "x"),
            ("port.update.end", {"port": "x"}),
            ("port.update.end", {"port": {"status": "ACTIVE"}}),
            ("port.update.end", {"port": {"id": 5, "status": "ACTIVE"}}),
            ("port.delete.end", {}),
            ("floatingip.update.end", {"floatingip": "x"})]:
        assert feed(tr, event_type, payload) == [], (event_type, payload)


def test_the_filter_matches_exactly_the_handled_types():
    rx = re.compile(EVENT_TYPE_PATTERN)
    assert all(rx.match(t) for t in EVENT_TYPES)
    for other in ("port.update.start", "port.update.end.x", "network.create.end",
                  "xport.update.end", "port.update"):
        assert not rx.match(other)


class Publish:
    def __init__(self, fail=False):
        self.events, self.fail = [], fail

    def __call__(self, event, message_id=None):
        if self.fail:
            raise RuntimeError("spool full")
        self.events.append(event)


def test_endpoint_acks_after_publishing_and_requeues_on_failure():
    tr = NotificationTranslator()
    failing = Publish(fail=True)
    endpoint = PortNotificationEndpoint(tr, failing, requeue_delay=0)
    payload = {"port": port("ACTIVE")}
    assert endpoint.info({}, "network.h1", "port.update.end", payload,
                         {"message_id": "m1"}) == \
        oslo_messaging.NotificationResult.REQUEUE
    # The requeued copy is judged as the first one was.
    ok = Publish()
    endpoint.publish = ok
    assert endpoint.info({}, "network.h1", "port.update.end", payload,
                         {"message_id": "m1"}) == \
        oslo_messaging.NotificationResult.HANDLED
    assert ok.events == [ev("network-vif-plugged")]
    assert endpoint.info({}, "network.h1", "port.update.end", payload, {}) == \
        oslo_messaging.NotificationResult.HANDLED
    assert ok.events == [ev("network-vif-plugged")]
