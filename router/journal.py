"""The journal of hops: one compact record per step of every event, on a stream.

Each evrouter process that handles instance events (the network side's
publisher and ``evrouter publish``, the router, a compute host's consumer)
appends a record per hop: published, routed, retried, dead-lettered,
dropped, delivered, and the waiter's match outcome. ``evrouter trace``
reads them back (router/trace_cmd.py).

Off the hot path: ``record(...)`` appends a tuple to a bounded deque and
returns; it never blocks, never raises, and drops the record (counted in
``stats["dropped"]``) when the deque is full. A thread of the journal's own,
with a connection of its own, takes records in batches (up to
``batch_records`` or ``batch_seconds`` after the first) and publishes each
batch as one confirmed message to the exchange ``<prefix>.journal``, bound
to the stream ``<prefix>.journal`` (``x-queue-type: stream`` with retention
by size and age). Publishing through an exchange rather than to the queue by
name: a user may write an exchange without writing the default one.

A broker that refuses (no stream, no permission, a stream declared with
other arguments) costs one WARNING line, then the writer backs off and
tries again; meanwhile records wait in the deque until it is full, then
are dropped and counted. The events themselves never wait for the journal.

A batch on the wire (MessagePack; JSON from writers before 2026-12-05, or
for a batch MessagePack cannot take): ``{"v": 1, "svc": service, "node": hostname,
"w": writer, "q": seq, "r": [[t, hop, message id, trace id, instance,
port, event, status, detail], ...]}``, its message id ``jb.<writer>.<seq>``
(the writer: a random id per Journal; seq counts its batches from 0).

The index (router/journal_index.py): before a group of batches, the writer
publishes one index message naming them (sequence numbers, times, id
fingerprints) to the exchange ``<prefix>.journal.index``, bound to the
stream of the same name; the batches go to ``<prefix>.journal.batches``,
bound to the journal stream only. ``<prefix>.journal`` is bound to both
streams: what writers before the index publish there (and `trace`'s end
marker) lands in the index stream too, so a trace reading the index still
sees their records. A broker without the index's exchanges (permissions or
declarations of before) gets the old way: batches to ``<prefix>.journal``.
 ``t`` is the recorder's wall clock (seconds since the
epoch, ``time.time()`` of the process that recorded it): clocks of
different machines may disagree, so a timeline across hosts is ordered by
these times only as well as those clocks agree.
"""

import collections
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import msgpack
from kombu import Exchange, Queue, binding

# journal_otlp imports OpenTelemetry only when used
from router import journal_index, journal_otlp
from router.bus import connection as bus_connection
from router.bus import publishing

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Hop kinds
PUBLISHED = "published"
ROUTED = "routed"
RETRIED = "retried"         # no host known yet: parked in a retry queue
PARKED = "parked"           # a host's copy refused: parked for that host
DEAD = "dead-lettered"
DROPPED = "dropped"
DELIVERED = "delivered"     # taken from the host's queue by its consumer
MATCHED = "matched"         # the waiter's outcome (detail)
# A compute service's waits (compute/wait_watch.py): message id = wait id
WAIT_STARTED = "wait-started"
WAIT_STUCK = "wait-stuck"   # pending past the threshold (once per wait)
WAIT_ENDED = "wait-ended"   # how (detail; "was stuck; ..." if it was)
UNUSED = "unused"           # a held early event nobody prepared: expired...

# The waiter's outcomes as the journal says them (compute/events.py's)
OUTCOMES = {"delivered": "woken", "held": "held early",
            "duplicate": "duplicate", "stale": "stale", "closed": "closed"}

FIELDS = ("t", "hop", "mid", "tid", "instance", "port", "event", "status",
          "detail")
HEADER_MARKER = "x-evrouter-journal-marker"


@dataclass
class JournalSettings:
    transport_url: str = bus_connection.DEFAULT_URL
    prefix: str = "evrouter"
    ssl: object = False
    # Retention of the stream: the broker deletes whole segments past
    # either limit, so a segment is small beside max_bytes.
    max_bytes: int = 1 << 30
    max_age: str = "24h"
    segment_bytes: int = 16 << 20
    batch_records: int = 500
    batch_seconds: float = 0.2
    # Batches named by one index message, at most.
    index_group: int = 20
    # Records waiting for the writer, at most; past it, dropped and counted.
    max_pending: int = 100_000
    heartbeat: int = 30
    # False: no stream, only the OTLP spans (an operator may want those alone)
    stream: bool = True
    # router/journal_otlp.py's OtlpSettings: each hop as a span too; None: no
    otlp: object = None


