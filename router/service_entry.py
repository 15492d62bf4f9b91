"""What every evrouter service's entry point does the same way."""

import signal
import sys

from oslo_config import cfg
from oslo_log import log as logging

from router import journal_otlp, options
from router.bus import connection as bus_connection


def parse(argv, prog, description, opts_by_group=(), cli_opts=(), defaults=None):
    """A ConfigOpts with the bus options plus the service's own, parsed.

    Reads /etc/evrouter/evrouter.conf (and --config-file/--config-dir) the
    way OpenStack services do. --help exits here.
    """
    conf = cfg.ConfigOpts()
    options.register_bus_opts(conf)
    logging.register_options(conf)
    for group, opts in opts_by_group:
        conf.register_cli_opts(opts, group=group)
    conf.register_cli_opts(list(cli_opts))
    for name, value in (defaults or {}).items():
        conf.set_default(name, value)
    try:
        conf(argv, project="evrouter", prog=prog, description=description)
        # Every value now, from the command line, a file or the environment:
        # a bad one is one line at start, not a traceback when first read.
        _read_every_value(conf)
    except cfg.Error as exc:
        raise SystemExit(fail(f"configuration: {exc}", 2)) from None
    logging.setup(conf, "evrouter")
    try:
        # The transport URL and the bus prefix: a service that cannot
        # connect or name its queues says so now, not in a restart loop.
        url = options.transport_url(conf)
        try:
            bus_connection.connection(url)
        except ValueError as exc:
            raise ValueError(f"transport URL: {exc}") from None
        options.topology_from(conf)
        # A TLS option that contradicts the URL, or names a file this
        # process cannot read: one line now, not a retry loop later.
        options.checked_tls(url, options.ssl_from(conf))
        # Spans asked for and OpenTelemetry not installed: the same.
        journal_otlp.check(conf.journal.otlp_endpoint)
    except ValueError as exc:
        raise SystemExit(fail(str(exc), 2)) from None
    return conf


def _read_every_value(conf):
    for name in list(conf):
        value = conf[name]
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            for opt in list(value):
                getattr(value, opt)


def stop_on_signals(stop):
    """SIGTERM and SIGINT ask `stop()` for a clean stop. SIGHUP (logrotate's
    and many operators' habit: "reload") is ignored: nothing is reloaded in
    place, and its default action killed the service mid-delivery."""
    def handler(signum, frame):
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def fail(message, code=2):
    print(f"evrouter: {message}", file=sys.stderr)
    return code
