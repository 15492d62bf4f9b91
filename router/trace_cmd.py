"""`evrouter trace ID`: every hop of an event, from the journal.

ID is a message id, a trace id, an instance uuid or a port id (tag). The
journal stream (router/journal.py) is read from a timestamp offset (now
minus ``--since``) to its end, and each record naming ID is printed, in
time order: when, which hop, which service on which node, and what it did.

The end of a stream is not something AMQP 0.9.1 says. The command first
appends a marker message of its own to the journal (confirmed), then reads
until it sees that marker: every record written before the command started
is before it. A user that may not write the journal falls back to a probe:
a consumer at offset "last" reads the stream's last chunk, and the trace
reads up to the highest offset seen there (``x-stream-offset`` of each
delivery).

Exit 0 with the timeline (possibly empty), 1 when the journal cannot be
read, 2 on bad arguments.
"""

import datetime
import json
import re
import socket
import time
import uuid

from oslo_config import cfg

from router import journal, journal_index, options
from router.bus import connection as bus_connection
from router.bus import publishing
from router.service_entry import fail, parse

cli_opts = [
    cfg.StrOpt("id", positional=True, required=False, metavar="ID",
               help="A message id, trace id, instance uuid or port id."),
    cfg.StrOpt("since", default="1h", metavar="AGE",
               help="How far back to read: a number and s, m, h or d."),
    cfg.BoolOpt("json", default=False,
                help="One JSON object per record, for tools."),
    options.FloatOpt("timeout", default=30.0, min=0.1,
                 help="Longest the read may take, in seconds."),
]

_AGE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PREFETCH = 1000
_LONGEST_AGE = 3650 * 86400.0


class TraceError(Exception):
    """The journal could not be read."""


def parse_age(text):
    """'90s', '30m', '1h', '2d' (or a bare number of seconds) to seconds."""
    m = _AGE.match((text or "").strip())
    if m is None:
        raise ValueError(f"--since: {text!r} is not a number with s, m, h or d")
    age = float(m.group(1)) * _UNITS[m.group(2)]
    if age > _LONGEST_AGE:
        raise ValueError(f"--since: {text!r} is longer than 10 years, older "
                         f"than any journal")
    return age


def matches(record, wanted):
    """Whether a record names `wanted`: its message id or port exactly, its
    instance uuid or trace id in any case (both are written lower case)."""
    folded = wanted.lower()
    return (wanted == record.get("mid") or wanted == record.get("port")
            or folded == record.get("instance") or folded == record.get("tid"))


def read(transport_url, prefix, wanted, since, *, ssl=False, timeout=30.0,
         clock=time.time, index=True):
    """(records naming `wanted`, sorted by time; stats dict).

    Reads the journal of `prefix` from `since` seconds ago to its end:
    through the index (router/journal_index.py) when there is one and
    `index`, else all of it. Raises TraceError when the stream cannot be
    read.
    """
    # a cheap test before a batch is decoded: it names `wanted` somewhere
    needles = {wanted.encode(), wanted.lower().encode()}
    return _read(transport_url, prefix, since, needles,
                 lambda rec: matches(rec, wanted), wanted if index else None,
                 ssl=ssl, timeout=timeout, clock=clock)


def scan(transport_url, prefix, since, needles, keep, *, ssl=False,
         timeout=30.0, clock=time.time):
    """(records for which keep(record) is true, sorted by time; stats).

    Reads all of the journal from `since` seconds ago to its end; only the
    batches whose body contains one of `needles` (bytes) are decoded.
    Raises TraceError when the stream cannot be read.
    """
    return _read(transport_url, prefix, since, needles, keep, None, ssl=ssl,
                 timeout=timeout, clock=clock)


