"""The port-change -> instance-event mapping, against Neutron's notifier."""

import itertools
import uuid

from hypothesis import given
from hypothesis import strategies as st

from network import transitions as t
from router.bus import contract

SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"
PORT = "0f6c2a3b-9d8e-4f7a-8b6c-5d4e3f2a1b0c"
STATUSES = [None, t.ACTIVE, t.DOWN, t.BUILD, t.ERROR, "UNKNOWN"]


def port(**overrides):
    p = {"id": PORT, "device_id": SERVER, "device_owner": "compute:nova",
         "status": t.DOWN, t.HOST_KEY: "compute-1",
         "fixed_ips": [{"subnet_id": "s1", "ip_address": "10.0.0.5"}]}
    p.update(overrides)
    return p


def expected(previous, current):
    """Neutron's record_port_status_changed, written out as a table."""
    if previous == "ACTIVE" and current == "DOWN":
        return ("network-vif-unplugged", "completed")
    if previous in (None, "DOWN", "BUILD") and current == "ACTIVE":
        return ("network-vif-plugged", "completed")
    if previous in (None, "DOWN", "BUILD") and current == "ERROR":
        return ("network-vif-plugged", "failed")
    return None


def test_every_status_transition_of_a_compute_port():
    for previous, current in itertools.product(STATUSES, STATUSES[1:]):
        events = t.status_changed(port(), previous, current)
        want = expected(previous, current)
        if want is None:
            assert events == [], (previous, current)
        else:
            assert events == [contract.InstanceEvent(
                want[0], SERVER, PORT, want[1], "compute-1")], (previous, current)


def test_down_to_down_and_active_to_active_say_nothing():
    assert t.status_changed(port(), t.DOWN, t.DOWN) == []
    assert t.status_changed(port(), t.ACTIVE, t.ACTIVE) == []
    assert t.status_changed(port(), t.ACTIVE, t.ERROR) == []
    assert t.status_changed(port(), t.ACTIVE, t.BUILD) == []


def test_ports_not_owned_by_an_instance_say_nothing():
    for p in (port(device_owner="network:dhcp"),
              port(device_owner="network:router_interface"),
              port(device_id="dhcp-agent-1"),
              port(device_id=""),
              port(device_id=None),
              port(id=""),
              port(device_owner=None),
              {k: v for k, v in port().items() if k != "device_owner"},
              {k: v for k, v in port().items() if k != "device_id"}):
        for previous, current in itertools.product(STATUSES, STATUSES[1:]):
            assert t.status_changed(p, previous, current) == []
        assert t.port_deleted(p) == []
        assert t.port_updated(port(fixed_ips=[]), p) == []


def test_uuid_like_device_ids_are_canonicalised():
    for spelling in (SERVER.upper(), SERVER.replace("-", ""),
                     "{" + SERVER + "}", "urn:uuid:" + SERVER):
        [event] = t.status_changed(port(device_id=spelling), t.DOWN, t.ACTIVE)
        assert event.server_uuid == SERVER


def test_host_hint_is_the_binding_host_when_the_contract_accepts_it():
    [e] = t.status_changed(port(), t.DOWN, t.ACTIVE)
    assert e.host == "compute-1"
    for host in ("", None, "bad host", "x" * 300, "host\n", 42):
        [e] = t.status_changed(port(**{t.HOST_KEY: host}), t.DOWN, t.ACTIVE)
        assert e.host is None, host
    [e] = t.status_changed({k: v for k, v in port().items() if k != t.HOST_KEY},
                           t.DOWN, t.ACTIVE)
    assert e.host is None


def test_revision_is_the_ports_revision_number_when_the_contract_accepts_it():
    [e] = t.status_changed(port(revision_number=12), t.DOWN, t.ACTIVE)
    assert e.revision == 12
    for junk in (None, -1, True, 3.0, "12"):
        [e] = t.status_changed(port(revision_number=junk), t.DOWN, t.ACTIVE)
        assert e.revision is None, junk
    [e] = t.port_deleted(port(revision_number=13))
    assert e.revision == 13


def test_port_created_counts_as_from_unset():
    assert t.port_created(port(status=t.DOWN)) == []
    assert t.port_created(port(status=t.BUILD)) == []
    assert [e.name for e in t.port_created(port(status=t.ACTIVE))] == [
        "network-vif-plugged"]


def test_update_with_unknown_original_is_judged_from_unset():
    assert [e.name for e in t.port_updated(None, port(status=t.ACTIVE))] == [
        "network-vif-plugged"]
    assert t.port_updated(None, port(status=t.DOWN)) == []


