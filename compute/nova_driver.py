"""nova-compute's end of the bus, in-process: a compute driver around the real one.

The Nova edge of the waiter library; the only compute module that imports
Nova. Configured in nova.conf, no file of Nova patched::

    [DEFAULT]
    compute_driver = evrouter.EvrouterComputeDriver
    [evrouter]
    compute_driver = libvirt.LibvirtDriver
    transport_url = rabbit://rabbit.example:5671/
    ssl = true
    ssl_ca_file = /etc/nova/evrouter/ca.pem
    ssl_cert_file = /etc/nova/evrouter/cmp-1.pem
    ssl_key_file = /etc/nova/evrouter/cmp-1.key
    ssl_login = external

Why a driver: ``[DEFAULT] compute_driver`` is the one class path nova-compute
loads from configuration and hands its ``ComputeVirtAPI`` (hence its
``ComputeManager``); compute monitors and notification drivers get neither.
Nova resolves the path under ``nova.virt`` only, so evrouter installs the
one-line module ``nova.virt.evrouter`` (compute/nova_virt/evrouter.py), as
out-of-tree drivers do. ``EvrouterComputeDriver(virtapi)`` builds an
instance of a subclass of the configured real driver class, so every
method, capability and ``isinstance`` check is the real driver's; the
subclass only adds, in ``init_host``, the bridge below and the host
consumer thread, and stops them in ``cleanup_host``. With ``[evrouter]
enabled = false`` it returns an instance of the real class itself.

``NovaEventBridge`` connects the bus to Nova's own machinery:
- Nova's ``instance_events`` becomes a ``BusInstanceEvents`` (Nova's own
  class, subclassed): every ``prepare_for_instance_event`` also prepares in
  evrouter's registry, so an event that came before Nova prepared is held
  and satisfies the prepare at once; a Nova wait that times out ends the
  evrouter wait too (so the stale-event policy applies).
- Every event is handed to ``ComputeManager.external_instance_event`` -- the
  method nova-api's RPC cast calls -- with the instance Nova prepared for, so
  Nova's own code pops and sets its waiter.
- ``network-changed``, ``network-vif-deleted``, ``volume-extended`` and
  ``power-update`` nobody waits for: they go to ``external_instance_event``
  at once with the instance loaded as nova-api loads it, so Nova's own
  handlers run. Duplicates (same message id) never reach Nova twice.
"""

import collections
import functools
import logging
import threading
import uuid

from oslo_config import cfg
from oslo_utils import importutils

from compute import events as evr_events
from compute import host_consumer, waiting
from router import journal_otlp, options
from router.bus import contract
from router.bus.topology import Topology
from router.journal import JournalSettings

LOG = logging.getLogger(__name__)

GROUP = "evrouter"
OPTS = [
    cfg.StrOpt("compute_driver", default="libvirt.LibvirtDriver",
               help="The real compute driver, spelled as [DEFAULT] "
                    "compute_driver would spell it (under nova.virt)."),
    cfg.StrOpt("transport_url", secret=True,
               default="amqp://guest:guest@127.0.0.1:5672//",
               help="evrouter's broker: this host's compute user."),
    cfg.StrOpt("host", help="Host name of this host's evrouter queue; "
                            "defaults to [DEFAULT] host."),
    cfg.StrOpt("topology_prefix", default="evrouter",
               help="Prefix of evrouter's exchanges and queues."),
    options.FloatOpt("hold_seconds", default=evr_events.DEFAULT_HOLD_SECONDS,
                 help="How long an event nobody prepared for is held."),
    cfg.BoolOpt("enabled", default=True,
                help="False: nova-compute gets the real driver itself, "
                     "evrouter's subclass is not built (rollback)."),
    cfg.BoolOpt("journal", default=False,
                help="Append this host's hops (each event taken from its "
                     "queue, and what the waiter made of it) to evrouter's "
                     "journal stream, for `evrouter trace`. Needs write on "
                     "the journal exchange (`evrouter permissions` grants "
                     "it); refused, it costs a WARNING, never an event."),
    cfg.StrOpt("otlp_endpoint", default="",
               help="OTLP/HTTP traces URL (e.g. "
                    "http://collector:4318/v1/traces): this host's hops are "
                    "also exported as OpenTelemetry spans of each event's "
                    "trace, with or without the journal stream. Needs the "
                    "extra evrouter[otlp]. Empty: off."),
    options.FloatOpt("stuck_after", default=30.0, min=1.0,
                 help="A wait for an event (Nova's prepare) still pending "
                      "after this many seconds is logged at WARNING and, "
                      "with the journal, recorded stuck for `evrouter "
                      "stuck`, which says why."),
] + options.tls_opts    # ssl, ssl_ca_file, ... ssl_login = external: no password

