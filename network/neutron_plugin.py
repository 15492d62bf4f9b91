"""A Neutron service plugin that publishes what Neutron's nova notifier sends.

The Neutron edge of the network side; the only network module that imports
Neutron. In neutron.conf::

    [DEFAULT]
    service_plugins = router,evrouter      # the entry point of this class
    [evrouter]
    transport_url = amqp://evrouter-network:...@rabbit:5672/
    spool_path = /var/lib/neutron/evrouter-spool

What it publishes, read from neutron/notifiers/nova.py (29.0.0), through the
spooled publisher (network/publisher.py) and the pure mapping
(network/transitions.py):

- status transitions (``network-vif-plugged`` completed/failed,
  ``network-vif-unplugged``) from the callback registry's PORT AFTER_CREATE /
  AFTER_UPDATE, which ML2 publishes after its transaction -- also for the
  status an L2 agent reports (``update_device_up`` ->
  ``update_port_status``), which no ``port.*.end`` notification carries. The
  binding host (``binding:host_id``) is the hint. Neutron's live-migration
  suppression (``Notifier.context_enabled(False)`` around a status update
  not caused by the L2 agent) is honoured: that thread-local is read.
- ``network-changed`` for every API ``update_port`` of a compute port and for
  the ports a floating IP leaves or joins, ``network-vif-deleted`` for
  ``delete_port``: the registry's BEFORE_RESPONSE of PORT and FLOATING_IP,
  sent after the API request's transaction, as the notifier does.

Never inside a transaction: an event raised while the session is still in
one is published on its commit and dropped on its rollback.

The gap, precisely: ``Notifier.notify_port_active_direct`` sends
``network-vif-plugged`` without any registry event, when the port's status
does not change -- ML2's ``update_device_up`` from an agent on a host the
port is not bound to (live migration: the destination wires the port while
the binding still names the source), and OVN's ``set_port_status_up`` for an
already ACTIVE compute port. This plugin cannot see those calls. Mitigation:
keep ``notify_nova_on_port_status_changes = true`` where live migration
waits for plugging (Nova's ``[compute] live_migration_wait_for_vif_plug``,
default true) -- the REST path then still carries that one event, and the
duplicate of the others is harmless -- or set that Nova option to false.

Message ids derive from the port (id, event, status, revision_number), so
a retried request or a second API worker publishing the same revision makes
a duplicate the waiter drops.
"""

import logging
import os
import threading
import uuid

from neutron_lib.callbacks import events, registry, resources
from neutron_lib.services import base as service_base
from oslo_config import cfg

from network import transitions
from network.publisher import InstanceEventPublisher, PublisherSettings
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

GROUP = "evrouter"
OPTS = [
    cfg.StrOpt("transport_url", secret=True,
               default="amqp://guest:guest@127.0.0.1:5672//",
               help="evrouter's broker, as the network publisher user."),
    cfg.StrOpt("spool_path",
               help="File spool for events while the broker is away (one "
                    "per process: the worker's pid is appended)."),
    cfg.StrOpt("topology_prefix", default="evrouter",
               help="Prefix of evrouter's exchanges and queues."),
    cfg.FloatOpt("publish_timeout", default=10.0,
                 help="Seconds a request waits for its event to be confirmed "
                      "or spooled before it goes on (the event is then "
                      "logged as lost)."),
]

_NAMESPACE = uuid.UUID("6f1c3f7e-2d4b-4c55-9a1e-6b0f5e0c9a21")


def register_opts(conf):
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]


def message_id(port, name, status, extra=""):
    """Stable per source event: same port revision, same id."""
    key = f"{port.get('id')}|{name}|{status}|{port.get('revision_number')}|{extra}"
    return uuid.uuid5(_NAMESPACE, key).hex


def _notifier_enabled():
    """Neutron's live-migration suppression: Notifier.context_enabled()."""
    try:
        from neutron.notifiers import nova
    except ImportError:     # pragma: no cover - Neutron without the notifier
        return True
    return getattr(nova._notifier_store, "enable", True) is not False


def _as_dict(port):
    # ML2 publishes port dicts (with binding:host_id) in AFTER_CREATE and
    # AFTER_UPDATE; anything else is not a port this plugin can judge.
    return port if isinstance(port, dict) else None


