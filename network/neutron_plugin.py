"""A Neutron service plugin that publishes what Neutron's nova notifier sends.

The Neutron edge of the network side; the only network module that imports
Neutron. In neutron.conf::

    [DEFAULT]
    # evrouter: the entry point of this class
    service_plugins = router,evrouter
    [evrouter]
    transport_url = rabbit://rabbit.example:5671/
    ssl = true
    ssl_ca_file = /etc/neutron/evrouter/ca.pem
    ssl_cert_file = /etc/neutron/evrouter/evrouter-network.pem
    ssl_key_file = /etc/neutron/evrouter/evrouter-network.key
    ssl_login = external
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

What that cannot see: ``Notifier.notify_port_active_direct`` sends
``network-vif-plugged`` without any registry event, when the port's status
does not change -- ML2's ``update_device_up`` from an agent on a host the
port is not bound to (live migration) and OVN's ``set_port_status_up`` for
an already ACTIVE port. With ``[evrouter] replace_nova_notifier = true`` the
plugin observes nothing itself: Neutron's own notifier keeps deciding and
network/neutron_transport.py makes the bus its transport, that event
included; nothing goes to nova-api's REST.

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

from network import spool, transitions
from network.neutron_options import GROUP, OPTS, list_opts, register_opts  # noqa: F401
from network.publisher import (
    BrokerUnavailable,
    InstanceEventPublisher,
    PublisherSettings,
    PublishRefused,
)
from router import options
from router.bus import contract, topology, tracecontext
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

# What publish() raises by design (network/publisher.py): said in one line.
_EXPECTED = (BrokerUnavailable, PublishRefused, spool.SpoolError, TimeoutError,
             OSError, contract.ContractError)

_NAMESPACE = uuid.UUID("6f1c3f7e-2d4b-4c55-9a1e-6b0f5e0c9a21")


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
        try:
            self.tls()
        except ValueError as exc:
            # A wrong [evrouter] option stops neutron-server here, loudly, as
            # a wrong [evrouter] option stops nova-compute's init_host: with
            # replace_nova_notifier every event Nova hears goes this way.
            LOG.critical("evrouter: %s", exc)
            raise
        # Neutron forks its API and RPC workers after loading plugins: each
        # process starts its own publisher (thread + connection) on first use.
        self._publisher_factory = publisher_factory or self._new_publisher
        self._publisher = None
        self._pid = None
        self._lock = threading.Lock()
        self.carrier = None
        if self.conf.evrouter.replace_nova_notifier:
            # Neutron's notifier decides what Nova hears; the bus carries it.
            # Observing the registry as well would send everything twice.
            self.carrier = self._carry_neutrons_notifier()
            return
        registry.subscribe(self._port_created, resources.PORT, events.AFTER_CREATE)
        registry.subscribe(self._port_updated, resources.PORT, events.AFTER_UPDATE)
        registry.subscribe(self._api_response, resources.PORT,
                           events.BEFORE_RESPONSE)
        registry.subscribe(self._api_response, resources.FLOATING_IP,
                           events.BEFORE_RESPONSE)

    def tls(self):
        """[evrouter]'s TLS options; ValueError naming the option and file
        when they contradict the URL or a file cannot be read."""
        return options.checked_tls(self.conf.evrouter.transport_url,
                                   options.ssl_from(self.conf, GROUP))

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

    def _carry_neutrons_notifier(self):
        from neutron.db import models_v2
        from neutron_lib.plugins import directory

        from network.neutron_transport import NotifierOnTheBus
        notifier = getattr(directory.get_plugin(), "nova_notifier", None)
        if notifier is None:
            LOG.warning("evrouter: replace_nova_notifier is set but Neutron's "
                        "nova notifier is off (notify_nova_on_port_status_"
                        "changes and _data_changes false): Nova hears nothing, "
                        "as without evrouter")
            return None
        carrier = NotifierOnTheBus(notifier, self._carry, models_v2.Port)
        carrier.install()
        return carrier

    def _carry(self, items, session):
        """[(event, message id)] now, or when `session` commits."""
        if session is not None and _in_transaction(session):
            _after_commit(session, lambda: self._publish_all(items))
            return
        self._publish_all(items)

    def _send(self, port, found, extra):
        self._publish_all([(event, message_id(port, event.name, event.status, extra))
                           for event in found])

    def _publish_all(self, items):
        try:
            publisher = self.publisher()
        except Exception as exc:
            # The options were right at start-up (checked there) and are not
            # now (a certificate removed...): never fail the API request or
            # the agent's RPC, and lose nothing -- spool the events for the
            # publisher this process or the next one starts.
            self._spool_unpublished(items, exc)
            return
        for event, mid in items:
            try:
                publisher.publish(event, message_id=mid,
                                  timeout=self.conf.evrouter.publish_timeout)
            except _EXPECTED as exc:
                # What the publisher says of the broker, the spool or the
                # caller's timeout: one line (a traceback per event under
                # an outage was a flood of them), never a failed request.
                LOG.error("event %s %s for instance %s (port %s) NOT "
                          "published: %s: %s", mid, event.name,
                          event.server_uuid, event.tag, type(exc).__name__, exc)
            except Exception:
                # A bug: with its traceback. Still never fails the request.
                LOG.exception("event %s %s for instance %s (port %s) NOT "
                              "published", mid, event.name, event.server_uuid,
                              event.tag)

    def publisher(self):
        with self._lock:
            if self._publisher is None or self._pid != os.getpid():
                self._publisher = self._publisher_factory()
                self._pid = os.getpid()
            return self._publisher

    def _spool_path(self):
        path = self.conf.evrouter.spool_path
        return path and f"{path}.{os.getpid()}"

    def _spool_unpublished(self, items, exc):
        path = self._spool_path()
        ids = ", ".join(mid for _, mid in items)
        if not path:
            LOG.error("%d event(s) NOT published (%s), no [evrouter] "
                      "spool_path to keep them: %s", len(items), exc, ids)
            return
        producer = self._producer()
        try:
            spool.append_now(path, [
                (topology.instance_routing_key(event.name), contract.encode(
                    contract.envelope(event, producer, message_id=mid)),
                 # the request's trace, as a publisher would have sent it
                 tracecontext.for_publish())
                for event, mid in items])
        except Exception as spool_exc:
            LOG.error("%d event(s) NOT published (%s) and NOT spooled (%s): "
                      "%s", len(items), exc, spool_exc, ids)
            return
        LOG.error("%d event(s) spooled to %s, not published: %s; they go out "
                  "once a publisher starts (fix [evrouter], restart "
                  "neutron-server): %s", len(items), path, exc, ids)

    def _producer(self):
        return f"neutron@{self.conf.host}"

    def _new_publisher(self):
        opts = self.conf.evrouter
        path = self._spool_path()
        ssl = self.tls()
        if path:
            # What this process spooled before it had a publisher, and what
            # processes that are gone left (a restart, a worker that died).
            spool.adopt_orphans(path, f"{opts.spool_path}.")
        publisher = InstanceEventPublisher(PublisherSettings(
            transport_url=opts.transport_url,
            topology=Topology(prefix=opts.topology_prefix),
            producer=self._producer(), spool_path=path, ssl=ssl))
        publisher.start()
        return publisher

    def stop(self):
        if self.carrier is not None:
            self.carrier.uninstall()
            self.carrier = None
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
    """Publish once the session's outermost transaction commits; never on rollback.

    One pair of listeners per session, installed once and never removed:
    removing a listener while SQLAlchemy dispatches that very event fails the
    commit ("deque mutated during iteration") as soon as two events wait on
    one transaction. What waits is a list in ``session.info``.
    """
    from sqlalchemy import event as sa_event

    info = session.info
    info.setdefault(_PENDING, []).append(publish)
    if info.get(_HOOKED):
        return
    info[_HOOKED] = True

    def committed(_session):
        pending, _session.info[_PENDING] = _session.info.get(_PENDING, []), []
        for each in pending:
            each()

    def ended(_session, transaction):
        # The outermost transaction ended without a commit: drop the events.
        if transaction.parent is None:
            _session.info[_PENDING] = []

    sa_event.listen(session, "after_commit", committed)
    sa_event.listen(session, "after_transaction_end", ended)


_PENDING = "evrouter_pending_publishes"
_HOOKED = "evrouter_publish_hooks"