def test_fixed_ip_change_is_network_changed():
    before = port(status=t.ACTIVE)
    after = port(status=t.ACTIVE, fixed_ips=[
        {"subnet_id": "s1", "ip_address": "10.0.0.5"},
        {"subnet_id": "s2", "ip_address": "10.0.1.9"}])
    assert t.port_updated(before, after) == [contract.InstanceEvent(
        "network-changed", SERVER, PORT, "completed", "compute-1")]
    # Same addresses, another order: nothing changed.
    assert t.port_updated(after, port(status=t.ACTIVE, fixed_ips=list(
        reversed(after["fixed_ips"])))) == []
    # A side that does not say which addresses it has: no claim of change.
    assert t.port_updated({"status": t.ACTIVE}, after) == []


def test_status_and_address_change_together_status_first():
    before = port(status=t.DOWN)
    after = port(status=t.ACTIVE, fixed_ips=[])
    assert [e.name for e in t.port_updated(before, after)] == [
        "network-vif-plugged", "network-changed"]


def test_deleted_port():
    assert t.port_deleted(port()) == [contract.InstanceEvent(
        "network-vif-deleted", SERVER, PORT, "completed", "compute-1")]


def test_floating_ip_association_changes():
    other_port = port(id="p2", device_id=str(uuid.UUID(int=7)))
    ports = {PORT: port(), "p2": other_port, "dhcp": port(
        id="dhcp", device_owner="network:dhcp")}
    names = lambda evs: [(e.name, e.tag) for e in evs]  # noqa: E731
    assert names(t.floating_ip_changed(None, PORT, ports.get)) == [
        ("network-changed", PORT)]
    assert names(t.floating_ip_changed(PORT, None, ports.get)) == [
        ("network-changed", PORT)]
    # Straight from one port to another: both hear, the old one first.
    assert names(t.floating_ip_changed(PORT, "p2", ports.get)) == [
        ("network-changed", PORT), ("network-changed", "p2")]
    assert t.floating_ip_changed(PORT, PORT, ports.get) == []
    assert t.floating_ip_changed(None, "unknown", ports.get) == []
    assert t.floating_ip_changed(None, "dhcp", ports.get) == []


_junk = st.one_of(st.none(), st.text(max_size=40), st.integers(),
                  st.sampled_from(["", "ACTIVE", "DOWN", "x" * 300]))


def _mostly(*likely):
    return st.one_of(st.sampled_from(likely), _junk)


_ports = st.fixed_dictionaries({}, optional={
    "id": _mostly(PORT, "p"),
    "device_id": _mostly(SERVER, SERVER.upper(), SERVER.replace("-", "")),
    "device_owner": _mostly("compute:nova", "compute:", "network:dhcp"),
    "status": _mostly(*STATUSES[1:]),
    t.HOST_KEY: _mostly("compute-1", ""),
    "revision_number": _mostly(0, 7, 2**40, True, -1, 3.0),
    "fixed_ips": st.lists(st.fixed_dictionaries({
        "subnet_id": st.sampled_from(["s1", "s2"]),
        "ip_address": st.sampled_from(["10.0.0.1", "10.0.0.2"])}), max_size=3)})


@given(_ports, _ports, st.sampled_from(STATUSES), st.sampled_from(STATUSES))
def test_whatever_the_port_looks_like_events_pass_the_contract(
        original, p, previous, current):
    events = (t.status_changed(p, previous, current) + t.port_updated(original, p)
              + t.port_created(p) + t.port_deleted(p))
    if not t.is_compute_port(p):
        assert events == []
    for e in events:
        env = contract.envelope(e, "test")
        assert contract.decode(contract.encode(env)).payload == e
        assert e.tag == p["id"]


# Neutron's nova notifier's own event dicts (network/neutron_transport.py).
UPPER_SERVER = "9ED3BB9A0C574A538E0F1F3F7A4C0D11"


def test_notifier_events_as_neutron_builds_them():
    plugged = {"server_uuid": UPPER_SERVER, "name": "network-vif-plugged",
               "status": "completed", "tag": "p1"}
    changed = {"name": "network-changed", "server_uuid": UPPER_SERVER, "tag": "p1"}
    e = t.from_nova_notifier(plugged, "cmp-1")
    assert (e.name, e.server_uuid, e.tag, e.status, e.host) == (
        "network-vif-plugged", str(uuid.UUID(UPPER_SERVER)), "p1", "completed", "cmp-1")
    assert t.from_nova_notifier(changed).status == "completed"
    assert t.from_nova_notifier(changed, "").host is None


_dicts = st.dictionaries(
    st.sampled_from(["server_uuid", "name", "status", "tag", "other"]),
    st.one_of(st.none(), st.integers(), st.text(max_size=40),
              st.sampled_from([UPPER_SERVER, "network-vif-plugged", "failed", "x" * 300])),
    max_size=5)


@given(_dicts, st.one_of(st.none(), st.text(max_size=30), st.integers()))
def test_any_notifier_dict_is_an_event_the_contract_accepts_or_none(event, host):
    found = t.from_nova_notifier(event, host)
    if found is not None:
        env = contract.envelope(found, "test")
        assert contract.decode(contract.encode(env)).payload == found
