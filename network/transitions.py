"""Port changes to instance events, with the meaning OpenStack gives them. Pure.

Follows the network service's compute notifier (neutron/notifiers/nova.py):

- only ports owned by an instance count: ``device_owner`` starts with
  ``compute:`` and ``device_id`` is UUID-like;
- a status set from unset/DOWN/BUILD to ACTIVE is ``network-vif-plugged``
  completed, to ERROR ``network-vif-plugged`` failed;
- ACTIVE to DOWN is ``network-vif-unplugged`` completed;
- every other status change (DOWN to DOWN, ACTIVE to BUILD, ...) says nothing;
- a deleted port is ``network-vif-deleted``;
- a change of the port's fixed IPs, or a floating IP (dis)associated with it,
  is ``network-changed``. (The notifier sends that on every port update; the
  issue narrows it to address changes, which is what the compute side acts on.)

The tag is always the port id, and the port's binding host is the host hint.
The port's ``revision_number`` (the network API bumps it on every change of
the port) is the event's revision: the compute side orders one port's events
by it instead of by anyone's clock.
Ports are dicts shaped like the network API's (``binding:host_id`` included).
"""

import hashlib
import re
import uuid

from oslo_utils import uuidutils

from router.bus.contract import (
    COMPLETED,
    EVENT_NAMES,
    FAILED,
    HOST_PATTERN,
    NETWORK_CHANGED,
    STATUSES,
    VIF_DELETED,
    VIF_PLUGGED,
    VIF_UNPLUGGED,
    InstanceEvent,
)

ACTIVE = "ACTIVE"
DOWN = "DOWN"
BUILD = "BUILD"
ERROR = "ERROR"
COMPUTE_OWNER_PREFIX = "compute:"
HOST_KEY = "binding:host_id"

# previous status (None: unset) that makes a move to ACTIVE/ERROR a plug.
_PLUG_FROM = (None, DOWN, BUILD)
_PLUG_STATUS = {ACTIVE: COMPLETED, ERROR: FAILED}

_host_re = re.compile(HOST_PATTERN)


def is_compute_port(port):
    """Owned by a compute instance: the only ports the compute side hears of."""
    try:
        port_id, device_id = port["id"], port["device_id"]
        return bool(isinstance(port_id, str) and 0 < len(port_id) <= 255
                    and isinstance(device_id, str) and device_id
                    and uuidutils.is_uuid_like(device_id)
                    and port["device_owner"].startswith(COMPUTE_OWNER_PREFIX))
    except (KeyError, AttributeError, TypeError):
        return False


def _event(port, name, status=COMPLETED):
    host = port.get(HOST_KEY)
    # An unbound port has host "" and some back ends put odd strings here; a
    # hint the contract would refuse is dropped so the router's placement
    # table decides instead of the event being dead-lettered.
    if not isinstance(host, str) or not _host_re.search(host):
        host = None
    revision = port.get("revision_number")
    if type(revision) is not int or revision < 0:
        revision = None     # the contract would refuse it; order alone decides
    # The network API accepts any UUID-like spelling; the compute side keys
    # instances by the canonical one.
    return InstanceEvent(name=name, server_uuid=str(uuid.UUID(port["device_id"])),
                         tag=port["id"], status=status, host=host,
                         revision=revision)


def status_changed(port, previous, current):
    """Events for the port's status moving from `previous` to `current`.

    `previous` is None when the status was never set (a new port).
    """
    if not is_compute_port(port):
        return []
    if previous == ACTIVE and current == DOWN:
        return [_event(port, VIF_UNPLUGGED)]
    if previous in _PLUG_FROM and current in _PLUG_STATUS:
        return [_event(port, VIF_PLUGGED, _PLUG_STATUS[current])]
    return []


def port_created(port):
    return status_changed(port, None, port.get("status"))


def port_updated(original, port):
    """Events for an update whose previous state is `original` (None: unknown).

    An unknown previous state counts as unset, as for a new port: after a
    restart of whoever tracks ports, an ACTIVE port says plugged once more
    (harmless to the compute side) rather than a real plug being missed.
    """
    previous = None if original is None else original.get("status")
    events = status_changed(port, previous, port.get("status"))
    if original is not None and addresses_changed(original, port):
        events += network_changed(port)
    return events


def network_changed(port):
    """`network-changed` for a port whose addresses are known to have changed."""
    return [_event(port, NETWORK_CHANGED)] if is_compute_port(port) else []


def port_deleted(port):
    return [_event(port, VIF_DELETED)] if is_compute_port(port) else []


def addresses_changed(original, port):
    """Whether the fixed IPs differ; False when either side does not say.
    Either side may be a port's fixed_ips or their address_digest."""
    before, after = original.get("fixed_ips"), port.get("fixed_ips")
    if before is None or after is None:
        return False
    return address_digest(before) != address_digest(after)


def address_digest(fixed_ips):
    """32 bytes that stand for a port's set of (subnet_id, ip_address):
    what a notification adapter keeps of them, whatever their number and
    size (a digest passes through)."""
    if isinstance(fixed_ips, bytes):
        return fixed_ips
    if isinstance(fixed_ips, str):
        # a column that keeps them as text (network/orm.py): the text
        return hashlib.sha256(fixed_ips.encode("utf-8", "surrogatepass")).digest()
    if not isinstance(fixed_ips, (list, tuple)):
        # a malformed notification: the caller drops it (as iterating it
        # would have raised)
        raise TypeError(f"fixed_ips must be a list, not {type(fixed_ips).__name__}")
    pairs = sorted({repr((ip.get("subnet_id"), ip.get("ip_address")))
                    for ip in fixed_ips if isinstance(ip, dict)})
    return hashlib.sha256("\n".join(pairs).encode("utf-8", "surrogatepass")).digest()


def floating_ip_changed(original_port_id, port_id, port_of):
    """`network-changed` for each port a floating IP left or joined.

    `port_of(port_id)` returns the port dict or None when unknown. Like the
    notifier, re-associating straight from one port to another tells both.
    """
    if original_port_id == port_id:
        return []
    events = []
    for pid in (original_port_id, port_id):
        port = port_of(pid) if pid else None
        if port is not None:
            events += network_changed(port)
    return events


def from_nova_notifier(event, host=None):
    """An InstanceEvent from one event dict of Neutron's nova notifier.

    Neutron's dicts: ``server_uuid``, ``name``, ``tag`` (the port id) and,
    for status events, ``status``. None for anything the contract could not
    carry (the caller logs it); `host` is dropped, as in ``_event``, when the
    contract would refuse it, so placement decides.
    """
    try:
        name, server, tag = event["name"], event["server_uuid"], event.get("tag")
        status = event.get("status") or COMPLETED
        server = str(uuid.UUID(server))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if name not in EVENT_NAMES or status not in STATUSES:
        return None
    if not (tag is None or (isinstance(tag, str) and 0 < len(tag) <= 255)):
        return None
    if not isinstance(host, str) or not _host_re.search(host):
        host = None
    return InstanceEvent(name=name, server_uuid=server, tag=tag, status=status,
                         host=host)
