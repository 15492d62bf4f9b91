"""`evrouter stuck`: the waits that are stuck now, and why, from the journal.

A compute service records each wait that stays pending ``stuck_after``
seconds (compute/wait_watch.py: ``wait-stuck``) and its end (``wait-ended``,
"was stuck; ..."). This command reads the journal twice: once for those
records (a cheap substring test skips every other batch), once for every
hop of the stuck waits' ports and instances; then ``diagnose`` (pure) names
the cause of each from those hops, most specific first:

- ``duplicate``: the event came, but under a message id the host had seen;
- ``stale``: the event came, but was judged out of date;
- ``expired``: it came before anybody waited, was held, and went unused;
- ``dead-lettered``: the router or the host set it aside (the reason);
- ``elsewhere``: routed or delivered to another host (placement's word);
- ``not matched``: this host got an event for the instance or port, but
  not the one waited for (the key that came and the key waited for);
- ``not delivered``: routed here, never taken from this host's queue;
- ``no host``: parked by the router, which knows no host for the instance;
- ``not routed``: published, and no router has recorded it since;
- ``never published``: nothing for that port: Neutron or its backend never
  said the port is up.

Exit 0 (with or without stuck waits), 1 when the journal cannot be read,
2 on bad arguments.
"""

import datetime
import json
from dataclasses import dataclass, field

from oslo_config import cfg

from router import journal, options, routing, trace_cmd
from router.service_entry import fail, parse

cli_opts = [
    cfg.StrOpt("since", default="1h", metavar="AGE",
               help="How far back to read: a number and s, m, h or d."),
    cfg.BoolOpt("all", default=False,
                help="Also the waits that were stuck and have ended since "
                     "(with how they ended)."),
    cfg.BoolOpt("json", default=False,
                help="One JSON object per stuck wait, for tools."),
    options.FloatOpt("timeout", default=60.0, min=0.1,
                 help="Longest each read of the journal may take, in "
                      "seconds."),
    cfg.IntOpt("max", default=50, min=1,
               help="Diagnose at most this many stuck waits, the latest "
                    "(each costs a read of its port's and instance's "
                    "hops); the others are counted."),
]

# Diagnosis classes
DUPLICATE = "duplicate"
STALE = "stale"
EXPIRED = "expired"
DEAD = "dead-lettered"
ELSEWHERE = "elsewhere"
NOT_MATCHED = "not matched"
NOT_DELIVERED = "not delivered"
NO_HOST = "no host"
NOT_ROUTED = "not routed"
NEVER_PUBLISHED = "never published"


@dataclass
class StuckWait:
    wid: str
    host: str
    instance: str
    port: object
    event: str
    since: float            # when it was recorded stuck (recorder's clock)
    user: object = None     # the broker user that wrote its records
    started: object = None  # when the wait started, if in the window
    ended: object = None    # the wait-ended record's detail, if it ended
    kind: str = ""
    why: str = ""
    evidence: list = field(default_factory=list)

    def as_json(self):
        return {"wait": self.wid, "host": self.host, "user": self.user,
                "instance": self.instance,
                "port": self.port, "event": self.event, "stuck_at": self.since,
                "started": self.started, "ended": self.ended,
                "diagnosis": self.kind, "why": self.why,
                "evidence": self.evidence}


def _host_of(rec):
    svc = rec.get("svc") or ""
    return svc[5:] if svc.startswith("host:") else None


def _when(t):
    if not isinstance(t, (int, float)):
        return "?"
    return (datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
            .strftime("%H:%M:%S.%f")[:-3])


_NAMES = ("hop", "mid", "svc", "node", "instance", "port", "event", "status")


def _sane(records):
    """The records whose names are strings (or absent) and whose time is a
    number: any user that may write the journal wrote them, so a list
    where a message id belongs must not stop the report."""
    out = []
    for rec in records:
        if type(rec) is not dict or any(
                type(rec.get(k)) not in (str, type(None)) for k in _NAMES):
            continue
        t = rec.get("t")
        if type(t) not in (int, float) or t != t:
            rec = dict(rec, t=None)
        out.append(rec)
    return out


