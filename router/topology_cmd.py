"""`evrouter topology`: show the bus topology, or declare it."""

from oslo_config import cfg

from router import options
from router.bus import connection, topology
from router.service_entry import fail, parse

cli_opts = [
    cfg.BoolOpt("declare", default=False,
                help="Declare everything on the broker (idempotent)."),
    cfg.MultiStrOpt("host", default=[],
                    help="Also show/declare this compute host's exchange and "
                         "queue (repeatable)."),
]


def main(argv):
    conf = parse(argv, "evrouter topology",
                 "Show the exchanges and queues of an evrouter deployment; "
                 "with --declare, create them.", cli_opts=cli_opts)
    topo = options.topology_from(conf)
    for row in topo.describe(conf.host):
        print("  ".join(row))
    if not conf.declare:
        return 0
    url = options.transport_url(conf)
    with connection.connection(url, ssl_opts=options.ssl_from(conf)) as conn:
        try:
            connection.connect_once(conn)
        except conn.connection_errors as exc:
            return fail(f"cannot reach the broker at {connection.display(conn)}: {exc}", 1)
        ch = conn.channel()
        topology.declare(ch, *topo.central())
        for host in conf.host:
            topology.declare(ch, *topo.for_host(host))
    print(f"declared on {connection.display(conn)}")
    return 0
