"""oslo.config options shared by every evrouter service, and their readers.

Only entry points read these: each turns the parsed ConfigOpts into plain
values (a Topology, a transport URL, TLS options) and passes them inward.
"""

from oslo_config import cfg

from router.bus import connection, contract, topology

transport_opt = cfg.StrOpt(
    "transport-url", default=connection.DEFAULT_URL, secret=True,
    help="Broker URL: rabbit://user:pass@host:port/vhost (several hosts "
         "separated by commas fail over in order), or memory:// for the "
         "in-process transport.")

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
                    "mechanism, the broker user is the client certificate's "
                    "CN (RabbitMQ's rabbitmq_auth_mechanism_ssl with "
                    "ssl_cert_login_from = common_name); no password on "
                    "this host."),
]


def register_bus_opts(conf):
    """[DEFAULT] transport_url and the [bus] group, also as --bus-* flags."""
    conf.register_cli_opt(transport_opt)
    conf.register_cli_opts(bus_opts, group="bus")


def transport_url(conf):
    return conf.transport_url


def topology_from(conf):
    return topology.Topology(prefix=conf.bus.prefix,
                             queue_type=conf.bus.queue_type,
                             delivery_limit=conf.bus.delivery_limit,
                             host_message_ttl_ms=conf.bus.host_message_ttl * 1000)


def ssl_from(conf):
    b = conf.bus
    return connection.ssl_options(b.ssl, b.ssl_ca_file, b.ssl_cert_file,
                                  b.ssl_key_file, b.ssl_login)


def list_opts():
    """For oslo-config-generator: the options every service shares."""
    return [("DEFAULT", [transport_opt]), ("bus", bus_opts)]
