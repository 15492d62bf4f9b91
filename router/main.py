"""`evrouter router`: the router service's entry point."""

import gc
import uuid

from oslo_config import cfg

from router import journal, options, rest, routing, service
from router.bus import ops
from router.metrics import RouterCollector
from router.service_entry import fail, parse, stop_on_signals

router_opts = options.identity_opts + [
    cfg.IntOpt("prefetch", default=512, min=1, max=65535,     # AMQP's short
               help="Ingress messages in flight per router process (the "
                    "bounded window of pipelined confirms)."),
    options.FloatOpt("no_host_timeout", default=120.0, min=0,
                 help="Seconds an event whose instance has no known host is "
                      "retried (with backoff) before it is dead-lettered "
                      "with reason no-host."),
    cfg.ListOpt("allowed_publishers", default=[],
                help="Broker users allowed to publish instance events; others "
                     "are dead-lettered with reason forbidden. Empty: any "
                     "broker user. A message without a user_id is always "
                     "dead-lettered forbidden."),
    options.FloatOpt("drain_timeout", default=10.0, min=0,
                 help="On SIGTERM, seconds to wait for in-flight messages "
                      "to be confirmed before closing."),
    cfg.IntOpt("redelivery_limit", default=5, min=1,
               help="Deliveries of one ingress message that never got settled "
                    "(its router died or lost the broker each time) before "
                    "it is dead-lettered with reason poison."),
    options.FloatOpt("refused_patience", default=20.0, min=0.1,
                 help="Seconds a copy the broker refuses (a full queue, a "
                      "queue without a leader, an exchange that closes the "
                      "channel) keeps being tried before it is dead-lettered "
                      "with reason refused: a host copy in rounds parked in "
                      "the retry queues (their delays adding up to this), "
                      "any other copy in hand, with backoff; a dead letter "
                      "refused that long is dropped (logged at ERROR, "
                      "evrouter_router_dropped_total)."),
    options.FloatOpt("refused_hold", default=2.0, min=0.0,
                 help="Seconds a refused host copy is published again in "
                      "hand (a failover's blip passes here) before it is "
                      "parked in a retry queue for its host: the longest one "
                      "host's trouble holds a prefetch slot every host "
                      "shares. At most refused_patience."),
    options.FloatOpt("unplaced_hold", default=2.0, min=0.0, max=60.0,
                 help="Seconds an event with no host hint, for an instance "
                      "no compute host has reported yet, waits in the "
                      "router's hand for that placement: a lifecycle event "
                      "or snapshot for the instance routes it at once, "
                      "instead of at the end of its retry tier (0.5 to 16 "
                      "s). Past it, or over prefetch / 4 such events held, "
                      "the event is parked in the retry queues as before. "
                      "0 parks at once."),
    cfg.IntOpt("max_instances_per_host", default=2000, min=1,
               help="Instances one compute host may claim on the lifecycle "
                    "exchange; claims of further instances are ignored "
                    "(logged once, evrouter_router_placement_refused_total), "
                    "so one host cannot push the others' instances out of "
                    "the placement table."),
    options.FloatOpt("resync_window", default=5.0, min=0,
                 help="Longest the router waits for the agents' snapshots "
                      "after connecting (less once every host it heard of "
                      "has sent one). Meanwhile, and while not connected, "
                      "the REST endpoint answers 503 with Retry-After "
                      "rather than 404 for an instance it does not know, "
                      "and events for no known host are retried, never "
                      "dead-lettered."),
    cfg.BoolOpt("watch_stuck", default=True,
                help="With the journal on: follow the journal stream for the "
                     "waits compute hosts record stuck, for the "
                     "evrouter_stuck_waits gauge (one more connection, "
                     "reading the stream; `evrouter stuck` says why)."),
    cfg.StrOpt("name", regex=r"\A[ -~]{1,100}\Z",
               help="This router process's name in logs and dead-letter "
                    "headers (default: random): up to 100 printable ASCII "
                    "characters (its placement queue's name holds it, "
                    "within AMQP's 255 bytes)."),
    cfg.StrOpt("ops_listen", default="127.0.0.1:9310",
               help="host:port of the operations endpoint (/metrics, "
                    "/healthz); empty disables it."),
    cfg.BoolOpt("rest_api", default=False,
                help="Also accept the compute API's POST "
                     "/v2.1/os-server-external-events on the operations "
                     "endpoint and feed accepted events into the bus. No "
                     "authentication: bind ops_listen to a trusted network. "
                     "With allowed_publishers set, list "
                     "os-server-external-events there."),
]