def stream_name(prefix):
    return f"{prefix}.journal"


def index_name(prefix):
    """The index stream and the exchange its writers publish to."""
    return f"{prefix}.journal.index"


def batches_exchange(prefix):
    """Where indexed batches go: bound to the journal stream only."""
    return f"{prefix}.journal.batches"


def names(prefix):
    """(queues, exchanges) of the journal, for tools and tests that clean up."""
    return ([stream_name(prefix), index_name(prefix)],
            [stream_name(prefix), index_name(prefix), batches_exchange(prefix)])


def batch_id(writer, seq):
    return f"jb.{writer}.{seq}"


def parse_batch_id(message_id):
    """(writer, seq) of a batch's message id; None for anything else."""
    if type(message_id) is not str or not message_id.startswith("jb."):
        return None
    writer, _, seq = message_id[3:].rpartition(".")
    # ASCII digits only: str.isdigit() takes "²", which int() refuses
    if not writer or not seq.isascii() or not seq.isdigit() or len(seq) > 20:
        return None
    return writer, int(seq)


def entities(settings):
    """(exchange, stream queue) of the journal, as kombu declares them."""
    name = stream_name(settings.prefix)
    exchange = Exchange(name, type="fanout", durable=True, auto_delete=False)
    queue = Queue(name, exchange=exchange, routing_key="", durable=True,
                  auto_delete=False, queue_arguments={
                      "x-queue-type": "stream",
                      "x-max-length-bytes": settings.max_bytes,
                      "x-max-age": settings.max_age,
                      "x-stream-max-segment-size-bytes": settings.segment_bytes})
    return exchange, queue


def index_entities(settings):
    """(index exchange, batches exchange, index stream queue, bindings
    [(queue, exchange name)]) of the index, as kombu declares them."""
    p = settings.prefix
    idx = Exchange(index_name(p), type="fanout", durable=True,
                   auto_delete=False)
    batches = Exchange(batches_exchange(p), type="fanout", durable=True,
                       auto_delete=False)
    _, main = entities(settings)
    queue = Queue(index_name(p), exchange=idx, routing_key="", durable=True,
                  auto_delete=False, queue_arguments={
                      "x-queue-type": "stream",
                      # the index is a few % of the journal: the same byte
                      # bound never cuts it before the journal's own age
                      "x-max-length-bytes": settings.max_bytes,
                      "x-max-age": settings.max_age,
                      "x-stream-max-segment-size-bytes": settings.segment_bytes})
    return idx, batches, queue, [(queue, stream_name(p)),
                                 (main, batches_exchange(p))]


def declared_entities(settings):
    """(exchanges, queues) of the whole journal, the index included, each
    queue carrying every binding it has: what a writer that may declare
    builds, for `evrouter topology --declare` to build before any part
    starts. A writer that may not declare checks only that the exchanges
    exist; the bindings must then be there already, or its first batches
    come back unroutable (a half-built index: the exchanges declared, the
    streams not yet bound)."""
    exchange, stream = entities(settings)
    idx, batches, index_queue, bindings = index_entities(settings)
    exchanges = {e.name: e for e in (exchange, idx, batches)}
    bound = {q.name: [q.exchange] for q in (stream, index_queue)}
    for queue, exchange_name in bindings:
        bound[queue.name].append(exchanges[exchange_name])
    # (kombu: a queue with `bindings` has no `exchange`; all go there)
    queues = [Queue(q.name, durable=True, auto_delete=False,
                    queue_arguments=q.queue_arguments,
                    bindings=[binding(e, routing_key="")
                              for e in bound[q.name]])
              for q in (stream, index_queue)]
    return list(exchanges.values()), queues


def encode_batch(service, node, records, writer=None, seq=None, *,
                 packed=True):
    """Records to one message body (bytes): MessagePack (`packed`), else
    JSON, the same document either way. Pure.

    MessagePack because the writer runs in the router's process, on its
    GIL: 0.5 us a record against JSON's 1.6 us (500-record batches), and a
    quicker decode for `trace`. Its strings are stored as UTF-8 bytes, so
    trace's substring test before decoding holds as for JSON. A value
    MessagePack cannot take (an int past 64 bits) sends the batch as JSON.
    """
    doc = {"v": FORMAT_VERSION, "svc": service, "node": node}
    if writer is not None:
        doc["w"], doc["q"] = writer, seq
    doc["r"] = records
    if packed:
        try:
            return msgpack.packb(doc, default=str)
        except (TypeError, ValueError, OverflowError):
            pass
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


