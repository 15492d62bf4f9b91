"""`evrouter network-adapter`: notifications of the network service in,
instance events on the bus out."""

import logging
import threading

from oslo_config import cfg

from network import adapter, spool
from network import options as network_options
from network.publisher import InstanceEventPublisher
from router import options
from router.service_entry import fail, parse, stop_on_signals

LOG = logging.getLogger(__name__)

adapter_opts = [
    cfg.StrOpt("notification_transport_url", secret=True,
               help="Where the network service sends its notifications "
                    "(its [oslo_messaging_notifications] transport_url). "
                    "Default: the bus's transport_url."),
    cfg.StrOpt("exchange", default="neutron",
               help="The network service's control_exchange."),
    cfg.ListOpt("topics", default=["notifications"],
                help="Notification topics the network service emits to."),
    cfg.StrOpt("pool", default="evrouter-network-adapter",
               help="Listener pool (the queue name): adapters sharing a pool "
                    "share the notifications; other listeners of the topic "
                    "keep getting theirs."),
    cfg.IntOpt("max_ports", default=100_000, min=1,
               help="Ports whose last status is remembered."),
]


def list_opts():
    """For oslo-config-generator (the shared [DEFAULT]/[bus] options are
    listed by router.options)."""
    return [("network", network_options.publisher_opts),
            ("network_adapter", adapter_opts)]


def messaging_conf(conf):
    """oslo.messaging's options, read from the same files as ours."""
    mconf = cfg.ConfigOpts()
    mconf([], project="evrouter",
          default_config_files=list(conf.config_file or []),
          default_config_dirs=list(conf.config_dir and [conf.config_dir] or []))
    return mconf


def settings_from(conf):
    a = conf.network_adapter
    return adapter.AdapterSettings(
        transport_url=a.notification_transport_url or options.transport_url(conf),
        exchange=a.exchange, topics=tuple(a.topics), pool=a.pool,
        max_ports=a.max_ports, messaging_conf=messaging_conf(conf))


class _StoppedStarting(BaseException):
    """SIGTERM or SIGINT while the notification listener still connects."""


def main(argv):
    conf = parse(argv, "evrouter network-adapter",
                 "Turn the network service's port notifications into "
                 "instance events on the bus.",
                 [("network", network_options.publisher_opts),
                  ("network_adapter", adapter_opts)])
    stop, listening = threading.Event(), threading.Event()

    def on_signal():
        stop.set()
        if not listening.is_set():
            # oslo.messaging's start() retries its broker for ever on this
            # (main) thread: nothing is in hand yet, so leave it now.
            raise _StoppedStarting()
    stop_on_signals(on_signal)
    try:
        pub = InstanceEventPublisher(network_options.publisher_settings(conf)).start()
    except (OSError, spool.SpoolError) as exc:
        # the spool: a path that cannot be a file, or another adapter's
        return fail(f"[network] spool_path: {exc}", 2)
    try:
        try:
            svc = adapter.NetworkAdapter(settings_from(conf), pub.publish).start()
        except _StoppedStarting:
            LOG.info("network adapter stopped before its notification "
                     "broker answered")
            return 0
        listening.set()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            svc.stop()
    finally:
        pub.close()
    return 0