def _read(transport_url, prefix, since, needles, keep, indexed, *, ssl,
          timeout, clock):
    """read() and scan(): through the index for the one id `indexed`,
    else the whole window."""
    started = time.monotonic()
    name = journal.stream_name(prefix)
    conn = bus_connection.connection(transport_url, heartbeat=0, ssl_opts=ssl)
    errors = conn.connection_errors + conn.channel_errors
    reader = _Reader(conn, needles, keep, started + timeout)
    stats = reader.stats
    try:
        conn.connect()
        end = _mark_end(conn, name)
        stats["end"] = "marker" if end is not None else "probe"
        now = clock()
        since_at = now - since
        done = False
        if end is not None and indexed is not None:
            done = _read_indexed(reader, indexed, prefix, end, since_at, now)
        if not done:
            stats["path"] = "full"
            last_offset = None if end is not None else _probe_last(conn, name)
            if end is None and last_offset is None:
                return [], dict(stats, seconds=time.monotonic() - started)
            reader.stream(name, since_at, end=end, last_offset=last_offset)
    except errors as exc:
        raise TraceError(f"cannot read {name}: {exc}") from None
    except OSError as exc:
        raise TraceError(f"cannot reach the broker: {exc}") from None
    finally:
        try:
            conn.release()
        except Exception:   # a dead connection's close
            pass
    found = list(reader.found.values())
    found.sort(key=_timeline_order)
    return found, dict(stats, seconds=time.monotonic() - started)


# How far before an indexed batch's first record time (its writer's clock)
# a read of the journal starts: the broker's chunks are found by the second
# (broker clock). A writer's clock off by more only costs reads further
# back (or further forward): the batch is found by its sequence number.
MARGIN = 3.0
# No read around a batch starts later than this before now: past the
# journal's end a stream consumer waits for new messages, not the marker.
FUTURE_SLACK = 30.0
# Index entries are published just before their batches: the index is read
# from a little before the journal's window.
INDEX_SLACK = 5.0
# Batches the index may name before a trace reads the whole window instead:
# one event's hops are in a handful.
MAX_TARGETS = 64
# A read around a batch stops early: what the broker sent past that point is
# read for nothing (a batch is up to ~100 KB).
_WINDOW_PREFETCH = 20