def list_opts():
    return [("router", router_opts + rest.OPTS)]


def settings_from(conf):
    return service.RouterSettings(
        transport_url=options.transport_url(conf),
        topology=options.topology_from(conf),
        policy=routing.Policy(
            no_host_timeout=conf.router.no_host_timeout,
            allowed_publishers=frozenset(conf.router.allowed_publishers),
            compute_user_prefix=conf.router.compute_user_prefix,
            lifecycle_trusted_users=frozenset(
                conf.router.lifecycle_trusted_users)),
        prefetch=conf.router.prefetch,
        max_body_bytes=conf.bus.max_body_bytes,
        drain_timeout=conf.router.drain_timeout,
        redelivery_limit=conf.router.redelivery_limit,
        resync_window=conf.router.resync_window,
        refused_patience=conf.router.refused_patience,
        refused_hold=conf.router.refused_hold,
        unplaced_hold=conf.router.unplaced_hold,
        max_instances_per_host=conf.router.max_instances_per_host,
        heartbeat=conf.bus.heartbeat,
        ssl=options.ssl_from(conf),
        name=conf.router.name or uuid.uuid4().hex[:12],
        journal=journal.settings_from(conf, options.transport_url(conf),
                                      options.ssl_from(conf)),
        watch_stuck=conf.router.watch_stuck)


def main(argv):
    conf = parse(argv, "evrouter router",
                 "Route instance events from the ingress queue to each "
                 "compute host's exchange.", list_opts())
    settings = settings_from(conf)
    svc = service.RouterService(settings)
    rest_ingress = rest_server = ops_server = None
    opts = conf.router
    # Before the ops endpoint answers: a SIGTERM sent as soon as /healthz
    # is up must stop the router cleanly, not kill it.
    stop_on_signals(svc.stop)
    try:
        listen = ops.parse_listen(opts.ops_listen)
        if opts.rest_api and not listen:
            return fail("rest_api needs ops_listen: the REST endpoint is served there")
        if opts.rest_api:
            # The ops endpoint has no authentication: loopback only, unless
            # the operator says otherwise in so many words.
            rest.check_exposure(listen[0], authenticated=False,
                                allow_insecure=opts.rest_allow_insecure)
        if opts.rest_api or opts.rest_listen:
            rest_ingress = rest.RestIngress(
                settings.transport_url, settings.topology, svc.placement,
                ssl_opts=settings.ssl).start()
        if opts.rest_listen:
            rest_server = rest.serve_from_conf(conf, rest_ingress.handle)
        ops_server = ops.serve(opts.ops_listen, RouterCollector(svc), svc.health,
                               rest_ingress.routes() if opts.rest_api else None)
    except rest.InsecureListen as exc:
        _stop_rest(rest_ingress, rest_server)
        return fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        _stop_rest(rest_ingress, rest_server)
        return fail(f"ops or REST endpoint: {exc}", 1)
    tune_collector()
    try:
        svc.run()
    finally:
        if ops_server is not None:
            ops_server.stop()
        _stop_rest(rest_ingress, rest_server)
    return 0


# Container objects allocated, net of those freed, between two collections
# of the young generation (CPython's default: 700).
GC_YOUNG = 7000


def tune_collector():
    """The router's own garbage collection, set once it has started.

    An event's objects live from its delivery to its copy's confirm, a batch
    or two; with the default threshold the collector ran every ~70 events
    and walked everything built at start each time it reached the older
    generations: 3 us of a ~55 us event (tests/bench/router_cpu.py). What
    exists now lives as long as the process, so it is frozen out of every
    collection (gc.freeze), and the young generation is collected every
    GC_YOUNG allocations: once in 20,000 events. Cycles are still collected,
    and what the router holds in flight is bounded by its prefetch."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def _stop_rest(ingress, server):
    if server is not None:
        server.shutdown()
        server.server_close()
    if ingress is not None:
        ingress.stop()
