"""oslo.config options of the network side, and their readers.

Only entry points read these; the library takes a PublisherSettings.
"""

import socket

from oslo_config import cfg

from network import publisher, spool
from router import journal, options
from router.bus import contract

publisher_opts = [
    cfg.StrOpt("spool_path", default="/var/lib/evrouter/network.spool",
               help="File keeping the events the broker has not confirmed "
                    "yet; they are sent, in order, when it answers again, "
                    "also after a restart. One process per file. Empty: no "
                    "spool (a publish the broker did not confirm fails)."),
    cfg.IntOpt("spool_max_records", default=spool.DEFAULT_MAX_RECORDS, min=1,
               help="Events the spool holds at most; beyond, publishing "
                    "fails loudly."),
    cfg.IntOpt("spool_max_bytes", default=spool.DEFAULT_MAX_BYTES, min=4096,
               help="Bytes of pending events the spool holds at most."),
    options.FloatOpt("retry_for", default=2.0, min=0,
                 help="Seconds an unconfirmed event is retried before it is "
                      "spooled (or, without a spool, reported as failed)."),
    options.FloatOpt("confirm_timeout", default=5.0, min=0.1,
                 help="Seconds to wait for the broker's confirm of a batch."),
    cfg.StrOpt("producer", default=f"network@{socket.gethostname()}",
               sample_default="network@<hostname>",
               # the contract's free text, checked at start, not per event
               regex=contract.TEXT_PATTERN,
               help="The producer named in every envelope (for logs; the "
                    "broker-validated user_id is what identifies us): 1 to "
                    "255 characters, no control character."),
]


def publisher_settings(conf, **overrides):
    n = conf.network
    values = dict(
        transport_url=options.transport_url(conf),
        topology=options.topology_from(conf),
        producer=n.producer,
        spool_path=n.spool_path or None,
        spool_max_records=n.spool_max_records,
        spool_max_bytes=n.spool_max_bytes,
        retry_for=n.retry_for,
        confirm_timeout=n.confirm_timeout,
        heartbeat=conf.bus.heartbeat,
        ssl=options.ssl_from(conf))
    values["journal"] = journal.settings_from(conf, values["transport_url"],
                                              values["ssl"])
    values.update(overrides)
    return publisher.PublisherSettings(**values)