def believed(records, policy):
    """The records whose writer may say them: a record of ``host:H`` only
    from H's own compute user (or a trusted one: routing.lifecycle_refusal,
    the rule the router applies to lifecycle claims). Any user may write
    the journal exchange; without this, a compromised host could report
    another host's waits stuck or ended, or their events duplicates."""
    out = []
    for rec in _sane(records):
        host = _host_of(rec)
        if host is None:
            # a host's kinds of record under another name: not believed
            if rec.get("hop") not in _HOST_HOPS:
                out.append(rec)
        elif routing.lifecycle_sender_ok(rec.get("user"), host, policy):
            out.append(rec)
    return out


# What only a host records: believed under its own name, from its own user.
_HOST_HOPS = frozenset({journal.DELIVERED, journal.MATCHED, journal.UNUSED,
                        journal.WAIT_STARTED, journal.WAIT_STUCK,
                        journal.WAIT_ENDED})


def stuck_waits(records, include_ended=False):
    """The stuck waits among wait records (dicts from the journal, believed
    ones: see believed)."""
    waits, started, ended = {}, {}, {}
    for rec in _sane(records):
        hop, wid = rec.get("hop"), rec.get("mid")
        if type(wid) is not str:
            continue
        if hop == journal.WAIT_STUCK:
            if _host_of(rec) is None:
                continue        # only a host records its waits
            waits[wid] = StuckWait(
                wid=wid, host=_host_of(rec),
                instance=rec.get("instance"), port=rec.get("port"),
                event=rec.get("event"), since=rec.get("t"),
                user=rec.get("user"))
        elif hop == journal.WAIT_STARTED:
            started[wid] = rec.get("t")
        elif hop == journal.WAIT_ENDED:
            ended[wid] = rec.get("detail")
    out = []
    for wid, w in waits.items():
        w.started = started.get(wid)
        w.ended = ended.get(wid)
        if w.ended is None or include_ended:
            out.append(w)
    out.sort(key=lambda w: w.since if isinstance(w.since, (int, float)) else 0)
    return out