# A batch evrouter writes is at most batch_records (500) records of a few
# hundred bytes; anything far larger is not ours, and decoding it would
# hold a reader (the router's stuck watch among them) for seconds.
MAX_BATCH_BYTES = 1 << 20
# Wall-clock times a record may carry: 1970 to 2286; NaN, inf or 1e20
# is not a time (and would break every reader that prints it).
_LATEST = 1e10
_NAMES = ("hop", "mid", "tid", "instance", "port", "event", "status")


def decode_batch(body):
    """A message body (JSON or MessagePack) to [record dict] (each with
    its batch's "svc" and "node"); [] for anything that is not a journal
    batch (a marker, an index message, a foreign message). Total, and every
    record it returns is sane: any user that may write the journal
    exchange wrote it (sane_record)."""
    if len(body) > MAX_BATCH_BYTES:
        return []
    try:
        if body[:1] == b"{":
            doc = json.loads(body)
        else:
            doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:       # whatever a foreign body makes either raise
        return []
    if type(doc) is not dict or doc.get("v") != FORMAT_VERSION:
        return []
    svc, node, rows = doc.get("svc"), doc.get("node"), doc.get("r")
    if type(rows) is not list or type(svc) not in (str, type(None)) \
            or type(node) not in (str, type(None)):
        return []
    out = []
    for row in rows:
        if type(row) is list and len(row) == len(FIELDS):
            rec = sane_record(dict(zip(FIELDS, row, strict=True)))
            if rec is not None:
                rec["svc"], rec["node"] = svc, node
                out.append(rec)
    return out


def sane_record(rec):
    """The record with a time that is a time (else None), or None when a
    name field is not a string: a message id that is a list is not one of
    ours, and readers hash and print these fields."""
    for name in _NAMES:
        if type(rec[name]) not in (str, type(None)):
            return None
    t = rec["t"]
    if type(t) not in (int, float) or not 0 <= t <= _LATEST:
        rec["t"] = None
    detail = rec["detail"]
    if type(detail) is list:
        if not all(type(d) is str for d in detail):
            rec["detail"] = [str(d) for d in detail]
    elif type(detail) not in (str, type(None)):
        rec["detail"] = str(detail)
    return rec


class NullJournal:
    """The journal switched off: records nothing."""

    enabled = False
    stats = collections.Counter()

    def record(self, *args, **kwargs):
        pass

    def start(self):
        return self

    def stop(self, timeout=5.0):
        pass


