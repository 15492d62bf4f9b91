"""The network service's notifications to instance events. Pure.

An unmodified network service emits ``port.create.end``,
``port.update.end`` and ``port.delete.end`` with the port as the API shows
it, and the ``floatingip.*.end`` family with the floating IP. They carry
the new state only, so ``NotificationTranslator`` remembers the last state
of each port (bounded, least recently seen forgotten first) to find the
transition.

``translate`` does not change that memory: it returns the events and a
``remember`` callable to call once they are safely published, so a
notification that is requeued after a failed publish is judged against the
same previous state when it comes back.

``event_message_id`` names each event after the notification it came from,
so a redelivered notification yields the same message ids and the waiter
drops the copies.
"""

import collections
import uuid

from network import transitions

# Fixed for ever: changing it changes every derived message id.
_ID_NAMESPACE = uuid.UUID("5b0f3c2e-8a41-5d7e-9c6b-2f1e0d9a4b37")

PORT_EVENTS = ("port.create.end", "port.update.end", "port.delete.end")
FLOATING_IP_EVENTS = ("floatingip.create.end", "floatingip.update.end",
                      "floatingip.delete.end")
EVENT_TYPES = PORT_EVENTS + FLOATING_IP_EVENTS
EVENT_TYPE_PATTERN = r"^(port|floatingip)\.(create|update|delete)\.end$"

# What is kept of a port: enough to judge its next notification.
_KEPT = ("id", "device_id", "device_owner", "status", "fixed_ips",
         transitions.HOST_KEY)


def _nothing():
    pass


# What is kept of one port is bounded in bytes, not only the ports in
# number: a notification carrying 400 KB of fixed_ips grew the adapter by
# that much per port (520 MB for 300 notifications in a review). Strings
# kept are ids, statuses and host names; the fixed IPs, only their digest.
_MAX_KEPT_STR = 255


def _kept(port):
    """The _KEPT fields of a port, each a bounded string, and its fixed IPs
    as their transitions.address_digest (all that is compared of them)."""
    kept = {}
    for key in _KEPT:
        value = port.get(key)
        if key == "fixed_ips":
            if value is not None:
                kept[key] = transitions.address_digest(value)
        elif isinstance(value, str) and len(value) <= _MAX_KEPT_STR:
            kept[key] = value
    return kept


def event_message_id(notification_id, event):
    """The envelope id of `event` derived from its notification's id.

    None when the notification has no usable id (the publisher then picks
    a fresh one). One notification can yield several events (an address
    change of two ports, an unplug and an address change of one), so the
    event's key and status are part of the name.
    """
    if not isinstance(notification_id, str) or not notification_id:
        return None
    name = "\x1f".join((notification_id, event.name, event.server_uuid,
                        event.tag or "", event.status))
    return uuid.uuid5(_ID_NAMESPACE, name).hex


class NotificationTranslator:
    def __init__(self, max_ports=100_000):
        self.max_ports = max_ports
        self._ports = collections.OrderedDict()        # port id -> port
        self._floating = collections.OrderedDict()     # fip id -> port id

    def __len__(self):
        return len(self._ports)

    def translate(self, event_type, payload):
        """(events, remember) for one notification; ([], no-op) if irrelevant."""
        if not isinstance(payload, dict):
            return [], _nothing
        if event_type in PORT_EVENTS:
            return self._port(event_type, payload)
        if event_type in FLOATING_IP_EVENTS:
            return self._floating_ip(event_type, payload)
        return [], _nothing

    # --- ports --------------------------------------------------------------
    def _port(self, event_type, payload):
        port = payload.get("port")
        if event_type == "port.delete.end":
            # Older releases send only {"port_id": ...}.
            if not isinstance(port, dict):
                port = self._ports.get(payload.get("port_id"))
            if not isinstance(port, dict):
                return [], _nothing
            port_id = port.get("id")
            return (transitions.port_deleted(port),
                    lambda: self._ports.pop(port_id, None))
        if not isinstance(port, dict) or not isinstance(port.get("id"), str):
            return [], _nothing
        kept = _kept(port)
        if event_type == "port.create.end":
            events = transitions.port_created(port)
        else:
            events = transitions.port_updated(self._ports.get(port["id"]), port)
        return events, lambda: self._keep(self._ports, port["id"], kept)

    # --- floating IPs -------------------------------------------------------
    def _floating_ip(self, event_type, payload):
        fip = payload.get("floatingip")
        if not isinstance(fip, dict):
            fip = {"id": payload.get("floatingip_id")}
        fip_id = fip.get("id")
        before = self._floating.get(fip_id)
        if event_type == "floatingip.delete.end":
            after = None
            # A delete that names the port says where it was associated.
            before = before or fip.get("port_id")
        else:
            after = fip.get("port_id")
        events = transitions.floating_ip_changed(before, after,
                                                 self._ports.get)

        def remember():
            if after is None:
                self._floating.pop(fip_id, None)
            elif fip_id is not None:
                self._keep(self._floating, fip_id, after)
        return events, remember

    def _keep(self, table, key, value):
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.max_ports:
            table.popitem(last=False)
