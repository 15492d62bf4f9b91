"""oslo.config options shared by every evrouter service, and their readers.

Only entry points read these: each turns the parsed ConfigOpts into plain
values (a Topology, a transport URL, TLS options) and passes them inward.
"""

import math

from oslo_config import cfg, types

from router.bus import connection, contract, topology


class FiniteFloat(types.Float):
    """types.Float that refuses nan and inf: "nan" passes any min and max
    (every comparison with it is false), so a `min=0` delay of nan would be
    taken and then quietly switch its feature off (`delay > 0` is false)."""

    # Longer than any timer takes (threading's waits refuse past ~292
    # years; 1e10 s killed the agent's libvirt watcher): 31 years.
    LONGEST = 1e9

    def __init__(self, min=None, max=None, type_name="finite floating point value"):  # noqa: A002
        super().__init__(min=min, max=self.LONGEST if max is None else max,
                         type_name=type_name)

    def __call__(self, value):
        value = super().__call__(value)
        if not math.isfinite(value):
            raise ValueError(f"Should be a finite number, not {value}")
        return value


class FloatOpt(cfg.Opt):
    """cfg.FloatOpt with FiniteFloat: every float option of every service."""

    def __init__(self, name, min=None, max=None, **kwargs):    # noqa: A002 (cfg's names)
        super().__init__(name, type=FiniteFloat(min=min, max=max), **kwargs)

transport_opt = cfg.StrOpt(
    "transport-url", default=connection.DEFAULT_URL, secret=True,
    help="Broker URL: rabbit://user:pass@host:port/vhost (several hosts "
         "separated by commas fail over in order), or memory:// for the "
         "in-process transport.")

# TLS and x509 identity: [bus] for evrouter's own services, [evrouter] in
# nova.conf and neutron.conf (compute/nova_driver.py, network/neutron_plugin.py).
tls_opts = [
    cfg.BoolOpt("ssl", default=False,
                help="Connect to the broker over TLS (1.2 or later): its "
                     "certificate must verify against ssl_ca_file and name "
                     "the host of the transport URL. An amqps:// URL means "
                     "TLS too. Put the TLS port (5671) in the URL."),
    cfg.StrOpt("ssl_ca_file", help="CA bundle that signed the broker's "
                                   "certificate (default: the system's)."),
    cfg.StrOpt("ssl_cert_file", help="Client certificate (TLS client auth)."),
    cfg.StrOpt("ssl_key_file", help="Client certificate's private key."),
    cfg.StrOpt("ssl_login", default=connection.LOGIN_PASSWORD,
               choices=(connection.LOGIN_PASSWORD, connection.LOGIN_EXTERNAL),
               help="How to log in over TLS. password: the user and password "
                    "of the transport URL. external: the SASL EXTERNAL "
                    "mechanism, the broker user is named by the client "
                    "certificate (RabbitMQ's rabbitmq_auth_mechanism_ssl); "
                    "no password on this host."),
    cfg.StrOpt("ssl_cert_login_from", default="common_name",
               choices=connection.CERT_LOGIN_FROM,
               help="With ssl_login = external: where the broker takes the "
                    "user name from, as RabbitMQ's ssl_cert_login_from says: "
                    "the certificate's CN, or a subjectAltName."),
    cfg.StrOpt("ssl_cert_login_san_type", default="dns",
               choices=tuple(connection.SAN_TYPES),
               help="With ssl_cert_login_from = subject_alternative_name: "
                    "RabbitMQ's ssl_cert_login_san_type."),
    cfg.IntOpt("ssl_cert_login_san_index", default=0, min=0,
               help="With ssl_cert_login_from = subject_alternative_name: "
                    "RabbitMQ's ssl_cert_login_san_index (0: the first SAN "
                    "of that type)."),
]

bus_opts = [
    cfg.StrOpt("prefix", default="evrouter",
               help="Prefix of every exchange and queue name; a deployment "
                    "(or a test) owns everything under its prefix."),
    cfg.StrOpt("queue_type", default="classic",
               choices=topology.QUEUE_TYPES,
               help="Type of the durable queues. quorum replicates across a "
                    "cluster and gets an explicit delivery limit."),
    cfg.IntOpt("delivery_limit", default=5, min=1,
               help="quorum queues: deliveries of one message before it is "
                    "dead-lettered (RabbitMQ 3.10 has no limit by default)."),
    cfg.IntOpt("host_message_ttl", default=600, min=1,
               help="Seconds an event may wait in a compute host's queue "
                    "before it expires into the dead-letter exchange."),
    cfg.IntOpt("max_body_bytes", default=contract.DEFAULT_MAX_BODY_BYTES,
               min=512, help="Largest message body accepted; larger ones are "
                             "dead-lettered with reason too-large."),
    cfg.IntOpt("heartbeat", default=30, min=0,
               help="AMQP heartbeat in seconds (0 disables)."),
] + tls_opts


