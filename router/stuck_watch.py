"""The stuck waits of every host, followed live from the journal, for metrics.

Compute hosts have no metrics endpoint of their own for their waits (the
waiter lives inside nova-compute), but they record each stuck wait in the
journal (compute/wait_watch.py). The router, which serves /metrics and may
read the journal stream, follows it: a thread with a connection of its own
consumes the stream from ``window`` seconds ago onwards, decodes only the
batches that mention a stuck wait (a substring test skips the rest), and
keeps the set of stuck waits not ended yet: ``evrouter_stuck_waits``
(gauge) and ``evrouter_stuck_waits_recorded_total``.

Bounded: a stuck wait whose end never comes (its host went away) is
forgotten after ``max_age``; at most ``max_waits`` are kept. Off the routing
path: a failure costs one WARNING and a backoff, never an event.
"""

import collections
import datetime
import logging
import socket
import threading
import time

from router import journal as journal_
from router import routing
from router.bus import connection as bus_connection

LOG = logging.getLogger(__name__)

# unquoted: a batch is JSON or MessagePack (whose strings have no quotes)
_NEEDLES = (journal_.WAIT_STUCK.encode(), b"was stuck;")
_ACK_EVERY = 50


class StuckWaits:
    """Stuck waits by host and wait id (pure: fed records, asked counts).

    Believes a host's records only from that host's compute user
    (routing.lifecycle_sender_ok with the router's policy), so a host can
    raise or clear only its own count; ages waits by when they were read
    here (monotonic), not by the recorder's clock; bounds each host's
    share and the ids' length, so no writer grows it past its budget."""

    MAX_ID = 64             # a wait id we write is about 20 characters

    def __init__(self, policy=None, max_age=3600.0, max_per_host=1_000,
                 max_hosts=10_000, clock=time.monotonic):
        self.policy = policy if policy is not None else routing.Policy()
        self.max_age = max_age
        self.max_per_host = max_per_host
        self.max_hosts = max_hosts
        self.clock = clock
        self.seen = 0               # stuck waits ever seen
        self.refused = 0            # records not believed (their writer)
        # host -> OrderedDict(wid -> when read), oldest first
        self._hosts = collections.OrderedDict()
        # host -> OrderedDict(wid) of ends read before their stuck record
        self._ended = collections.OrderedDict()

    def feed(self, rec, user):
        hop, wid, svc = rec.get("hop"), rec.get("mid"), rec.get("svc")
        if hop not in (journal_.WAIT_STUCK, journal_.WAIT_ENDED) or \
                type(wid) is not str or len(wid) > self.MAX_ID or \
                type(svc) is not str or not svc.startswith("host:"):
            return
        host = svc[5:]
        if len(host) > 255 or not routing.lifecycle_sender_ok(user, host,
                                                              self.policy):
            self.refused += 1
            return
        waits = self._hosts.get(host)
        ended = self._ended.get(host)
        if hop == journal_.WAIT_STUCK:
            if ended is not None and ended.pop(wid, None):
                return
            if waits is None:
                waits = self._hosts[host] = collections.OrderedDict()
                while len(self._hosts) > self.max_hosts:
                    self._hosts.popitem(last=False)
            if wid in waits:
                return
            waits[wid] = self.clock()
            self.seen += 1
            while len(waits) > self.max_per_host:
                waits.popitem(last=False)
        elif waits is None or waits.pop(wid, None) is None:
            # read before its stuck record (two writers' order): remembered,
            # within this host's own share
            if ended is None:
                ended = self._ended[host] = collections.OrderedDict()
                while len(self._ended) > self.max_hosts:
                    self._ended.popitem(last=False)
            ended[wid] = True
            while len(ended) > self.max_per_host:
                ended.popitem(last=False)

    def current(self):
        limit = self.clock() - self.max_age
        total = 0
        for host in list(self._hosts):
            waits = self._hosts[host]
            while waits:
                wid, read_at = next(iter(waits.items()))
                if read_at >= limit:
                    break
                del waits[wid]
            if waits:
                total += len(waits)
            else:
                del self._hosts[host]
        return total


