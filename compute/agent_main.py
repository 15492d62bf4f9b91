"""`evrouter agent`: the libvirt lifecycle agent's entry point.

Runs on plain threads. A service that embeds the agent under eventlet
monkey-patches before importing compute.agent and calls
LifecycleAgent.run() itself.
"""

import socket

from oslo_config import cfg

from compute.agent_metrics import AgentCollector
from router import options
from router.bus import ops
from router.service_entry import fail, parse, stop_on_signals

cli_opts = [
    cfg.StrOpt("libvirt-uri", default="qemu:///system",
               help="libvirt connection URI to watch."),
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="This compute host's name, as the router and the "
                    "compute service know it."),
]

agent_opts = [
    options.FloatOpt("stopped_delay", default=15.0, min=0,
                 help="Seconds a STOPPED event is held back; any later event "
                      "of the same domain cancels it, so a reboot does not "
                      "look like a shutdown. 0 publishes at once."),
    cfg.IntOpt("keepalive_interval", default=5, min=0,
               help="libvirt keepalive interval in seconds, where the driver "
                    "supports keepalive (0 disables it)."),
    cfg.IntOpt("keepalive_count", default=3, min=1,
               help="Unanswered keepalives before libvirt closes the "
                    "connection."),
    options.FloatOpt("probe_interval", default=5.0, min=0.1,
                 help="Seconds between liveness probes of a libvirt "
                      "connection without keepalive."),
    options.FloatOpt("reconnect_max", default=30.0, min=0.1,
                 help="Longest wait between reconnect attempts, to libvirt "
                      "and to the broker."),
    cfg.IntOpt("outbox_limit", default=10_000, min=1,
               help="Lifecycle messages kept while the broker is away; "
                    "beyond it the oldest are dropped (consumers resync from "
                    "the snapshot published on reconnect)."),
    options.FloatOpt("drain_timeout", default=10.0, min=0,
                 help="On SIGTERM, seconds to keep publishing what is left "
                      "(held STOPPED events included) before exiting."),
    options.FloatOpt("snapshot_interval", default=300.0, min=0,
                 help="Seconds between periodic snapshots of every domain, so "
                      "a consumer that missed the others learns where "
                      "instances run within this time. 0: only on start, "
                      "reconnects and routers' resync requests."),
    options.FloatOpt("resync_min_interval", default=1.0, min=0,
                 help="Routers ask every agent for a snapshot when they "
                      "(re)connect; answer at most once per this many "
                      "seconds (requests in between are answered together)."),
    cfg.ListOpt("resync_from", default=[],
                help="Broker users whose resync requests are answered (the "
                     "router user, e.g. evrouter-router); a request with "
                     "another broker-validated user_id is ignored. Empty: "
                     "any user that may write the control exchange, which "
                     "the permissions of `evrouter permissions` give the "
                     "router user only. A request without a user_id is "
                     "always ignored."),
    cfg.StrOpt("ops_listen", default="127.0.0.1:9311",
               help="host:port of the operations endpoint (/metrics, "
                    "/healthz); empty disables it."),
    cfg.StrOpt("health_file",
               help="File the agent rewrites with 'ok: ...' or "
                    "'unhealthy: ...' whenever its health changes."),
]


def list_opts():
    return [("DEFAULT", cli_opts), ("agent", agent_opts)]


def settings_from(conf):
    from compute.agent import AgentSettings
    a = conf.agent
    return AgentSettings(
        host=conf.host, libvirt_uri=conf.libvirt_uri,
        transport_url=options.transport_url(conf),
        topology=options.topology_from(conf),
        stopped_delay=a.stopped_delay,
        keepalive_interval=a.keepalive_interval,
        keepalive_count=a.keepalive_count, probe_interval=a.probe_interval,
        reconnect_max=a.reconnect_max, outbox_limit=a.outbox_limit,
        drain_timeout=a.drain_timeout, heartbeat=conf.bus.heartbeat,
        ssl=options.ssl_from(conf), health_file=a.health_file,
        snapshot_interval=a.snapshot_interval,
        resync_min_interval=a.resync_min_interval,
        resync_from=tuple(a.resync_from))


def main(argv):
    conf = parse(argv, "evrouter agent",
                 "Republish this host's libvirt lifecycle events on the "
                 "lifecycle fanout exchange.", [("agent", agent_opts)],
                 cli_opts)
    try:
        options.topology_from(conf).check_host(conf.host)
    except ValueError as exc:
        return fail(f"--host: {exc}")
    from compute.agent import LifecycleAgent
    agent = LifecycleAgent(settings_from(conf))
    try:
        ops_server = ops.serve(conf.agent.ops_listen, AgentCollector(agent),
                               lambda: (agent.healthy, agent.health))
    except (OSError, ValueError) as exc:
        return fail(f"ops endpoint {conf.agent.ops_listen!r}: {exc}", 1)
    stop_on_signals(agent.stop)
    try:
        agent.run()
    finally:
        if ops_server is not None:
            ops_server.stop()
    return 1 if agent.failure else 0