def diagnose(wait, records):
    """Name the cause of one stuck wait from the journal's other records
    (those of its instance or port, any order). Pure; sets wait.kind,
    wait.why and wait.evidence (the records it rests on)."""
    key = (wait.instance, wait.event, wait.port)
    records = everything = _sane(records)
    waits = (journal.WAIT_STARTED, journal.WAIT_STUCK, journal.WAIT_ENDED)
    # Only what can concern this wait: after the last wait for the same key
    # on this host ended (a first boot's event, a redelivered copy or a
    # dead letter then belonged to that wait), and no message that woke a
    # wait (it was that wait's, on whichever host).
    began = wait.started        # None when its start left the window
    bound = began if began is not None else wait.since
    after = max((r["t"] for r in records
                 if r.get("hop") == journal.WAIT_ENDED and r.get("mid") != wait.wid
                 and _host_of(r) == wait.host and r.get("t") is not None
                 and (r.get("instance"), r.get("event"), r.get("port")) == key
                 and (bound is None or r["t"] <= bound)),
                default=None)
    woke = {r.get("mid"): r.get("t") for r in records
            if r.get("hop") == journal.MATCHED and r.get("detail") == "woken"}

    def its_own(r):
        # a message's hops up to the wait it woke were that wait's; a copy
        # of it after (a resend under the same id) may concern this one
        if r.get("mid") not in woke:
            return False
        t, woken = r.get("t"), woke[r.get("mid")]
        return t is None or woken is None or t <= woken
    records = [r for r in records if r.get("hop") not in waits
               and not its_own(r)
               and (after is None or r.get("t") is None or r["t"] > after)]
    related = [r for r in records
               if r.get("instance") == wait.instance
               or (wait.port is not None and r.get("port") == wait.port)]
    related.sort(key=trace_cmd._timeline_order)
    # The messages of the awaited event: any record naming its key says so,
    # and a record under the same message id (an invalid event's dead
    # letter names only its id) belongs to it too.
    ids = {r.get("mid") for r in related
           if (r.get("instance"), r.get("event"), r.get("port")) == key}
    mine = [r for r in records if r.get("mid") in ids]
    mine.sort(key=trace_cmd._timeline_order)

    def last(hop, where=None, pool=mine):
        found = [r for r in pool if r.get("hop") == hop
                 and (where is None or where(r))]
        return found[-1] if found else None

    def here(r):
        return _host_of(r) == wait.host

    def said(kind, why, *evidence):
        wait.kind, wait.why = kind, why
        wait.evidence = [r for r in evidence if r is not None]
        return wait

    what = f"{wait.event} for port {wait.port}" if wait.port else wait.event
    def since_began(r):
        return began is None or r.get("t") is None or r["t"] >= began

    for outcome, kind in (("duplicate", DUPLICATE), ("stale", STALE)):
        # dropped while this wait waited: before it, it was no loss to it
        m = last(journal.MATCHED, lambda r, o=outcome: here(r)
                 and r.get("detail") == o and since_began(r))
        if m is not None:
            why = ("it came (message {mid}) but its message id had been seen "
                   "before on this host: dropped as a duplicate (a resent id "
                   "for a new event?)" if kind == DUPLICATE else
                   "it came (message {mid}) but was judged out of date: late "
                   "for a wait that had ended, or older than a revision heard")
            return said(kind, why.format(mid=m.get("mid")), m)
    unused = last(journal.UNUSED, here)
    if unused is not None:
        held = last(journal.MATCHED, lambda r: here(r)
                    and r.get("mid") == unused.get("mid"))
        return said(EXPIRED, f"it came at {_when((held or unused).get('t'))} "
                             f"(message {unused.get('mid')}) before anybody "
                             f"waited, was held, and went unused: "
                             f"{unused.get('detail')}", held, unused)
    dead = last(journal.DEAD) or last(journal.DROPPED)
    if dead is not None:
        return said(DEAD, f"{'set aside' if dead['hop'] == journal.DEAD else 'dropped'} "
                          f"by {dead.get('svc')}: {dead.get('detail')}", dead)
    elsewhere = last(journal.DELIVERED, lambda r: not here(r))
    routed = last(journal.ROUTED)
    if elsewhere is not None:
        return said(ELSEWHERE, f"delivered to host {_host_of(elsewhere)} (the "
                               f"host its hint or placement named), not "
                               f"{wait.host}", routed, elsewhere)
    if routed is not None and isinstance(routed.get("detail"), list) \
            and wait.host not in routed["detail"]:
        return said(ELSEWHERE, f"routed to host(s) {', '.join(map(str, routed['detail']))}"
                               f" (where placement says instance "
                               f"{wait.instance} is), not {wait.host}", routed)
    other = last(journal.DELIVERED, here, pool=related)
    if other is not None and other.get("mid") not in ids:
        return said(NOT_MATCHED, f"this host got {other.get('event')} for port "
                                 f"{other.get('port')} of instance "
                                 f"{other.get('instance')} "
                                 f"({other.get('status')}, message "
                                 f"{other.get('mid')}); it waits for {what} of "
                                 f"instance {wait.instance}", other)
    # delivered here while this wait waited, and no outcome said for it
    # (one said before the wait, a duplicate of a first boot, is no cause)
    decided = {r.get("mid") for r in everything
               if r.get("hop") == journal.MATCHED and here(r)}
    delivered = last(journal.DELIVERED, lambda r: here(r) and since_began(r)
                     and r.get("mid") not in decided)
    if delivered is not None:
        return said(NOT_MATCHED, f"delivered here at {_when(delivered.get('t'))}"
                                 f" (message {delivered.get('mid')}); the "
                                 f"waiter's outcome is not in the journal",
                    routed, delivered)
    if routed is not None:
        return said(NOT_DELIVERED, f"routed to {wait.host} at "
                                   f"{_when(routed.get('t'))}, never taken "
                                   f"from its queue: is its consumer "
                                   f"running?", routed)
    retried = last(journal.RETRIED) or last(journal.PARKED)
    if retried is not None:
        return said(NO_HOST, f"parked by the router: {retried.get('detail')}",
                    retried)
    published = last(journal.PUBLISHED)
    if published is not None:
        return said(NOT_ROUTED, f"published at {_when(published.get('t'))} by "
                                f"{published.get('svc')}; no router recorded it "
                                f"since (is a router running, with the "
                                f"journal on?)", published)
    return said(NEVER_PUBLISHED, f"no record of {what} of instance "
                                 f"{wait.instance} in the journal: look at "
                                 f"Neutron and its backend (the port's status, "
                                 f"its agent)")