class _Reader:
    """Consumes stretches of the journal's streams; collects the records
    keep() wants, once each (a stretch may be read twice)."""

    def __init__(self, conn, needles, keep, deadline):
        self.conn = conn
        self.keep = keep
        self.deadline = deadline
        # a cheap test before a batch is decoded: it names what is wanted
        self.needles = needles
        self.stats = {"messages": 0, "records": 0, "end": None,
                      "path": "index", "reads": 0, "index_messages": 0,
                      "no_user": 0}
        self.found = {}
        self.seen = set()           # (stream, offset) decoded already

    def take(self, stream, offset, props, body):
        """Records of a batch naming `wanted` into found."""
        if (stream, offset) in self.seen:
            return
        self.seen.add((stream, offset))
        if not any(needle in body for needle in self.needles):
            return
        if not props.get("user_id"):
            # every writer of ours says who it is, and the broker checks
            # it; a batch without proves nothing about its writer
            self.stats["no_user"] += 1
            return
        for rec in journal.decode_batch(body):
            self.stats["records"] += 1
            if self.keep(rec):
                # who wrote it, as the broker vouches (user_id)
                rec["user"] = props.get("user_id")
                key = json.dumps(rec, sort_keys=True, default=str)
                self.found[key] = rec

    def consume(self, stream, offset_arg, on_message, prefetch=_PREFETCH):
        """Deliver `stream` from `offset_arg` to on_message(offset, props,
        body) until it returns True."""
        conn = self.conn
        self.stats["reads"] += 1
        channel = conn.channel()
        try:
            channel.basic_qos(0, prefetch, False)
            done = []
            unacked = [0, None]

            def deliver(message):
                if done:
                    return
                props = message.properties or {}
                headers = props.get("application_headers") or {}
                unacked[0] += 1
                unacked[1] = message.delivery_tag
                if unacked[0] >= prefetch // 2:
                    channel.basic_ack(unacked[1], multiple=True)
                    unacked[0] = 0
                try:
                    finished = on_message(headers.get("x-stream-offset"),
                                          props, message.body)
                except Exception:
                    # any user may write the journal: what a reader cannot
                    # make sense of is counted and passed, never its end
                    self.stats["unreadable"] = self.stats.get("unreadable", 0) + 1
                    finished = False
                if finished:
                    done.append(True)

            tag = channel.basic_consume(stream, callback=deliver, no_ack=False,
                                        arguments={"x-stream-offset":
                                                   offset_arg})
            while not done:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TraceError(f"the end of {stream} not reached in "
                                     f"time ({self.stats['messages']} "
                                     f"message(s) read)")
                try:
                    conn.drain_events(timeout=min(left, 1.0))
                except socket.timeout:
                    pass
            # what is in flight comes before the cancel's reply (ignored):
            # a channel closed with deliveries under way warns of each
            channel.basic_cancel(tag)
        finally:
            bus_connection.close_quietly(
                channel, conn.connection_errors + conn.channel_errors)

    def stream(self, name, since_at, *, end=None, last_offset=None,
               stop_offset=None, until=None, prefetch=_PREFETCH):
        """Read `name` from `since_at` (seconds since the epoch, broker
        clock) to the marker `end`, the offset `last_offset` (included) or
        `stop_offset` (excluded), or until until(message id) says so.
        Returns the first offset read (None if none)."""
        first = []

        def on_message(offset, props, body):
            self.stats["messages"] += 1
            if type(offset) is int:
                if not first:
                    first.append(offset)
                if stop_offset is not None and offset >= stop_offset:
                    return True
            if end is not None and props.get("message_id") == end:
                return True
            self.take(name, offset, props, body)
            if until is not None and until(props.get("message_id")):
                return True
            return (last_offset is not None and type(offset) is int
                    and offset >= last_offset)

        self.consume(name, _at(since_at), on_message, prefetch)
        return first[0] if first else None


def _at(when):
    return datetime.datetime.fromtimestamp(max(0.0, when),
                                           datetime.timezone.utc)


def _read_indexed(reader, wanted, prefix, end, since_at, now):
    """Trace `wanted` through the index; False when there is none to use
    (the caller reads the whole journal)."""
    conn, stats = reader.conn, reader.stats
    index, name = journal.index_name(prefix), journal.stream_name(prefix)
    wanted_fps = journal_index.wanted_fingerprints(wanted)
    targets = {}                # (writer, seq) -> first record time
    state = {"first": None, "first_batch": None}

    def on_index(offset, props, body):
        stats["index_messages"] += 1
        if state["first"] is None:
            state["first"] = offset
        if props.get("message_id") == end:
            return True
        if not props.get("user_id"):
            stats["no_user"] += 1       # names nothing we believe
            return False
        if journal_index.is_index(body):
            writer, hits = journal_index.matching(body, wanted_fps)
            if state["first_batch"] is None and writer is not None:
                entry = journal_index.first_entry(body)
                if entry is not None:
                    state["first_batch"] = (writer, entry)
            for seq, t0, _ in hits:
                targets[(writer, seq)] = t0
        else:
            # a batch of a writer before the index, copied here by the
            # journal exchange's binding
            reader.take(index, offset, props, body)
        return False

    try:
        reader.consume(index, _at(since_at - INDEX_SLACK), on_index)
    except conn.channel_errors:
        return False            # no index stream (or no right to read it)
    if state["first"] == 0:
        # The index began inside the window: what the journal holds from
        # before it was not indexed. Read the journal from the window's start
        # to the first indexed batch (or its end).
        stats["path"] = "index, young"
        first = state["first_batch"]
        if first is None:
            return False
        reader.stream(name, since_at, end=end,
                      until=lambda mid: journal.parse_batch_id(mid) == first,
                      prefetch=_WINDOW_PREFETCH)
    stats["batches_matched"] = len(targets)
    if len(targets) > MAX_TARGETS:
        # An id in that many batches (or a writer's forged entries): one
        # read of the whole window costs less than a read per batch.
        stats["path"] = "full (the index named too many batches)"
        return False
    _read_batches(reader, name, end, since_at, now, targets)
    return True


