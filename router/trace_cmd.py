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

from router import journal, options
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
    cfg.FloatOpt("timeout", default=30.0, min=0.1,
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
         clock=time.time):
    """(records naming `wanted`, sorted by time; stats dict).

    Reads the journal of `prefix` from `since` seconds ago to its end.
    Raises TraceError when the stream cannot be read.
    """
    # a cheap test before a batch is decoded: it names `wanted` somewhere
    needles = {wanted.encode(), wanted.lower().encode()}
    return scan(transport_url, prefix, since, needles,
                lambda rec: matches(rec, wanted), ssl=ssl, timeout=timeout,
                clock=clock)


def scan(transport_url, prefix, since, needles, keep, *, ssl=False,
         timeout=30.0, clock=time.time):
    """(records for which keep(record) is true, sorted by time; stats).

    Only the batches whose body contains one of `needles` (bytes) are
    decoded. Raises TraceError when the stream cannot be read.
    """
    started = time.monotonic()
    name = journal.stream_name(prefix)
    conn = bus_connection.connection(transport_url, heartbeat=0, ssl_opts=ssl)
    errors = conn.connection_errors + conn.channel_errors
    stats = {"messages": 0, "records": 0, "end": None}
    found = []
    try:
        conn.connect()
        end = _mark_end(conn, name)
        stats["end"] = "marker" if end is not None else "probe"
        last_offset = None if end is not None else _probe_last(conn, name)
        if end is None and last_offset is None:
            return [], dict(stats, seconds=time.monotonic() - started)
        channel = conn.channel()
        channel.basic_qos(0, _PREFETCH, False)
        done = []
        unacked = [0, None]

        def on_message(message):
            stats["messages"] += 1
            props = message.properties or {}
            headers = props.get("application_headers") or {}
            offset = headers.get("x-stream-offset")
            unacked[0] += 1
            unacked[1] = message.delivery_tag
            if unacked[0] >= _PREFETCH // 2:
                channel.basic_ack(unacked[1], multiple=True)
                unacked[0] = 0
            if end is not None and props.get("message_id") == end:
                done.append(True)
                return
            body = message.body
            if any(needle in body for needle in needles):
                for rec in journal.decode_batch(body):
                    stats["records"] += 1
                    if keep(rec):
                        # who wrote it, as the broker vouches (user_id)
                        rec["user"] = props.get("user_id")
                        found.append(rec)
            if last_offset is not None and type(offset) is int \
                    and offset >= last_offset:
                done.append(True)

        since_at = datetime.datetime.fromtimestamp(clock() - since,
                                                   datetime.timezone.utc)
        channel.basic_consume(name, callback=on_message, no_ack=False,
                              arguments={"x-stream-offset": since_at})
        deadline = started + timeout
        while not done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TraceError(f"the end of {name} not reached within "
                                 f"{timeout:.0f}s ({stats['messages']} "
                                 f"message(s) read)")
            try:
                conn.drain_events(timeout=min(left, 1.0))
            except socket.timeout:
                pass
    except errors as exc:
        raise TraceError(f"cannot read {name}: {exc}") from None
    except OSError as exc:
        raise TraceError(f"cannot reach the broker: {exc}") from None
    finally:
        try:
            conn.release()
        except Exception:   # a dead connection's close
            pass
    found.sort(key=_timeline_order)
    return found, dict(stats, seconds=time.monotonic() - started)


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
              f"ago, in {stats['seconds']:.2f}s; times are each recorder's "
              f"clock (UTC)")
    return 0