class Journal:
    """Records hops of one service and writes them to the journal stream."""

    enabled = True

    def __init__(self, settings, service, *, node=None):
        self.settings = settings
        self.service = service
        self.node = node or socket.gethostname()
        self.writer = uuid.uuid4().hex[:16]
        self._seq = 0
        self.stats = collections.Counter()
        self._pending = collections.deque()
        self._max = settings.max_pending
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = None
        # batches taken from _pending, not written yet: [seq, records,
        # indexed?], oldest first
        self._batches = collections.deque()
        self._indexed = True        # this session publishes an index
        self._index_refused = False     # this user may not write it
        self._failing = False       # said at WARNING; quiet until it works
        self.written = threading.Condition()

    # --- any thread -----------------------------------------------------------
    def record(self, hop, message_id, trace_id, instance, port, event, status,
               detail=None, at=None, span_id=None):
        """One hop (at `at`, default now, on this process's wall clock).
        Never blocks, never raises: a full journal drops it. `span_id`, the
        traceparent's, is for the OTLP spans only (router/journal_otlp.py):
        the stream does not keep it."""
        try:
            if len(self._pending) >= self._max:
                self.stats["dropped"] += 1
                return
            self._pending.append((at or time.time(), hop, message_id, trace_id,
                                  instance, port, event, status, detail))
        except Exception:       # never into the caller's path
            self.stats["dropped"] += 1

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"journal-{self.service}")
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        """Write what is pending (for at most `timeout`), then stop."""
        self._stop_at = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)

    @property
    def backlog(self):
        return len(self._pending) + sum(len(b[1]) for b in list(self._batches))

    def flushed(self, timeout=10.0):
        """Wait until every record so far is written (tests, tools)."""
        deadline = time.monotonic() + timeout
        with self.written:
            while self.backlog:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self.written.wait(min(left, 0.05))
        return True

    # --- the writer thread ------------------------------------------------------
    def _run(self):
        s = self.settings
        cpu0 = time.thread_time()
        delay = 0.0
        backoff = 0.0           # grows while the broker refuses, to 30 s
        conn = session = None
        while True:
            stopping = self._stop.is_set()
            # Stopping: what is pending is written, unless the broker is
            # refusing (a stop is not held up by a journal that fails).
            if stopping and (not self.backlog or self._failing or
                             time.monotonic() > self._stop_at):
                break
            if delay:
                if stopping:
                    time.sleep(max(0.0, min(delay, self._stop_at
                                            - time.monotonic())))
                else:
                    self._stop.wait(delay)
                delay = 0.0
                continue
            if not stopping and not self._pending and not self._batches:
                self._wake.wait(s.batch_seconds)
                self._wake.clear()
                continue
            if not stopping and not self._batches and \
                    len(self._pending) < s.batch_records:
                # the first record of a batch waits for company, a while
                self._wake.wait(s.batch_seconds)
                self._wake.clear()
            try:
                if session is None:
                    conn, session = self._connect()
                self._write(session)
                # this thread's CPU so far (the journal's cost to its process)
                self.stats["cpu_us"] = int((time.thread_time() - cpu0) * 1e6)
                if self._failing:
                    self._failing = False
                    LOG.info("journal %s: writing to %s again",
                             self.service, stream_name(s.prefix))
                backoff = 0.0
            except Exception as exc:        # never stop the writer
                if session is not None and self._indexed and \
                        _access_refused(exc):
                    # Permissions from before the index: write the old way
                    # (what reaches <prefix>.journal is in the index stream
                    # too, and trace finds it there).
                    self._index_refused = True
                    LOG.info("journal %s: may not write the index (%s); "
                             "batches go to %s unindexed", self.service, exc,
                             stream_name(s.prefix))
                    if conn is not None:
                        _release(conn)
                    conn = session = None
                    continue
                self._failed(exc)
                backoff = delay = min(30.0, max(0.5, backoff * 2))
                if conn is not None:
                    _release(conn)
                conn = session = None
        if conn is not None:
            _release(conn)
        dropped = self.backlog
        if dropped:
            self.stats["dropped"] += dropped
            LOG.warning("journal %s: stopped with %d record(s) not written",
                        self.service, dropped)
        with self.written:
            self.written.notify_all()

    def _connect(self):
        s = self.settings
        conn = bus_connection.connection(s.transport_url, heartbeat=0,
                                         ssl_opts=s.ssl)
        try:
            conn.connect()
            declared = self._declare(conn)
            self._indexed = (not self._index_refused and
                             self._index_declared(conn, declared))
            publisher = publishing.BlockingPublisher(
                conn, user_id=bus_connection.user_of(conn))
        except BaseException:
            _release(conn)
            raise
        return conn, publisher

    def _declare(self, conn):
        """Declare the exchange, the stream and their binding; a user that
        may not (no configure permission) publishes to what is there."""
        exchange, queue = entities(self.settings)
        channel = conn.channel()
        try:
            queue(channel).declare()
            return True
        except conn.channel_errors as exc:
            self.stats["declare_refused"] += 1
            LOG.debug("journal %s: declaring %s refused: %s", self.service,
                      queue.name, exc)
            return False
        finally:
            bus_connection.close_quietly(
                channel, conn.connection_errors + conn.channel_errors)

    def _index_declared(self, conn, may_declare):
        """Declare the index (stream, exchanges, bindings) if this user
        declared the journal; whether this session uses it: False (the old
        way, batches to the journal exchange) when it is not there."""
        idx, batches, queue, bindings = index_entities(self.settings)
        channel = conn.channel()
        try:
            if may_declare:
                try:
                    idx(channel).declare()
                    batches(channel).declare()
                    queue(channel).declare()
                    for q, exchange in bindings:
                        q(channel).bind_to(exchange=exchange, routing_key="")
                    return True
                except conn.channel_errors as exc:
                    self.stats["declare_refused"] += 1
                    LOG.debug("journal %s: declaring the index refused: %s",
                              self.service, exc)
                channel.close()
                channel = conn.channel()
            # Not ours to declare: use it if it is there.
            idx(channel).declare(passive=True)
            batches(channel).declare(passive=True)
            return True
        except conn.channel_errors:
            LOG.info("journal %s: no index on this broker (%s); batches go "
                     "to %s unindexed", self.service,
                     index_name(self.settings.prefix),
                     stream_name(self.settings.prefix))
            return False
        finally:
            bus_connection.close_quietly(
                channel, conn.connection_errors + conn.channel_errors)

    def _take(self):
        """Pending records into batches: all that are pending, up to
        `index_group` batches (one index message names them)."""
        s = self.settings
        pop = self._pending.popleft
        while len(self._batches) < s.index_group:
            n = min(len(self._pending), s.batch_records)
            if not n:
                return
            self._batches.append([self._seq, [pop() for _ in range(n)], False])
            self._seq += 1

    def _write(self, publisher):
        s = self.settings
        while True:
            self._take()
            if not self._batches:
                return
            if self._indexed:
                new = [b for b in self._batches if not b[2]]
                if new:
                    # the index first: a batch is never in the journal
                    # without its index entry (an entry without its batch
                    # is a harmless false positive)
                    body = journal_index.encode_index(
                        self.writer, self.service, self.node,
                        [(seq, recs[0][0], recs[-1][0],
                          journal_index.batch_fingerprints(recs))
                         for seq, recs, _ in new])
                    publisher.publish(index_name(s.prefix), "", body,
                                      timeout=5.0)
                    self.stats["index_messages"] += 1
                    self.stats["index_bytes"] += len(body)
                    for b in new:
                        b[2] = True
            while self._batches:
                seq, recs, _ = self._batches[0]
                if self._indexed:
                    body = encode_batch(self.service, self.node, recs,
                                        self.writer, seq)
                    publisher.publish(batches_exchange(s.prefix), "", body,
                                      message_id=batch_id(self.writer, seq),
                                      timeout=5.0)
                else:
                    body = encode_batch(self.service, self.node, recs)
                    publisher.publish(stream_name(s.prefix), "", body,
                                      timeout=5.0)
                with self.written:
                    self.stats["bytes"] += len(body)
                    self.stats["written"] += len(recs)
                    self.stats["batches"] += 1
                    self._batches.popleft()
                    self.written.notify_all()
            if len(self._pending) < s.batch_records and not self._stop.is_set():
                return

    def _failed(self, exc):
        self.stats["failures"] += 1
        what = f"{type(exc).__name__}: {str(exc)[:200]}"
        if not self._failing:
            self._failing = True
            LOG.warning("journal %s: cannot write to %s (%s); events are not "
                        "affected, records wait (at most %d) and are dropped "
                        "past that; trying again with backoff", self.service,
                        stream_name(self.settings.prefix), what, self._max)
        else:
            LOG.debug("journal %s: still cannot write: %s", self.service, what)
        if self._batches and len(self._pending) >= self._max:
            # the oldest batch goes: new records are worth as much
            self.stats["dropped"] += len(self._batches.popleft()[1])


