"""`evrouter publish`: one instance event from the command line.

Exit 0 once the broker confirmed it, 2 on bad input (naming the field), 1
when the broker did not confirm. It never spools: an operator's command
answers now, and its exit status is the only receipt.

Each run is a new event with a new message id, unless ``--message-id``
names one: a script that retries after exit 1 (the broker may have taken
the event without the confirm reaching us) gives the id of its first try,
or one derived from its own source event, and the waiter drops the copy.
"""

import signal
import threading

from oslo_config import cfg
from oslo_log import log as logging

from network import options as network_options
from network.publisher import BrokerUnavailable, InstanceEventPublisher, PublishRefused
from router import options
from router.bus import contract
from router.service_entry import fail, parse

cli_opts = [
    cfg.StrOpt("name", positional=True, required=False, metavar="NAME",
               help="Event name: " + ", ".join(contract.EVENT_NAMES)),
    cfg.StrOpt("server", metavar="UUID", help="The instance's UUID."),
    cfg.StrOpt("tag", help="The event's tag (the port id for network events)."),
    cfg.StrOpt("status", default=contract.COMPLETED, metavar="S",
               help="One of " + ", ".join(contract.STATUSES) + "."),
    cfg.StrOpt("host", metavar="H",
               help="Hint: the compute host the instance is on."),
    options.FloatOpt("timeout", default=5.0, min=0,
                 help="Seconds to keep trying before giving up."),
    cfg.StrOpt("message-id", metavar="ID",
               help="The event's message id (default: a new one). Reuse "
                    "the id of an earlier attempt, or derive it from the "
                    "source event, to make a retry harmless: the waiter "
                    "ignores an id it has seen."),
    cfg.StrOpt("traceparent", metavar="TP",
               help="W3C trace context of the caller "
                    "(00-<32 hex>-<16 hex>-<2 hex>): the event is published "
                    "as a new span of that trace. Default: a new trace. "
                    "`evrouter trace` finds the event by its trace id."),
]

# contract field -> the flag the user typed
_FLAGS = {"id": "--message-id", "payload.name": "NAME",
          "payload.server_uuid": "--server", "payload.tag": "--tag",
          "payload.status": "--status", "payload.host": "--host"}


def event_from(conf):
    """The InstanceEvent the arguments describe, or ValueError naming a flag."""
    for flag, value in (("NAME", conf.name), ("--server", conf.server),
                        ("--tag", conf.tag)):
        if not value:
            raise ValueError(f"{flag} is required")
    event = contract.InstanceEvent(name=conf.name, server_uuid=conf.server,
                                   tag=conf.tag, status=conf.status,
                                   host=conf.host)
    env = contract.envelope(event, "cli", message_id=conf.message_id)
    try:
        contract.from_document(contract.to_document(env))
    except contract.ContractError as exc:
        raise ValueError(f"{_FLAGS.get(exc.field, exc.field)}: {exc.detail}") \
            from None
    return event


class _Signalled(BaseException):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signals():
    """SIGTERM and SIGINT end the wait for the confirm at once (raised in
    the main thread, which waits); the flag says one came, and once it is
    set later signals are ignored."""
    came = threading.Event()

    def handler(signum, frame):
        if came.is_set():
            return          # once: the second is while closing
        came.set()
        raise _Signalled(signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return came


def main(argv):
    conf = parse(argv, "evrouter publish",
                 "Publish one instance event and wait for the broker's "
                 "confirm.", [("network", network_options.publisher_opts)],
                 cli_opts=cli_opts)
    # stdout carries the result line; logs go to stderr.
    conf.set_override("use_stderr", True)
    logging.setup(conf, "evrouter")
    try:
        event = event_from(conf)
    except ValueError as exc:
        return fail(str(exc), 2)
    settings = network_options.publisher_settings(
        conf, spool_path=None, retry_for=conf.timeout,
        confirm_timeout=max(min(conf.timeout, 5.0), 0.5),
        connect_timeout=max(min(conf.timeout, 2.0), 0.5))
    publisher = InstanceEventPublisher(settings).start()
    signalled = _on_stop_signals()
    try:
        receipt = publisher.publish(event, message_id=conf.message_id,
                                    traceparent=conf.traceparent)
    except (BrokerUnavailable, PublishRefused) as exc:
        return fail(f"not published: {exc}", 1)
    except _Signalled as sig:
        # The outcome line a caller's script reads, and an exit code that
        # says which signal (128 + its number), at once.
        which = f"event {conf.message_id}" if conf.message_id else "the event"
        fail(f"stopped by {sig}: {which} not confirmed (it may or may not "
             f"have reached the broker)", 1)
        return 128 + sig.signum
    finally:
        stopping = signalled.is_set()
        signalled.set()             # a signal from now on: closing anyway
        publisher.close(timeout=1.0 if stopping else 30.0)
    print(f"published {receipt.message_id}: {event.name} {event.status} for "
          f"{event.server_uuid} tag {event.tag}"
          + (f" host {event.host}" if event.host else ""))
    return 0
