"""What every evrouter service's entry point does the same way."""

import signal
import sys

from oslo_config import cfg
from oslo_log import log as logging

from router import journal_otlp, options


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
    conf(argv, project="evrouter", prog=prog, description=description)
    logging.setup(conf, "evrouter")
    try:
        # A TLS option that contradicts the URL, or names a file this
        # process cannot read: one line now, not a retry loop later.
        options.checked_tls(options.transport_url(conf), options.ssl_from(conf))
        # Spans asked for and OpenTelemetry not installed: the same.
        journal_otlp.check(conf.journal.otlp_endpoint)
    except ValueError as exc:
        raise SystemExit(fail(str(exc), 2)) from None
    return conf


def stop_on_signals(stop):
    """SIGTERM and SIGINT ask `stop()` for a clean stop."""
    def handler(signum, frame):
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def fail(message, code=2):
    print(f"evrouter: {message}", file=sys.stderr)
    return code
