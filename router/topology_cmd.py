"""`evrouter topology`: show the bus topology, or declare it.

Under least privilege nobody may configure everything (router/permissions.py):
the router user declares the central topology, compute host H's user
declares H's exchange and queue. So `--declare` declares each entity the
connecting user may configure and only checks, passively, that the others
exist; a missing one it may not create is an error that says who can:

    evrouter topology --declare                  # as the router user
    evrouter topology --declare --host cmp-1     # as cmp-1's compute user

With [journal] enabled, the central part includes the journal of hops: the
fanout exchange and the stream <prefix>.journal (router/journal.py) and its
index (<prefix>.journal.index and .batches, bound), with the [journal]
retention, so that every part can write it from its first record on (only
the router user may declare it; the others only write what is there).
"""

import amqp.exceptions
from kombu import Queue
from oslo_config import cfg

from router import journal, options
from router.bus import connection, topology
from router.service_entry import fail, parse

cli_opts = [
    cfg.BoolOpt("declare", default=False,
                help="Declare everything the broker user may configure "
                     "(idempotent) and check that the rest exists."),
    cfg.MultiStrOpt("host", default=[],
                    help="Also show/declare this compute host's exchange and "
                         "queue (repeatable; under least privilege, run as "
                         "that host's compute user)."),
]

DECLARED, CHECKED, MISSING = "declared", "exists (not this user's to declare)", \
    "missing"


_OWNER = {"central": "the router user",
          "host": "that host's compute user"}


class BindRefused(Exception):
    """A queue this user declared, refused one of its bindings."""


def declare_or_check(conn, entity):
    """Declare `entity` (a kombu Exchange or Queue); if this user may not
    configure it, check passively that it exists. DECLARED, CHECKED or
    MISSING; a queue declared whose binding was refused raises BindRefused,
    and one whose binding waits for the central topology says so."""
    try:
        if not isinstance(entity, Queue):
            entity(conn.channel()).declare()
            return DECLARED
        # The queue alone first: a refusal here means not this user's to
        # declare; a refusal of one of its bindings is an error of its own.
        entity(conn.channel()).queue_declare()
    except amqp.exceptions.AccessRefused:
        pass
    else:
        try:
            waiting = topology.declare(conn.channel(), [], [entity])
        except amqp.exceptions.AccessRefused as exc:
            raise BindRefused(f"declared, but a binding was refused: {exc}") \
                from None
        refused = [why for _, _, _, why in waiting if why.startswith("refused")]
        if refused:
            raise BindRefused(f"declared, but a binding was {refused[0]}")
        if waiting:
            return DECLARED + "; " + "; ".join(
                f"not bound to {exchange} yet ({why}: declare the central "
                f"topology as the router user, apply the permissions; the "
                f"host consumer binds it then)"
                for _, exchange, _, why in waiting)
        return DECLARED
    # A refused declare closed its channel: the check gets a fresh one.
    channel = conn.channel()
    try:
        if isinstance(entity, Queue):
            channel.queue_declare(entity.name, passive=True)
        else:
            channel.exchange_declare(entity.name, entity.type, passive=True)
    except amqp.exceptions.NotFound:
        return MISSING
    return CHECKED


def main(argv):
    conf = parse(argv, "evrouter topology",
                 "Show the exchanges and queues of an evrouter deployment; "
                 "with --declare, create them.", cli_opts=cli_opts)
    topo = options.topology_from(conf)
    url = options.transport_url(conf)
    journal_settings = journal.settings_from(conf, url)
    central = topo.central()
    try:
        rows = topo.describe(conf.host)
    except ValueError as exc:
        return fail(f"--host: {exc}")
    if journal_settings is not None and journal_settings.stream:
        exchanges, queues = journal.declared_entities(journal_settings)
        central = (central[0] + exchanges, central[1] + queues)
        rows += [("exchange", e.name, e.type, "durable") for e in exchanges]
        for q in queues:
            bound = [b.exchange.name for b in q.bindings]
            args = ", ".join(f"{k}={v}"
                             for k, v in sorted(q.queue_arguments.items()))
            rows.append(("queue", q.name, "stream",
                         f"bound to {' and '.join(bound)} key ''; {args}"))
    for row in rows:
        print("  ".join(row))
    if not conf.declare:
        return 0
    parts = [("central", central)]
    parts += [(f"host {host}", topo.for_host(host)) for host in conf.host]
    missing = []
    with connection.connection(url, ssl_opts=options.ssl_from(conf)) as conn:
        errors = conn.connection_errors + conn.channel_errors
        try:
            connection.connect_once(conn)
        except errors as exc:
            # A refused login (403) is a channel error to py-amqp.
            return fail(connection.connect_error(conn, exc), 1)
        who = connection.user_of(conn) or "this user"
        for part, (exchanges, queues) in parts:
            for entity in [*exchanges, *queues]:
                try:
                    outcome = declare_or_check(conn, entity)
                except BindRefused as exc:
                    return fail(f"{entity.name}: {exc}", 1)
                except errors as exc:
                    return fail(f"{entity.name}: the broker at "
                                f"{connection.display(conn)} refused it: {exc}", 1)
                print(f"{entity.name}: {outcome}")
                if outcome == MISSING:
                    missing.append((part, entity.name))
    if missing:
        lines = [f"  {name} ({part}: declare it as "
                 f"{_OWNER['central' if part == 'central' else 'host']}, or "
                 f"as an administrator)" for part, name in missing]
        return fail(f"{who} may not declare these and they do not exist:\n"
                    + "\n".join(lines) + "\n(if this is that user, its permissions "
                    "predate these entities: run `evrouter permissions --apply` "
                    "first)", 1)
    print(f"declared on {connection.display(conn)}")
    return 0