# Events Nova's ComputeManager handles itself; nothing waits for them.
NOVA_HANDLED = frozenset({contract.NETWORK_CHANGED, contract.VIF_DELETED,
                          "volume-extended", "power-update"})


def register_opts(conf):
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]


class _Arrivals:
    """The registry's wake for Nova's prepares: only collects.

    Called under the registry's lock, so it must not call Nova; the bridge
    hands what it collected to Nova once the lock is released.
    """

    __slots__ = ("queue",)

    def __init__(self):
        self.queue = collections.deque()

    def _arrive(self, prepared):
        self.queue.append(prepared)


def _nova():
    # Imported when used: this module is importable (and its pure parts
    # testable) where Nova is not installed.
    from nova import context, exception, objects
    from nova.compute import manager
    return context, exception, objects, manager


class NovaEventBridge:
    """Bus events into one ComputeManager, through Nova's own entry points."""

    def __init__(self, manager, registry, context=None):
        nova_context, _, _, _ = _nova()
        self.manager = manager
        self.registry = registry
        self.context = context or nova_context.get_admin_context()
        self.stats = collections.Counter()
        self._arrivals = _Arrivals()
        self._lock = threading.Lock()
        # key -> (instance, evrouter PreparedEvent) of Nova's pending prepares
        self._prepared = {}
        # The trace id of the event being delivered (HostBus.start sets it
        # to the host consumer's current_trace)
        self.trace_of = lambda: None

    def install(self):
        """Make the manager's instance_events ours, keeping what is pending."""
        bus_instance_events = bus_instance_events_class()
        current = self.manager.instance_events
        if isinstance(current, bus_instance_events):
            return current
        ours = bus_instance_events(self)
        ours._events = current._events
        self.manager.instance_events = ours
        return ours

    # --- Nova's side -----------------------------------------------------------
    def prepared(self, instance, name, tag):
        """Nova prepared for (instance, name, tag): mirror it in the registry."""
        key = evr_events._key(instance.uuid, name, tag)
        with self._lock:
            if key in self._prepared:
                return          # Nova shares one waiter per key, so do we
            try:
                prepared = self.registry.prepare(instance.uuid, name, tag,
                                                 wake=self._arrivals)
            except waiting.RegistryClosed:
                return
            self._prepared[key] = (instance, prepared)
        self._hand_over()

    def ended(self, instance, name, tag):
        """Nova's wait ended without the event (timed out)."""
        key = evr_events._key(instance.uuid, name, tag)
        with self._lock:
            entry = self._prepared.pop(key, None)
        if entry is not None:
            self.registry.discard(entry[1], "Nova's wait timed out")

    def cleared(self, instance):
        with self._lock:
            uuid = instance.uuid.lower()
            for key in [k for k in self._prepared if k[0] == uuid]:
                del self._prepared[key]
        self.registry.clear(instance.uuid)
        self._hand_over()       # takes the cleared ones out; Nova has cleared its own

    # --- the bus side ----------------------------------------------------------
    def deliver(self, event, message_id):
        """The host consumer's callback; returns an evrouter outcome."""
        previous = _current_context()
        try:
            return self._deliver(event, message_id)
        finally:
            # the next event's lines (one without a trace among them) must
            # not carry this one's request id
            _restore_context(previous)

    def _deliver(self, event, message_id):
        context = self._context_of(message_id, event)
        if event.name in NOVA_HANDLED:
            if not self.registry.first_sight(message_id):
                return evr_events.DUPLICATE
            self._handled_by_nova(event, message_id, context)
            return evr_events.DELIVERED
        if not self._expected(event) and not self._is_here(event.server_uuid):
            # Nobody here waits and the instance is not here: holding it
            # would let it satisfy a wait of a later stay on this host.
            if not self.registry.first_sight(message_id):
                return evr_events.DUPLICATE
            self.stats["not_here"] += 1
            LOG.info("event %s %s for instance %s (tag %s): the instance is "
                     "not on host %s (nor migrating to or from it): not "
                     "held", message_id, event.name, event.server_uuid,
                     event.tag, self.manager.host)
            return evr_events.STALE
        outcome = self.registry.deliver(event, message_id)
        self._hand_over(context)
        return outcome

    def _context_of(self, message_id, event):
        """Nova's context for what this event makes Nova do, on the host
        consumer's thread: its request id is the event's trace id (a W3C
        trace id is 128 bits, as a UUID is), so Nova's own log lines about
        it carry ``req-<trace>`` and `evrouter trace` finds the rest."""
        trace = self.trace_of()
        if trace is None:
            return self.context
        context = self.context.elevated()
        context.request_id = f"req-{uuid.UUID(hex=trace)}"
        # the thread's current context: what oslo.log puts on Nova's lines
        context.update_store()
        LOG.info("event %s %s for instance %s (tag %s): trace %s, Nova request "
                 "%s", message_id, event.name, event.server_uuid, event.tag,
                 trace, context.request_id)
        return context

    def _expected(self, event):
        with self._lock:
            return evr_events._key(event.server_uuid, event.name,
                                   event.tag) in self._prepared

    def _is_here(self, server_uuid, instance=None):
        """Nova's own rule (nova-api's ``_get_relevant_hosts``): this host
        is the instance's host or a side of its migration."""
        _, exception, objects, _ = _nova()
        try:
            if instance is None:
                instance = objects.Instance.get_by_uuid(
                    self.context, server_uuid, expected_attrs=["migration_context"])
            hosts = {instance.host}
            if instance.migration_context is not None:
                migration = objects.Migration.get_by_id(
                    self.context, instance.migration_context.migration_id)
                hosts |= {migration.source_compute, migration.dest_compute}
        except exception.InstanceNotFound:
            return False
        except Exception:
            # The database cannot say: hold it, as before this check.
            LOG.warning("instance %s: cannot tell whether it is on host %s; "
                        "events for it are held", server_uuid,
                        self.manager.host, exc_info=True)
            return True
        return self.manager.host in hosts

    def _handled_by_nova(self, event, message_id, context):
        _, exception, objects, _ = _nova()
        try:
            # As nova-api loads it for os-server-external-events.
            instance = objects.Instance.get_by_uuid(
                context, event.server_uuid,
                expected_attrs=["migration_context", "info_cache"])
        except exception.InstanceNotFound:
            LOG.info("event %s %s for instance %s: no such instance here",
                     message_id, event.name, event.server_uuid)
            return
        if not self._is_here(event.server_uuid, instance):
            # nova-api would not have sent it here either.
            self.stats["not_here"] += 1
            LOG.info("event %s %s for instance %s: the instance is not on "
                     "host %s: not handed to Nova", message_id, event.name,
                     event.server_uuid, self.manager.host)
            return
        self.manager.external_instance_event(
            context, [instance], [self._nova_event(event, instance.uuid)])
        self.stats["handled_by_nova"] += 1
        LOG.info("event %s %s for instance %s (tag %s): handed to Nova",
                 message_id, event.name, event.server_uuid, event.tag)

    def _hand_over(self, context=None):
        """Give Nova the events the registry resolved for its prepares."""
        context = context or self.context
        queue = self._arrivals.queue
        while queue:
            try:
                prepared = queue.popleft()
            except IndexError:
                return
            with self._lock:
                entry = self._prepared.get(prepared.key)
                if entry is None or entry[1] is not prepared:
                    continue
                del self._prepared[prepared.key]
            if prepared.how not in (waiting.RECEIVED, waiting.EARLY):
                continue        # cleared or cancelled: Nova does its own
            instance = entry[0]
            self.manager.external_instance_event(
                context, [instance],
                [self._nova_event(prepared.event, instance.uuid)])
            self.stats["woke_nova"] += 1

    @staticmethod
    def _nova_event(event, instance_uuid):
        _, _, objects, _ = _nova()
        return objects.InstanceExternalEvent(
            instance_uuid=instance_uuid, name=event.name, tag=event.tag,
            status=event.status)