def _read_batches(reader, name, end, since_at, now, targets):
    """Read the stretches of the journal that hold the `targets` batches
    ({(writer, seq): first record time})."""
    got = set()                 # (writer, seq) read
    gone = set()                # (writer, seq) proven not in the journal
    newest = {}                 # writer -> highest seq read (this read)
    last = {}                   # writer -> seq read last (this read)

    def until(mid):
        ws = journal.parse_batch_id(mid)
        if ws is not None:
            got.add(ws)
            w, q = ws
            # A writer publishes its batches in order, each after the one
            # before was confirmed: its batches q-1 then q+1 read one after
            # the other prove q is not there (dropped after its index entry,
            # or a writer that died between the two). No reading back.
            before = last.get(w)
            if before is not None:
                for tw, tq in group:
                    if tw == w and before < tq < q and (tw, tq) not in got:
                        gone.add((tw, tq))
            last[w] = q
            if q > newest.get(w, -1):
                newest[w] = q
        # every batch of the group read, or passed (then it is further back)
        return all(newest.get(w, -1) >= q for w, q in group)

    floor = since_at - MARGIN
    # (this machine's clock against the broker's; a writer's clock ahead
    # only costs a read back)
    ceiling = now - FUTURE_SLACK
    for group in _groups(targets):
        group = [ws for ws in group if ws not in got]
        if not group:
            continue
        newest.clear()
        last.clear()
        start = max(floor, min(ceiling,
                               min(targets[ws] for ws in group) - MARGIN))
        stop = None
        back = MARGIN
        while True:
            first = reader.stream(name, start, end=end, stop_offset=stop,
                                  until=until, prefetch=_WINDOW_PREFETCH)
            missing = [ws for ws in group if ws not in got and ws not in gone]
            if not missing or start <= floor:
                break
            # Not read: it is further back (its writer's clock runs ahead of
            # the broker's, or it was written late); read the stretch before.
            reader.stats["reads_back"] = reader.stats.get("reads_back", 0) + 1
            group = missing
            newest.clear()
            last.clear()
            if first is not None:
                stop = first if stop is None else min(stop, first)
            back *= 4
            start = max(floor, start - back)


def _groups(targets, gap=2 * MARGIN):
    """Targets ({(writer, seq): time}) in time order, those within `gap`
    seconds of each other together (one read each)."""
    group, last = [], None
    for ws, t in sorted(targets.items(), key=lambda item: item[1]):
        if group and t - last > gap:
            yield group
            group = []
        group.append(ws)
        last = t
    if group:
        yield group


_HOP_ORDER = {h: i for i, h in enumerate((
    journal.PUBLISHED, journal.ROUTED, journal.RETRIED, journal.PARKED,
    journal.DEAD, journal.DROPPED, journal.WAIT_STARTED, journal.DELIVERED,
    journal.UNUSED, journal.WAIT_STUCK, journal.WAIT_ENDED, journal.MATCHED))}


def _timeline_order(rec):
    # by the recorder's time; equal times in the order hops happen
    t = rec.get("t")
    return (t if isinstance(t, (int, float)) else 0,
            _HOP_ORDER.get(rec.get("hop"), len(_HOP_ORDER)))


def _mark_end(conn, name):
    """Append a marker to the journal; its message id, or None if this
    user may not (then the caller probes)."""
    marker = f"trace-marker-{uuid.uuid4().hex}"
    probe = conn.clone()
    try:
        probe.connect()
        publishing.BlockingPublisher(probe).publish(
            name, "", b"{}", message_id=marker, timeout=5.0,
            headers={journal.HEADER_MARKER: marker})
        return marker
    except probe.connection_errors + probe.channel_errors + (
            publishing.PublishError, OSError):
        return None
    finally:
        try:
            probe.release()
        except Exception:   # a dead connection's close
            pass