class EvrouterNotifierPlugin(service_base.ServicePluginBase):
    """``service_plugins = evrouter``."""

    supported_extension_aliases = []

    def __init__(self, conf=None, publisher_factory=None):
        super().__init__()
        self.conf = conf or cfg.CONF
        if GROUP not in self.conf:
            register_opts(self.conf)
        # Neutron forks its API and RPC workers after loading plugins: each
        # process starts its own publisher (thread + connection) on first use.
        self._publisher_factory = publisher_factory or self._new_publisher
        self._publisher = None
        self._pid = None
        self._lock = threading.Lock()
        registry.subscribe(self._port_created, resources.PORT, events.AFTER_CREATE)
        registry.subscribe(self._port_updated, resources.PORT, events.AFTER_UPDATE)
        registry.subscribe(self._api_response, resources.PORT,
                           events.BEFORE_RESPONSE)
        registry.subscribe(self._api_response, resources.FLOATING_IP,
                           events.BEFORE_RESPONSE)

    def get_plugin_type(self):
        return "evrouter"

    def get_plugin_description(self):
        return "evrouter: port events to compute hosts over the message bus"

    # --- registry callbacks ------------------------------------------------------
    def _port_created(self, resource, event, trigger, payload):
        port = _as_dict(payload.latest_state)
        if port is None or not _notifier_enabled():
            return
        self._publish(payload.context, port, transitions.port_created(port))

    def _port_updated(self, resource, event, trigger, payload):
        if not _notifier_enabled():
            return
        original, port = (_as_dict(s) for s in (payload.states[0],
                                                 payload.latest_state))
        if original is None or port is None:
            return
        # Status only: network-changed follows the API action, as Neutron's.
        found = transitions.status_changed(port, original.get("status"),
                                           port.get("status"))
        self._publish(payload.context, port, found)

    def _api_response(self, resource, event, trigger, payload):
        action = payload.action
        if resource == resources.PORT:
            port = (payload.latest_state or {}).get("port")
            if not isinstance(port, dict):
                return
            if action == "update_port":
                found = transitions.network_changed(port)
            elif action == "delete_port":
                found = transitions.port_deleted(port)
            else:
                return
            self._publish(payload.context, port, found, extra=action)
            return
        original = (payload.states[0] if payload.states else None) or {}
        returned = (payload.latest_state or {}).get("floatingip") or {}
        if action not in ("create_floatingip", "update_floatingip",
                          "delete_floatingip"):
            return
        before = original.get("port_id")
        after = returned.get("port_id")
        if action == "delete_floatingip":
            before, after = before or after, None
        for port_id in {p for p in (before, after) if p}:
            port = self._port(port_id)
            if port is not None:
                self._publish(payload.context, port,
                              transitions.network_changed(port),
                              extra=f"{action}|{returned.get('id', original.get('id'))}"
                                    f"|{returned.get('revision_number')}")

    @staticmethod
    def _port(port_id):
        from neutron_lib import context as n_context
        from neutron_lib import exceptions as n_exc
        from neutron_lib.plugins import directory
        core = directory.get_plugin()
        try:
            return core.get_port(n_context.get_admin_context(), port_id)
        except n_exc.PortNotFound:
            return None

    # --- publishing ----------------------------------------------------------------
    def _publish(self, context, port, found, extra=""):
        if not found:
            return
        session = getattr(context, "session", None) if context is not None else None
        if session is not None and _in_transaction(session):
            _after_commit(session, lambda: self._send(port, found, extra))
            return
        self._send(port, found, extra)

    def _send(self, port, found, extra):
        publisher = self.publisher()
        for event in found:
            mid = message_id(port, event.name, event.status, extra)
            try:
                publisher.publish(event, message_id=mid,
                                  timeout=self.conf.evrouter.publish_timeout)
            except Exception:
                # Never fail the API request or the agent's RPC over this.
                LOG.exception("event %s %s for instance %s (port %s) NOT "
                              "published", mid, event.name, event.server_uuid,
                              event.tag)

    def publisher(self):
        with self._lock:
            if self._publisher is None or self._pid != os.getpid():
                self._publisher = self._publisher_factory()
                self._pid = os.getpid()
            return self._publisher

    def _new_publisher(self):
        opts = self.conf.evrouter
        spool = opts.spool_path and f"{opts.spool_path}.{os.getpid()}"
        publisher = InstanceEventPublisher(PublisherSettings(
            transport_url=opts.transport_url,
            topology=Topology(prefix=opts.topology_prefix),
            producer=f"neutron@{self.conf.host}", spool_path=spool))
        publisher.start()
        return publisher

    def stop(self):
        with self._lock:
            if self._publisher is not None:
                self._publisher.close()
                self._publisher = None


def _in_transaction(session):
    try:
        return session.in_transaction()
    except AttributeError:      # pragma: no cover - older SQLAlchemy
        return bool(getattr(session, "is_active", False) and
                    getattr(session, "transaction", None))


def _after_commit(session, publish):
    """Publish once the session's outermost transaction commits; never on rollback."""
    from sqlalchemy import event as sa_event

    state = {"done": False}

    def committed(_session):
        if not state["done"]:
            state["done"] = True
            unhook()
            publish()

    def ended(_session, transaction):
        # The outermost transaction ended without a commit: drop the event.
        if transaction.parent is None and not state["done"]:
            state["done"] = True
            unhook()

    def unhook():
        for name, fn in (("after_commit", committed),
                         ("after_transaction_end", ended)):
            if sa_event.contains(session, name, fn):
                sa_event.remove(session, name, fn)

    sa_event.listen(session, "after_commit", committed)
    sa_event.listen(session, "after_transaction_end", ended)