journal_opts = [
    cfg.BoolOpt("enabled", default=False,
                help="Append a record of each hop of every instance event "
                     "(published, routed, retried, dead-lettered, delivered, "
                     "the waiter's outcome) to the stream <prefix>.journal, "
                     "off the hot path, in batches; `evrouter trace` reads "
                     "it. A broker that refuses it costs a WARNING, never an "
                     "event. Off by default until its cost is shown to be "
                     "within 5 percent of throughput (README, The journal)."),
    cfg.IntOpt("max_bytes", default=1 << 30, min=1 << 20,
               help="Retention of the journal stream by size "
                    "(x-max-length-bytes). Applies when this process "
                    "declares the stream; a stream that exists keeps its "
                    "arguments."),
    cfg.StrOpt("max_age", default="24h",
               # RabbitMQ's x-max-age; anything else was a connection error
               # (541) at the declare, or a journal that never worked
               regex=r"\A[1-9][0-9]{0,8}[YMDhms]\Z",
               help="Retention of the journal stream by age (x-max-age: a "
                    "number and one of Y, M, D, h, m, s)."),
    cfg.IntOpt("segment_bytes", default=16 << 20, min=1 << 16,
               help="Segment size of the journal stream "
                    "(x-stream-max-segment-size-bytes): retention deletes "
                    "whole segments, so keep it well below max_bytes."),
    cfg.IntOpt("batch_records", default=500, min=1,
               help="Records per journal message, at most."),
    cfg.IntOpt("batch_ms", default=200, min=1,
               help="Longest a record waits for others to share its "
                    "message (milliseconds)."),
    cfg.IntOpt("max_pending", default=100_000, min=1,
               help="Records waiting to be written, at most (the broker "
                    "slow or refusing); past it they are dropped and "
                    "counted."),
    cfg.StrOpt("otlp_endpoint", default="",
               help="OTLP/HTTP (protobuf) traces URL, e.g. "
                    "http://collector:4318/v1/traces: each hop is also "
                    "exported as an OpenTelemetry span of its event's trace "
                    "(the traceparent's), in batches, off the hot path; with "
                    "or without the stream (enabled). Needs the extra "
                    "evrouter[otlp]. The OTEL_EXPORTER_OTLP_TRACES_* "
                    "environment variables (headers, certificate, "
                    "compression) apply. Empty: off, OpenTelemetry is not "
                    "even imported."),
    cfg.IntOpt("otlp_max_queue", default=20_000, min=1,
               help="Spans waiting to be sent, at most (the collector slow "
                    "or down); past it they are dropped and counted."),
    FloatOpt("otlp_timeout", default=5.0, min=0.1,
                 help="Seconds one export of spans may take, retries "
                      "included; a failed one drops its spans, and exports "
                      "pause with backoff (up to 30 s) while it fails."),
]


def register_bus_opts(conf):
    """[DEFAULT] transport_url, the [bus] group, also as --bus-* flags, and
    the [journal] group (--journal-*)."""
    conf.register_cli_opt(transport_opt)
    conf.register_cli_opts(bus_opts, group="bus")
    conf.register_cli_opts(journal_opts, group="journal")


def transport_url(conf):
    return conf.transport_url


def topology_from(conf):
    return topology.Topology(prefix=conf.bus.prefix,
                             queue_type=conf.bus.queue_type,
                             delivery_limit=conf.bus.delivery_limit,
                             host_message_ttl_ms=conf.bus.host_message_ttl * 1000)


def ssl_from(conf, group="bus"):
    """The TLS options of a group (TLS, or False): [bus] for evrouter's
    services, [evrouter] in nova.conf and neutron.conf. ValueError naming
    the option when they contradict each other."""
    g = conf[group]
    return connection.ssl_options(
        g.ssl, g.ssl_ca_file, g.ssl_cert_file, g.ssl_key_file, g.ssl_login,
        cert_login_from=g.ssl_cert_login_from, san_type=g.ssl_cert_login_san_type,
        san_index=g.ssl_cert_login_san_index, group=group)


def checked_tls(transport_url, tls):
    """What an entry point checks before it starts: the TLS options agree
    with the URL and name files this process can read (ValueError naming
    the option, the file and why)."""
    effective = connection.tls_for(transport_url, tls)
    if effective:
        effective.check_files()
        effective.certificate_user()
    return effective


# Who may speak for a compute host ([router]): the router believes
# lifecycle claims by them, and `evrouter stuck` the journal's host records.
identity_opts = [
    cfg.StrOpt("compute_user_prefix", default="evrouter-compute-",
               help="Compute host H's broker user is <prefix>H (empty: H); "
                    "lifecycle events and snapshots for host H are believed "
                    "only from that user (or a lifecycle_trusted_users one) "
                    "and ignored, counted in evrouter_forbidden_total, from "
                    "anyone else or without a user_id."),
    cfg.ListOpt("lifecycle_trusted_users", default=[],
                help="Broker users that may speak for every compute host on "
                     "the lifecycle exchange: only for a development broker "
                     "where all services log in as one user (guest). Empty "
                     "in a real deployment."),
]


def list_opts():
    """For oslo-config-generator: the options every service shares."""
    return [("DEFAULT", [transport_opt]), ("bus", bus_opts),
            ("journal", journal_opts)]