def _access_refused(exc):
    """A 403 (this user may not write there), as py-amqp raises it."""
    return getattr(exc, "code", None) == 403 or \
        getattr(exc, "reply_code", None) == 403


def _release(conn):
    try:
        conn.release()
    except Exception:       # a dead connection's close
        pass


def settings_from(conf, transport_url, ssl=False):
    """The [journal] options as JournalSettings; None when neither the
    stream nor the OTLP spans are on."""
    j = conf.journal
    otlp = journal_otlp.settings_from(j)
    if not j.enabled and otlp is None:
        return None
    return JournalSettings(
        transport_url=transport_url, prefix=conf.bus.prefix, ssl=ssl,
        max_bytes=j.max_bytes, max_age=j.max_age,
        segment_bytes=j.segment_bytes, batch_records=j.batch_records,
        batch_seconds=j.batch_ms / 1000.0, max_pending=j.max_pending,
        stream=j.enabled, otlp=otlp)


def open_journal(settings, service):
    """The journal a service records its hops to: the stream, the OTLP
    spans (router/journal_otlp.py, which imports OpenTelemetry), both, or
    a NullJournal (settings None)."""
    if settings is None:
        return NullJournal()
    stream = Journal(settings, service) if settings.stream else None
    if settings.otlp is None:
        return stream if stream is not None else NullJournal()
    return journal_otlp.SpanJournal(settings.otlp, service,
                                    node=socket.gethostname(), stream=stream)


def from_conf(conf, service, transport_url, ssl=False):
    """The [journal] options to a journal (see open_journal)."""
    return open_journal(settings_from(conf, transport_url, ssl), service)
