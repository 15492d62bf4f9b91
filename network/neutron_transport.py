"""Neutron's own nova notifier, carried by the bus instead of nova-api's REST.

Why Neutron's notifier and not only the callback registry: Neutron tells
Nova of a port becoming active in paths that raise no registry event.
``Notifier.notify_port_active_direct`` is called by ML2's
``update_device_up`` when the agent reporting the device is not on the
port's bound host (live migration: the destination wires the port while the
binding still names the source) and by OVN's ``set_port_status_up``; both
call it only while ``notify_nova_on_port_status_changes`` is true. So the
options stay on (Neutron decides what Nova hears, and when, exactly as
stock), and only the transport changes. Every event Neutron sends Nova
leaves through the one ``Notifier.get_instance()`` (neutron/notifiers/
nova.py, 29.0.0), by four doors, each taken here:

- ``send_port_status`` -- status transitions recorded by Neutron's
  ``record_port_status_changed`` (a Port.status attribute listener), sent
  from the Port mapper's after_insert/after_update listeners during the
  flush, and called directly by OVN's ``set_port_status_down`` and by
  ``notify_port_active_direct``. ML2 registered Neutron's bound method as
  the listener, so the listeners are swapped for ours; ours publishes when
  the session's transaction commits (Neutron's batch thread may send before
  the commit, and sends a rolled-back change all the same);
- ``notify_port_active_direct`` -- Neutron's own ``_can_notify`` decides,
  the event goes out at once (no transaction holds it);
- ``create_port_changed_event`` (``network-changed``, ``network-vif-deleted``
  from ``send_network_change`` on the API's BEFORE_RESPONSE) -- Neutron's
  function decides; ours adds the port's host;
- ``batch_notifier.queue_event`` / ``send_events`` -- whatever still reaches
  them goes on the bus too, at once: there is no 2 s batch window.
``_get_nova_client`` refuses: nothing can reach nova-api's REST any more.

The host hint is the host of the port's ACTIVE binding: during a live
migration that is the source, where Nova waits for the destination's plug
(``_do_pre_live_migration_from_source``); nova-api would have sent it to the
instance's host as well.
"""

import logging
import uuid

from network import transitions

LOG = logging.getLogger(__name__)

_HINT = "_evrouter_host"           # our annotation on Neutron's event dicts
_EXTRA = "_evrouter_id_extra"
_STATUS_LISTENS = ("after_insert", "after_update")


class RestRefused(RuntimeError):
    """Something tried to reach nova-api's REST while the bus carries events."""


def bound_host(port):
    """The host of an ORM port's ACTIVE binding (the source in a migration)."""
    try:
        bindings = list(getattr(port, "port_bindings", None) or [])
    except Exception:   # a relationship that cannot load mid-flush: no hint
        return None
    hosts = [b.host for b in bindings if b.host and b.status == "ACTIVE"]
    hosts += [b.host for b in bindings if b.host]
    return hosts[0] if hosts else None