def _probe_last(conn, name):
    """The highest offset in the stream's last chunk; None if empty."""
    channel = conn.channel()
    channel.basic_qos(0, _PREFETCH, False)
    seen = []

    def on_message(message):
        headers = (message.properties or {}).get("application_headers") or {}
        offset = headers.get("x-stream-offset")
        if type(offset) is int:
            seen.append(offset)
    # a stream consumer must acknowledge (no_ack is refused); the probe's
    # channel is closed unacknowledged, which costs the stream nothing
    channel.basic_consume(name, callback=on_message, no_ack=False,
                          arguments={"x-stream-offset": "last"})
    # The last chunk comes at once when there is one; a quiet 0.5 s after
    # the last delivery (or 1 s without any) ends the probe.
    quiet_until = time.monotonic() + 1.0
    count = 0
    while time.monotonic() < quiet_until:
        try:
            conn.drain_events(timeout=0.1)
        except socket.timeout:
            pass
        if len(seen) != count:
            count = len(seen)
            quiet_until = time.monotonic() + 0.5
    channel.close()
    return max(seen) if seen else None


def _shown(value):
    """A field fit for a terminal: message ids, ports and details may come
    from whoever published the event, escape sequences included."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return text.encode("unicode_escape").decode("ascii")


def format_record(rec):
    """One line of the timeline (every field made printable)."""
    rec = {k: (_shown(v) if isinstance(v, str) else
               [_shown(x) for x in v] if isinstance(v, list) else v)
           for k, v in rec.items()}
    t = rec.get("t")
    when = (datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            if isinstance(t, (int, float)) else "?")
    detail = rec.get("detail")
    if isinstance(detail, list):
        detail = "to host(s) " + ",".join(map(str, detail))
    # the service, the machine it runs on, the broker user that wrote it
    who = f"{rec.get('svc')} ({rec.get('node')}"
    who += f", {rec['user']})" if rec.get("user") else ")"
    what = f"{rec.get('event') or '-'} {rec.get('status') or '-'}"
    return (f"{when}  {rec.get('hop') or '?':<13} {who:<30} msg {rec.get('mid')}"
            f"  {what}  {detail if detail is not None else ''}").rstrip()


def _how(stats):
    if stats.get("path", "full") == "full":
        return "read whole"
    return (f"through the index: {stats.get('batches_matched', 0)} batch(es) "
            f"named it, {stats['reads']} read(s)")


def main(argv):
    conf = parse(argv, "evrouter trace",
                 "Every hop of an event (message id, trace id, instance uuid "
                 "or port id) from the journal stream.", cli_opts=cli_opts)
    if not conf.id:
        return fail("ID is required (a message id, trace id, instance uuid "
                    "or port id)")
    try:
        since = parse_age(conf.since)
    except ValueError as exc:
        return fail(str(exc))
    try:
        found, stats = read(options.transport_url(conf), conf.bus.prefix,
                            conf.id, since, ssl=options.ssl_from(conf),
                            timeout=conf.timeout)
    except TraceError as exc:
        return fail(str(exc), 1)
    if conf.json:
        for rec in found:
            print(json.dumps(rec, separators=(",", ":"), sort_keys=True))
    else:
        for rec in found:
            print(format_record(rec))
        print(f"# {len(found)} hop(s) for {conf.id}; {stats['records']} "
              f"record(s) decoded from {stats['messages']} message(s) of "
              f"{journal.stream_name(conf.bus.prefix)} since {conf.since} "
              f"ago ({_how(stats)}), in {stats['seconds']:.2f}s; times are "
              f"each recorder's clock (UTC)")
    return 0