def _current_context():
    from oslo_context import context
    return context.get_current()


def _restore_context(previous):
    """Make `previous` the thread's current context again (None: none).
    oslo.context has no public way to clear it: its store is a
    threading.local with one attribute."""
    from oslo_context import context
    if previous is not None:
        previous.update_store()
    else:
        vars(context._request_store).pop("context", None)


@functools.cache
def bus_instance_events_class():
    """Nova's InstanceEvents subclassed (built on first use: Nova imported then)."""
    _, exception, _, manager = _nova()
    from nova import utils

    class _BusEvent(manager.ThreadingEventWithResult):
        """Nova's waiter event; tells the bridge when Nova's wait timed out."""

        def __init__(self, bridge, instance, name, tag):
            super().__init__()
            self._evr = (bridge, instance, name, tag)

        def wait(self, timeout=None):
            result = super().wait(timeout)
            if result is self.FAILED_SENTINEL:
                bridge, instance, name, tag = self._evr
                bridge.ended(instance, name, tag)
            return result

    class BusInstanceEvents(manager.InstanceEvents):
        """Nova's instance-event registry, mirrored into evrouter's."""

        def __init__(self, bridge):
            super().__init__()
            self._bridge = bridge

        def prepare_for_instance_event(self, instance, name, tag):
            # Nova's own logic, with our event class so a timeout is seen.
            @utils.synchronized(self._lock_name(instance))
            def _create_or_get_event():
                if self._events is None:
                    raise exception.NovaException(
                        'In shutdown, no new events can be scheduled')
                instance_events = self._events.setdefault(instance.uuid, {})
                event = instance_events.get((name, tag))
                if event is None:
                    event = instance_events[(name, tag)] = _BusEvent(
                        self._bridge, instance, name, tag)
                return event
            event = _create_or_get_event()
            self._bridge.prepared(instance, name, tag)
            return event

        def clear_events_for_instance(self, instance):
            cleared = super().clear_events_for_instance(instance)
            self._bridge.cleared(instance)
            return cleared

        def cancel_all_events(self):
            super().cancel_all_events()
            self._bridge.registry.cancel_all()

    return BusInstanceEvents