class StuckWatch:
    """Follows the journal stream on a thread of its own."""

    def __init__(self, settings, policy=None, window=900.0, max_age=3600.0):
        self.settings = settings
        self.window = window
        self.waits = StuckWaits(policy, max_age=max_age)
        self.stats = collections.Counter()
        self._lock = threading.Lock()
        self._budget = {}           # user -> (bytes left, when)
        self._stop = threading.Event()
        self._thread = None

    def current(self):
        with self._lock:
            return self.waits.current()

    # Bytes a second of batches naming stuck waits one user may have
    # decoded (a burst of 4 s kept): a host writes a few KB of those.
    USER_BYTES_PER_S = 256 * 1024
    USER_BURST_S = 4.0

    def _may_decode(self, user, size):
        policy = self.waits.policy
        if not user or not (user.startswith(policy.compute_user_prefix)
                            or user in policy.lifecycle_trusted_users):
            self.waits.refused += 1
            return False
        now = time.monotonic()
        tokens, then = self._budget.get(user, (self.USER_BYTES_PER_S *
                                               self.USER_BURST_S, now))
        tokens = min(self.USER_BYTES_PER_S * self.USER_BURST_S,
                     tokens + (now - then) * self.USER_BYTES_PER_S)
        if size > tokens:
            self.stats["over_budget"] += 1
            self._budget[user] = (tokens, now)
            return False
        self._budget[user] = (tokens - size, now)
        if len(self._budget) > 10_000:
            self._budget.clear()
        return True

    @property
    def seen(self):
        return self.waits.seen

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="journal-stuck-watch")
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self):
        since = time.time() - self.window
        backoff = 0.0
        self.failing = False
        while not self._stop.is_set():
            started = time.time()
            try:
                self._follow(since)
                return
            except Exception as exc:    # never into the router
                self.stats["failures"] += 1
                if not self.failing:
                    self.failing = True
                    LOG.warning("stuck waits: cannot follow %s (%s: %s); the "
                                "gauge is stale until it can, trying again "
                                "with backoff", journal_.stream_name(
                                    self.settings.prefix), type(exc).__name__,
                                str(exc)[:200])
                # again from a little before the connection was made:
                # records seen twice change nothing
                since = started - 10.0
                backoff = min(30.0, max(1.0, backoff * 2))
                self._stop.wait(backoff)

    def _follow(self, since):
        s = self.settings
        conn = bus_connection.connection(s.transport_url, heartbeat=30,
                                         ssl_opts=s.ssl)
        try:
            conn.connect()
            # the router's journal writer declares the stream too; whichever
            # comes first (a user that may not: what is there is read)
            _, queue = journal_.entities(s)
            channel = conn.channel()
            try:
                queue(channel).declare()
            except conn.channel_errors:
                channel = conn.channel()
            channel.basic_qos(0, 2 * _ACK_EVERY, False)
            pending = [0]

            def on_message(message):
                pending[0] += 1
                if pending[0] >= _ACK_EVERY:
                    channel.basic_ack(message.delivery_tag, multiple=True)
                    pending[0] = 0
                body = message.body
                if not any(n in body for n in _NEEDLES):
                    return
                user = (message.properties or {}).get("user_id")
                # only a host's own user is believed: the others' batches
                # are not decoded at all, and a host's cost this thread at
                # most its byte budget (a compromised host sending 1 MiB
                # batches would otherwise hold the router's GIL)
                if not self._may_decode(user, len(body)):
                    return
                # decode_batch is total, and skips a body past its size
                records = journal_.decode_batch(body)
                with self._lock:
                    for rec in records:
                        self.waits.feed(rec, user)
                self.stats["batches"] += 1

            channel.basic_consume(
                journal_.stream_name(s.prefix), callback=on_message,
                no_ack=False, arguments={"x-stream-offset": datetime.datetime.
                                         fromtimestamp(since, datetime.timezone.utc)})
            LOG.info("stuck waits: following %s%s", journal_.stream_name(s.prefix),
                     " again" if self.failing else "")
            self.failing = False    # a later failure is said again
            while not self._stop.is_set():
                try:
                    conn.drain_events(timeout=1.0)
                except socket.timeout:
                    pass
                conn.heartbeat_check()
        finally:
            try:
                conn.release()
            except Exception:   # a dead connection's close
                pass