class NotifierOnTheBus:
    """Neutron's Notifier singleton with ``carry`` as its only transport.

    ``carry(items, session)`` publishes [(InstanceEvent, message_id)]: at
    once, or when ``session``'s transaction commits (never on a rollback).
    """

    def __init__(self, notifier, carry, port_model):
        self.notifier = notifier
        self._carry = carry
        self._model = port_model
        self._replaced = []     # the listeners we swapped: (name, Neutron's)
        self.stats = {"carried": 0, "rest_refused": 0}

    # --- installing ---------------------------------------------------------
    def install(self):
        n = self.notifier
        theirs = n.send_port_status         # the bound method ML2 registered
        for name in _STATUS_LISTENS:
            if _unlisten(self._model, name, theirs):
                self._replaced.append((name, theirs))
            _listen(self._model, name, self.send_port_status)
        self._neutron_create = n.create_port_changed_event
        self._batch_notifier = n.batch_notifier
        # Instance attributes: every caller looks these up on the notifier.
        n.send_port_status = self.send_port_status
        n.notify_port_active_direct = self.notify_port_active_direct
        n.create_port_changed_event = self.create_port_changed_event
        n.send_events = self.send_events
        n._get_nova_client = self._refuse_rest
        n.batch_notifier = self
        LOG.info("evrouter: Neutron's nova notifier now sends on the bus; "
                 "nothing is POSTed to nova-api")

    def uninstall(self):
        for name in _STATUS_LISTENS:
            _unlisten(self._model, name, self.send_port_status)
        for name, theirs in self._replaced:
            _listen(self._model, name, theirs)
        self._replaced = []
        n = self.notifier
        for attr in ("send_port_status", "notify_port_active_direct",
                     "create_port_changed_event", "send_events",
                     "_get_nova_client"):
            n.__dict__.pop(attr, None)
        n.batch_notifier = self._batch_notifier

    # --- Neutron's doors ----------------------------------------------------
    def send_port_status(self, mapper, connection, port):
        event = getattr(port, "_notify_event", None)
        port._notify_event = None
        if not event:
            return
        extra = "flush" if mapper is not None else "direct"
        self._send(event, bound_host(port), _session_of(port),
                   _revision_id(port.id, event, port, extra))

    def notify_port_active_direct(self, port):
        if not self.notifier._can_notify(port):      # Neutron's decision
            return
        event = {"server_uuid": port.device_id, "name": "network-vif-plugged",
                 "status": "completed", "tag": port.id}
        # Each call is its own fact (a host wired the port) with no status
        # change to name it: a fresh id, never a duplicate of an older plug.
        self._send(event, bound_host(port), None, uuid.uuid4().hex)

    def create_port_changed_event(self, action, original_obj, returned_obj):
        event = self._neutron_create(action, original_obj, returned_obj)
        if event:
            port = _port_of(action, original_obj, returned_obj)
            event[_HINT] = (port or {}).get(transitions.HOST_KEY)
            fip = returned_obj.get("floatingip") or {}
            event[_EXTRA] = (f"{action}|{fip.get('id') or original_obj.get('id')}|"
                             f"{fip.get('revision_number')}|"
                             f"{(port or {}).get('revision_number')}")
        return event

    def queue_event(self, event):
        """The batch notifier's door, without the batch: at once."""
        if event:
            self.send_events([event])

    def send_events(self, batched_events):
        for event in batched_events:
            event = dict(event)
            host = event.pop(_HINT, None)
            extra = event.pop(_EXTRA, None)
            mid = (_revision_id(event.get("tag"), event, None, extra)
                   if extra else uuid.uuid4().hex)
            self._send(event, host, None, mid)

    def _refuse_rest(self, *args, **kwargs):
        self.stats["rest_refused"] += 1
        raise RestRefused("evrouter carries Neutron's nova events: no REST")

    def _send(self, event, host, session, message_id):
        found = transitions.from_nova_notifier(event, host)
        if found is None:
            LOG.warning("event %s for Nova not carried: not an instance "
                        "event evrouter can name (%r)", message_id, event)
            return
        self.stats["carried"] += 1
        self._carry([(found, message_id)], session)


def _listen(target, name, fn):
    from neutron_lib.db import api as db_api
    db_api.sqla_listen(target, name, fn)    # tracked: Neutron's tests undo it


def _unlisten(target, name, fn):
    # Not neutron_lib's sqla_remove: its bookkeeping compares listener tuples,
    # and a tuple holding Port.status compares as a SQL expression.
    from sqlalchemy import event as sa_event
    if not sa_event.contains(target, name, fn):
        return False
    sa_event.remove(target, name, fn)
    return True


def _revision_id(port_id, event, port, extra):
    from network.neutron_plugin import message_id
    revision = getattr(port, "revision_number", None) if port is not None else None
    return message_id({"id": port_id, "revision_number": revision},
                      event.get("name"), event.get("status"), extra or "")


def _session_of(port):
    from sqlalchemy.orm import object_session
    try:
        return object_session(port)
    except Exception:
        return None


def _port_of(action, original_obj, returned_obj):
    if action in ("update_port", "delete_port"):
        return returned_obj.get("port")
    port_id = ((returned_obj.get("floatingip") or {}).get("port_id")
               or original_obj.get("port_id"))
    if not port_id:
        return None
    from neutron_lib import context as n_context
    from neutron_lib import exceptions as n_exc
    from neutron_lib.plugins import directory
    try:
        return directory.get_plugin().get_port(
            n_context.get_admin_context(), port_id)
    except n_exc.PortNotFound:
        return None