class _BusDriver:
    """Mixed in before the real driver class: the bridge and the consumer."""

    _evrouter = None

    def init_host(self, host):
        result = super().init_host(host)
        conf = _conf()
        self._evrouter = HostBus.start(self.virtapi._compute, conf,
                                       conf.evrouter.host or host)
        return result

    def cleanup_host(self, host):
        if self._evrouter is not None:
            self._evrouter.stop()
            self._evrouter = None
        return super().cleanup_host(host)


class HostBus:
    """The bridge plus the host consumer thread of one nova-compute."""

    def __init__(self, bridge, consumer, thread):
        self.bridge = bridge
        self.consumer = consumer
        self.thread = thread

    @classmethod
    def start(cls, manager, conf, host):
        opts = conf.evrouter
        registry = evr_events.InstanceEvents(hold_seconds=opts.hold_seconds)
        bridge = NovaEventBridge(manager, registry)
        bridge.install()
        # A contradiction or an unreadable file in [evrouter]'s TLS options
        # stops nova-compute here with one line naming them.
        tls = options.checked_tls(opts.transport_url, options.ssl_from(conf, GROUP))
        # So does otlp_endpoint set without OpenTelemetry installed.
        journal_otlp.check(opts.otlp_endpoint, f"[{GROUP}] otlp_endpoint")
        otlp = journal_otlp.OtlpSettings(opts.otlp_endpoint) \
            if opts.otlp_endpoint else None
        settings = host_consumer.HostConsumerSettings(
            host=host, transport_url=opts.transport_url,
            topology=Topology(prefix=opts.topology_prefix), ssl=tls,
            journal=JournalSettings(transport_url=opts.transport_url,
                                    prefix=opts.topology_prefix, ssl=tls,
                                    stream=opts.journal, otlp=otlp)
            if opts.journal or otlp else None, stuck_after=opts.stuck_after)
        consumer = host_consumer.HostConsumer(settings, bridge.deliver,
                                              waits=registry)
        bridge.trace_of = lambda: consumer.current_trace
        # A native thread: nova-compute 34 runs on native threads. Under
        # eventlet mode the service has monkey-patched threading already.
        thread = threading.Thread(target=consumer.run, daemon=True,
                                  name=f"evrouter-host-consumer-{host}")
        thread.start()
        LOG.info("evrouter: consuming events of host %s%s", host,
                 f" as {tls.certificate_user()} (certificate)"
                 if tls and tls.login_method else "")
        return cls(bridge, consumer, thread)

    def stop(self, timeout=10.0):
        self.consumer.stop()
        self.thread.join(timeout)


def _conf():
    import nova.conf
    conf = nova.conf.CONF
    if GROUP not in conf:
        register_opts(conf)
    return conf


class EvrouterComputeDriver:
    """``compute_driver = evrouter.EvrouterComputeDriver``.

    Builds the configured real driver as a subclass with the bus added; the
    object nova-compute gets *is* a (subclass of the) real driver. With
    ``[evrouter] enabled = false`` it is an instance of the real driver class
    itself.
    """

    _classes = {}

    def __new__(cls, virtapi, read_only=False):
        conf = _conf()
        path = conf.evrouter.compute_driver
        real = importutils.import_class(f"nova.virt.{path}")
        if not conf.evrouter.enabled:
            # Rollback: the real driver itself, not our subclass with the bus
            # switched off, so nothing of evrouter runs in nova-compute.
            LOG.info("evrouter: disabled, compute driver %s as it is", path)
            return real(virtapi, read_only)
        wrapped = cls._classes.get(real)
        if wrapped is None:
            wrapped = cls._classes[real] = type(
                f"Evrouter{real.__name__}", (_BusDriver, real),
                {"__module__": __name__})
        LOG.info("evrouter: compute driver %s with the bus", path)
        return wrapped(virtapi, read_only)
