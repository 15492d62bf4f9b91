"""The [evrouter] options of neutron.conf, apart from the plugin itself.

The plugin (network/neutron_plugin.py) needs Neutron to import; its options
must not: the README's neutron.conf snippet is loaded against them in the
main test run, where Neutron is not installed.
"""

from oslo_config import cfg

from router import options

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
    options.FloatOpt("publish_timeout", default=10.0,
                 help="Seconds a request waits for its event to be confirmed "
                      "or spooled before it goes on (the event is then "
                      "logged as lost)."),
    cfg.BoolOpt("replace_nova_notifier", default=False,
                help="True: Neutron's own nova notifier (keep "
                     "notify_nova_on_port_status_changes and "
                     "notify_nova_on_port_data_changes on) sends every event "
                     "on the bus and nothing to nova-api's REST, at once "
                     "(no send_events_interval batching); this carries "
                     "notify_port_active_direct (live migration, OVN) too. "
                     "False: the plugin observes port changes through "
                     "Neutron's callbacks, beside the REST notifier."),
] + options.tls_opts    # ssl, ssl_ca_file, ... ssl_login = external


def register_opts(conf):
    conf.register_opts(OPTS, group=GROUP)


def list_opts():
    return [(GROUP, OPTS)]