# unquoted: a batch is JSON or MessagePack (whose strings have no quotes)
_WAIT_NEEDLES = {journal.WAIT_STUCK.encode(), b"was stuck;"}


def find(transport_url, prefix, since, *, policy=routing.Policy(),
         include_ended=False, ssl=False, timeout=60.0, limit=50):
    """(stuck waits, the latest `limit` of them diagnosed; stats of the
    reads, the first with "undiagnosed": how many more there were)."""
    waits_only = (journal.WAIT_STUCK, journal.WAIT_STARTED, journal.WAIT_ENDED)
    records, stats = trace_cmd.scan(
        transport_url, prefix, since, _WAIT_NEEDLES,
        lambda rec: rec.get("hop") in waits_only, ssl=ssl, timeout=timeout)
    waits = stuck_waits(believed(records, policy), include_ended)
    stats["undiagnosed"] = max(0, len(waits) - limit)
    waits = waits[-limit:]
    if not waits:
        return [], [stats]
    ids = set()
    for w in waits:
        ids.add(w.instance)
        if w.port is not None:
            ids.add(w.port)
    ids.discard(None)
    # The second read: every hop of those instances and ports, and the
    # wait records again (a wait's start may sit in a batch without a
    # stuck record). Message ids of what they name come in the same pass.
    needles = {i.encode() for i in ids if isinstance(i, str)}
    # an invalid event's dead letter names only its message id
    needles |= {journal.DEAD.encode(), journal.DROPPED.encode()}
    related, more = trace_cmd.scan(
        transport_url, prefix, since, needles,
        lambda rec: rec.get("instance") in ids or rec.get("port") in ids
        or rec.get("hop") in (journal.DEAD, journal.DROPPED),
        ssl=ssl, timeout=timeout)
    related = believed(related, policy)
    started = {r["mid"]: r.get("t") for r in related
               if r.get("hop") == journal.WAIT_STARTED}
    for w in waits:
        w.started = w.started or started.get(w.wid)
        diagnose(w, related)
    return waits, [stats, more]


def format_wait(w):
    pending = ""
    if isinstance(w.started, (int, float)) and isinstance(w.since, (int, float)):
        pending = f", waiting since {_when(w.started)}"
    lines = [f"wait {w.wid} on host {w.host} (as {w.user}): {w.event} (port "
             f"{w.port}) of instance {w.instance}, stuck at "
             f"{_when(w.since)}{pending}"
             + (f"; ended: {w.ended}" if w.ended else "")]
    lines.append(f"  {w.kind}: {w.why}")
    lines += ["    " + trace_cmd.format_record(r) for r in w.evidence]
    return "\n".join(trace_cmd._shown(line) for line in lines)


def main(argv):
    conf = parse(argv, "evrouter stuck",
                 "The waits recorded stuck (a compute service waiting longer "
                 "than its stuck_after for an event) and why, from the "
                 "journal.", cli_opts=cli_opts,
                 opts_by_group=[("router", options.identity_opts)])
    try:
        since = trace_cmd.parse_age(conf.since)
    except ValueError as exc:
        return fail(str(exc))
    try:
        waits, stats = find(options.transport_url(conf), conf.bus.prefix,
                            since, policy=_policy(conf), include_ended=conf.all,
                            ssl=options.ssl_from(conf), timeout=conf.timeout,
                            limit=conf.max)
    except trace_cmd.TraceError as exc:
        return fail(str(exc), 1)
    if conf.json:
        for w in waits:
            print(json.dumps(w.as_json(), separators=(",", ":"),
                             sort_keys=True, default=str))
        return 0
    for w in waits:
        print(format_wait(w))
    seconds = sum(s["seconds"] for s in stats)
    more = stats[0]["undiagnosed"]
    print(f"# {len(waits)} stuck wait(s){' (ended ones too)' if conf.all else ''}"
          f" in {journal.stream_name(conf.bus.prefix)} since {conf.since} ago"
          + (f", and {more} older ones not diagnosed (--max)" if more else "")
          + f"; read in {seconds:.2f}s; a host's records believed only from "
          f"its compute user ([router] compute_user_prefix)")
    return 0


def _policy(conf):
    return routing.Policy(
        compute_user_prefix=conf.router.compute_user_prefix,
        lifecycle_trusted_users=frozenset(conf.router.lifecycle_trusted_users))
