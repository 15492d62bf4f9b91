"""The router's publish side: every copy an ingress message causes, to its end.

An ingress message in hand is an ``Entry``; each message it causes (a copy
per target host, a retry or probation copy, a dead letter) is a ``Copy``.
The entry is acknowledged once each of its copies reached an end: confirmed,
replaced by a dead letter, or dropped. Each failure stays in its domain:

- refused (nack: a full queue, a queue without a leader): the copy is
  published again with backoff, in hand, for ``hold`` seconds. A host copy
  still refused then is *parked*: published to a retry queue (a quorum
  queue that dead-letters it back to the router queue at least once) with
  its host named, and its ingress message is settled, so one host's
  trouble never keeps a prefetch slot that every host shares. It comes
  back after its tier for that host alone; once its rounds add up to
  ``patience`` seconds it is dead-lettered ``refused``. Held in hand once:
  a parked copy refused again, or any copy of a host parked within
  ``hold``, is parked at its first refusal, and for ``hold`` that host's
  new copies are parked without being published (then they go alone
  through the quarantine until one is confirmed). Retry, probation
  and dead-letter copies (central queues: everyone's trouble) are
  published again in hand for ``patience`` seconds, then their fallback.
  The ingress message is never requeued for the broker's trouble.
- returned (no queue bound to the hosts exchange with that host's name:
  no such host, or not yet, its consumer starting): the event's only copy
  has the event decided again after a retry tier (the session's
  ``alone_returned``); otherwise that host's copy is parked for it alone,
  as a refused one, and its ingress message settled; once its rounds add
  up to ``no_host_timeout`` it is dead-lettered ``unknown-host``, naming
  the host. The other hosts' copies stand. The router asks the broker
  nothing per host: a return is how it learns.
- the publish channel closed by the broker (404 no such exchange, 403...):
  the close does not say which publish caused it, so each copy that was
  pending on it is published again *alone* on a quarantine channel of its
  own, one at a time. The copy that closes the quarantine channel is the
  culprit; the others are confirmed there. New copies go on a fresh
  channel meanwhile: one bad copy never costs the session. A 404 is a
  central exchange gone (the hosts exchange included: an operator deleted
  it), declared again from the loop. A host copy that closed a channel
  alone with anything else is parked at once, and for ``hold`` seconds that
  host's new copies are parked without being published, so they cannot
  close the channel the other hosts' copies share.
- denied (403 "refused for user" on a copy alone): the router user may not
  write to that copy's exchange. Until a copy for another destination
  passes, the whole permission may be gone: every copy is held, one tried
  at a time with backoff, none runs out its patience. Once one passes (a
  partial grant), the denied destination refuses: a host's copies are
  parked as above, any other copy is refused until its patience ends.

Fallbacks: a host, retry or probation copy that cannot be placed becomes a
dead letter saying why (``refused``; ``unknown-host`` for a host with no
queue bound); a dead letter that cannot be placed is dropped with an ERROR line
and ``dropped:<reason>``. So no ingress message holds its prefetch slot for
longer than ``hold`` for a host's trouble, and about twice ``patience`` for
the central queues'.

Everything sent is bounded: the headers a dead letter copies from the
sender are cut to what fits in one frame (inbound.bounded_headers), since a
content header over frame_max makes the broker close the connection.
"""

import collections
import heapq
import itertools
import logging
import time

from router import journal as journal_
from router.bus import backoff, contract, inbound, publishing
from router.bus.connection import take

LOG = logging.getLogger(__name__)

HOST_COPY, RETRY, DEAD = "host", "retry", "dead"
HEADER_HOST = "x-evrouter-host"
# On a parked host copy (trusted only from the router's own user): the
# host it is for, and how many times it was parked.
HEADER_FOR_HOST = "x-evrouter-for-host"
HEADER_PARKED = "x-evrouter-parked"
# How many of those rounds were for want of its host's queue (returns): a
# return's rounds count against no_host_timeout, a refusal's against
# refused_patience, each from its own first tier.
HEADER_UNBOUND = "x-evrouter-unbound"
REASON_REFUSED = "refused"

_LOST = "channel-closed"
AVOIDED = "its host refused copies or closed a channel just now"
DENIED = "the router user may not write to its exchange"


class Entry:
    """An ingress message in hand, until all the copies it caused ended."""

    __slots__ = ("lane", "tag", "key", "message", "env_id", "ours",
                 "remaining", "started", "dropped", "parked", "unbound",
                 "fallback", "trace", "event", "routed")

    def __init__(self, lane, tag, message, env_id, ours, parked=0, unbound=0):
        self.started = time.monotonic()
        self.lane = lane
        self.tag = tag
        self.key = (lane.name, tag)     # in Delivery.entries: tags are per channel
        self.message = message
        self.env_id = env_id
        self.ours = ours            # published by the router's own user
        self.remaining = 0
        self.dropped = False
        self.parked = parked        # a host copy parked this many times before
        self.unbound = unbound      # ... of which for a return
        # (env, publisher, attempt, first_seen) while the event's one copy
        # is out to the one host it was decided for: if it comes back, the
        # event is decided again (Session._alone_returned), not parked
        # for that host alone.
        self.routed = None
        # Called instead of waiting out patience when its probation copy is
        # refused past hold: routes the message here (router/session.py).
        self.fallback = None
        # For the journal: the sender's traceparent (if valid),
        # the InstanceEvent it carries; None when there is none.
        self.trace = None
        self.event = None


class Copy:
    __slots__ = ("entry", "kind", "host", "exchange", "routing_key", "body",
                 "kwargs", "refusals", "first_refused", "suspect", "dest")

    def __init__(self, entry, kind, host, exchange, routing_key, body, kwargs):
        self.entry = entry
        self.kind = kind
        self.host = host
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.kwargs = kwargs
        self.refusals = 0
        self.first_refused = None
        self.suspect = False    # closed a channel once: quarantine only
        # What a write permission is denied for: the exchange, and for a
        # host copy its host too (every host's copies share the hosts
        # exchange; a topic permission may deny one host's key alone).
        self.dest = exchange if host is None else f"{exchange} key {host}"


class Delivery:
    """Publishes copies on channels it owns and settles their entries.

    ``conn`` is the session's connection; ``settled(entry)`` is called once
    an entry's last copy ended. ``no_host_timeout``: how long a host's
    copies returned for want of its queue are parked before they are
    dead-lettered ``unknown-host``. Call ``pump()`` after every drain.
    """

    def __init__(self, conn, topo, stats, *, settled, router_name,
                 patience=20.0, hold=2.0, no_host_timeout=120.0, user=None,
                 memory=False, alone_returned=None,
                 damaged=None, clock=time.monotonic, journal=None,
                 max_held=128):
        self.conn = conn
        # Copies for refusing central queues held in hand at most (each
        # holds its ingress delivery's prefetch slot): a quarter of the
        # window, so the other three quarters keep routing.
        self.max_held = max_held
        self.journal = journal or journal_.NullJournal()
        self.topo = topo
        self.stats = stats
        self._settled_cb = settled
        # Called with why when a central destination (a retry queue, the
        # dead-letter exchange or queue) turns out not to exist.
        self._damaged = damaged or (lambda why: None)
        self._router = router_name
        self.patience = patience
        self.hold = min(hold, patience)
        self.no_host_timeout = no_host_timeout
        # alone_returned(entry, host): the event's only copy came back
        # (see Entry.routed); it sends what replaces that copy.
        self._alone_returned = alone_returned
        # Parking needs TTLs (not in memory) and the router's own user_id on
        # the parked copy, so that its host is trusted when it comes back.
        self._user = None if memory else user
        self._avoid = {}            # host -> monotonic time its copies may go again
        # The broker refuses the router user's publishes to a destination
        # (403 "refused for user"). Until a copy for another destination
        # passes on a channel opened since, the whole write permission may
        # be gone: every copy is held, none tried before _denied_until, and
        # none runs out its patience. Once one passes, the grant is partial:
        # only the denied destinations' copies are refused (_denied_copy).
        self._denied_until = 0.0
        self._denials = 0           # in a row, none passed since
        self._denied = {}           # Copy.dest -> monotonic time it may be tried
        self._memory = memory
        self._clock = clock
        self._outcomes = []         # (copy or None, outcome): broker callbacks
        self._closed = []           # (channel, exc): ours, closed by the broker
        self._closed_others = []    # the same for channels we watch()
        self._delayed = []          # heap of (due, n, copy)
        self._quarantine = collections.deque()
        self._q_channel = self._q_publisher = None
        self._n = itertools.count()
        self.entries = {}           # (lane name, tag) -> Entry
        self.frame_max = inbound.frame_max_of(conn)
        self.channel, self.publisher = self._open()

    # --- channels -------------------------------------------------------------
    def _open(self, on_outcome=None):
        channel = self._publish_channel()
        # The publisher moves to a new channel after a nack (see
        # publishing.ConfirmedPublisher): it opens them here, so a broker
        # close of any of them is told like this one's.
        publisher = publishing.ConfirmedPublisher(
            channel, on_outcome or (lambda copy, outcome:
                                    self._outcomes.append((copy, outcome))),
            open_channel=self._publish_channel)
        return channel, publisher

    def _publish_channel(self):
        channel = self.conn.channel()
        channel.on_broker_close = lambda ch, exc: self._closed.append((ch, exc))
        return channel

    def watch(self, channel):
        """Have a broker-side close of the session's other channels (lanes,
        the placement consumer) told, not raised: see closed_channels()."""
        channel.on_broker_close = lambda ch, exc: self._closed_others.append(
            (ch, exc))
        return channel

    def closed_channels(self):
        """[(channel, exc)] of watched channels the broker closed since."""
        return take(self._closed_others) if self._closed_others else ()

    @property
    def idle(self):
        return not (self.entries or self._outcomes or self._quarantine
                    or self._delayed)

    @property
    def held(self):
        """Whether nothing in hand would go out by waiting for it: the
        broker refuses every publish of the router's, as far as it knows,
        or each copy not placed yet is for a destination it may not write
        (a partial grant), none pending a confirm. Asked when stopping."""
        if self._denials:
            return True
        if not self._denied or self._outcomes or self.publisher.in_flight or (
                self._q_publisher is not None and self._q_publisher.in_flight):
            return False
        waiting = [c for _, _, c in self._delayed] + list(self._quarantine)
        return bool(waiting) and all(c.dest in self._denied
                                     for c in waiting)

    # --- entries and copies ---------------------------------------------------
    def track(self, lane, tag, message, env_id, *, ours=False, parked=0,
              unbound=0):
        entry = Entry(lane, tag, message, env_id, ours, parked, unbound)
        self.entries[entry.key] = entry
        return entry

    def forget_lane(self, lane):
        """The lane's channel is gone and the broker requeued what it held:
        outcomes of those entries' copies no longer settle anything."""
        for key in [k for k, e in self.entries.items() if e.lane is lane]:
            del self.entries[key]

    def send(self, entry, kind, host, exchange, routing_key, body, **kwargs):
        copy = Copy(entry, kind, host, exchange, routing_key, body, kwargs)
        entry.remaining += 1
        if self._avoid and host in self._avoid:
            if self._avoided(host):
                return self._park(copy, AVOIDED)
            # Half open: this host's copies go alone, through the quarantine,
            # until one is confirmed there; never on the shared channel.
            copy.suspect = True
            return self._quarantine.append(copy)
        if self._denied and (self._denials or copy.dest in self._denied):
            # Held with the others until one passes; or for a destination
            # the router may not write: alone, never on the shared channel.
            copy.suspect = True
            return self._quarantine.append(copy)
        while self._closed:
            self._take_closures()       # as in _publish
        # A new copy is never suspect: _publish's other half is not needed.
        self.publisher.publish(exchange, routing_key, body, copy, **kwargs)

    def send_untracked(self, exchange, routing_key, body, **kwargs):
        """A message no ingress message waits for (a resync request, a
        parked retry put back): its outcome settles nothing."""
        while self._closed:
            self._take_closures()
        self.publisher.publish(exchange, routing_key, body, None, **kwargs)

    def _publish(self, copy):
        while self._closed:
            # A close read by any drain (a passive declare's wait, too) is
            # acted on before the next publish: the old channel is gone.
            # Again if acting on it drained more (a close waits for its
            # close-ok): a CI run published on a channel closed that way.
            self._take_closures()
        if copy.suspect or self._denials:
            copy.suspect = True
            self._quarantine.append(copy)
        else:
            self.publisher.publish(copy.exchange, copy.routing_key, copy.body,
                                   copy, **copy.kwargs)

    def holds(self, entry):
        """Whether `entry` is still in hand (its lane's channel not gone)."""
        return self.entries.get(entry.key) is entry

    # --- the loop's turn --------------------------------------------------------
    def pump(self):
        """Settle what the broker said since the last turn, publish what is
        due again. Returns True if there was anything to do."""
        busy = bool(self._outcomes or self._closed)
        self.publisher.pump()
        if self._q_publisher is not None:
            self._q_publisher.pump()
        # Each fault's work only when there is some: this runs every turn.
        if self._closed:
            self._take_closures()
        if self._outcomes:
            for copy, outcome in take(self._outcomes):
                if copy is not None:
                    self._outcome(copy, outcome)
        if self._delayed:
            now = self._clock()
            while self._delayed and self._delayed[0][0] <= now:
                copy = heapq.heappop(self._delayed)[2]
                if not self.holds(copy.entry):
                    continue
                if copy.kind == HOST_COPY and self._avoid \
                        and copy.host in self._avoid and self._user is not None:
                    # another copy of its host was parked meanwhile
                    self._park(copy, AVOIDED)
                else:
                    self._publish(copy)
        if self._quarantine:
            self._feed_quarantine()
        return busy

    def _outcome(self, copy, outcome):
        entry = copy.entry
        if self.entries.get(entry.key) is not entry:     # not holds()
            return
        if outcome == publishing.ACK:
            if copy.kind == HOST_COPY:
                self.stats["out"] += 1
            if copy.refusals:
                LOG.info("event %s: the %s copy%s was accepted after %d "
                         "refusal(s)", entry.env_id, copy.kind,
                         _for_host(copy), copy.refusals)
            # _ended(entry), inline: every copy of every event passes here
            entry.remaining -= 1
            if entry.remaining == 0:
                del self.entries[entry.key]
                self._settled_cb(entry)
            return
        if outcome == publishing.RETURNED:
            if copy.kind == HOST_COPY:
                return self._returned(copy)
            # A retry or probation queue, or the dead-letter queue, is gone:
            # ours to declare again; the copy is then published again.
            self._damaged(f"{copy.kind} copy to {copy.exchange or 'queue'} "
                          f"{copy.routing_key} returned unroutable")
        self._refused(copy, outcome)

    def _refused(self, copy, outcome):
        """Published again with backoff for a while, in hand; a host copy is
        then parked, anything else given up after patience."""
        now = self._clock()
        copy.refusals += 1
        if copy.first_refused is None:
            copy.first_refused = now
        self.stats["refused"] += 1
        entry = copy.entry
        parking = copy.kind == HOST_COPY and self._user is not None
        if parking and (now - copy.first_refused >= self.hold or entry.parked
                        or copy.host in self._avoid):
            # Held in hand for hold once per host and event: a copy parked
            # before, or for a host already found refusing, is parked at
            # once (each held copy keeps its ingress delivery in the
            # prefetch window), and the host's next copies with it.
            self._avoid_host(copy.host, now)
            return self._park(copy, outcome)
        if (entry.fallback is not None and copy.kind == RETRY
                and now - copy.first_refused >= self.hold):
            fallback, entry.fallback = entry.fallback, None
            LOG.warning("event %s: the probation queue refuses it (%s); "
                        "routed here, uncounted", entry.env_id, outcome)
            self.stats["probation_bypassed"] += 1
            fallback()
            return self._ended(entry)
        if now - copy.first_refused >= self.patience:
            return self._give_up(copy, outcome)
        if copy.refusals == 1 and not parking and self._holding_central():
            # A central queue refusing (the dead-letter queue full, say)
            # under a flood: each copy held in hand keeps its ingress
            # delivery in the prefetch window everyone shares. Past
            # max_held of them, a new one is given up at once (a dead
            # letter dropped, counted, said at ERROR): the review saw the
            # router take nothing in for 10 s of a 50/s malformed flood.
            n = self.stats["refused_over_cap"] = \
                self.stats["refused_over_cap"] + 1
            return self._give_up(copy, f"{outcome}; {self.max_held} copies "
                                 f"already held for refusing queues; "
                                 f"{n} given up so", quiet=n % 100 != 1)
        delay = backoff.refused_copy_delay(copy.refusals)
        if parking or entry.fallback is not None:
            # parked (or routed here) when hold is up, not a backoff later
            delay = min(delay, copy.first_refused + self.hold - now)
        heapq.heappush(self._delayed, (now + delay, next(self._n), copy))
        # One line per copy at WARNING: in a failover every copy in flight
        # may be refused many times over.
        LOG.log(logging.WARNING if copy.refusals == 1 else logging.DEBUG,
                "event %s: broker %s the %s copy%s; publishing it again in "
                "%.2fs", entry.env_id, outcome, copy.kind, _for_host(copy),
                delay)

    def _returned(self, copy):
        """No queue is bound to the hosts exchange with this copy's host:
        no such host, or not yet (a host whose consumer is starting). The
        event's only copy: the event is decided again (Entry.routed).
        Otherwise this host's copy alone is parked for it, its ingress
        message settled; dead-lettered unknown-host once its rounds add up
        to no_host_timeout. Not avoided as a refusing host is: a return
        costs neither a channel nor a prefetch slot for longer than its
        confirm."""
        self.stats["returned"] += 1
        why = f"no queue bound to {copy.exchange} with key {copy.host!r}"
        entry = copy.entry
        if self._user is None:      # the memory transport: nowhere to park
            return self._replace_with_dead_letter(
                copy, contract.REASON_UNKNOWN_HOST, f"host {copy.host}: {why}")
        if entry.routed is not None and self._alone_returned is not None:
            # Its only copy, to the host it was decided for (most often a
            # hint naming no host, placement empty then): parked for that
            # host alone it would never reach the host placement names a
            # moment later (the review). Decided again after a tier.
            self._alone_returned(entry, copy.host)
            return self._ended(entry)
        self._park(copy, why, reason=contract.REASON_UNKNOWN_HOST)

    def _holding_central(self):
        """Whether max_held copies (not a host's: those are parked) wait in
        hand to be published again. Asked on a first refusal only."""
        held = 0
        for _, _, waiting in self._delayed:
            if waiting.kind != HOST_COPY:
                held += 1
                if held >= self.max_held:
                    return True
        return False

    def _park(self, copy, outcome, reason=None):
        """A host copy out of hand: to a retry queue for its host alone, so
        its ingress message (and its prefetch slot) is settled. reason: the
        copy came back for want of its host's queue (unknown-host), given up
        once its returned rounds add up to no_host_timeout; otherwise it was
        refused, given up (dead-lettered refused) once its refused rounds add
        up to patience."""
        entry = copy.entry
        rounds = entry.parked + 1
        unbound = entry.unbound + (reason is not None)
        # This kind's rounds only: each kind has its own budget and tiers.
        counted = unbound if reason is not None else rounds - entry.unbound
        parked_for = sum(self.topo.retry_delay_ms(r)
                         for r in range(1, counted)) / 1000
        if parked_for >= (self.patience if reason is None
                          else self.no_host_timeout):
            if reason is not None:
                LOG.warning("event %s: host %s: %s after %.0fs parked; "
                            "dead-lettering its copy", entry.env_id,
                            copy.host, outcome, parked_for)
                return self._replace_with_dead_letter(
                    copy, reason, f"host {copy.host}: {outcome} after "
                    f"{parked_for:.0f}s parked")
            return self._give_up(copy, outcome)
        delay = self.topo.retry_delay_ms(counted)
        ours = {HEADER_FOR_HOST: copy.host, HEADER_PARKED: rounds,
                HEADER_UNBOUND: unbound}
        theirs = copy.kwargs.get("headers")
        self.send(entry, RETRY, None, "", self.topo.retry_queue_name(delay),
                  copy.body, message_id=copy.kwargs.get("message_id"),
                  headers=dict(theirs, **ours) if theirs else ours,
                  user_id=self._user)
        self.stats[f"parked:{reason or REASON_REFUSED}"] += 1
        self.record(entry, journal_.PARKED,
                     f"host {copy.host}: {outcome}; round {rounds}, "
                     f"{delay}ms")
        # A return at INFO: one line per event, as a retry's (a sender's
        # made-up hints must not flood the log at WARNING).
        LOG.log(logging.INFO if reason else logging.WARNING,
                "event %s: the copy for host %s was %s (%s); parked for %dms "
                "(round %d)", entry.env_id, copy.host,
                "returned" if reason else "refused", outcome, delay, rounds)
        self._ended(entry)

    def _give_up(self, copy, outcome, quiet=False):
        """quiet: at DEBUG (one of a flood, said at ERROR now and then)."""
        entry = copy.entry
        where = f"{copy.exchange or 'queue'} {copy.routing_key}".strip()
        now = self._clock()
        took = now - (now if copy.first_refused is None else copy.first_refused)
        detail = (f"the broker refused the {copy.kind} copy ({outcome}) "
                  f"{max(copy.refusals, 1)} time(s) over {took:.1f}s: {where}")
        level = logging.DEBUG if quiet else logging.ERROR
        if copy.kind != DEAD:
            LOG.log(level, "event %s: %s; dead-lettering it", entry.env_id,
                    detail)
            return self._replace_with_dead_letter(copy, REASON_REFUSED, detail)
        reason = copy.kwargs.get("headers", {}).get(contract.HEADER_REASON, "-")
        self.stats[f"dropped:{reason}"] += 1
        entry.dropped = True
        self.record(entry, journal_.DROPPED,
                     f"{reason}: its dead letter could not be placed")
        LOG.log(level, "event %s: dropped: the dead letter (%s) could not be "
                "placed: %s", entry.env_id, reason, detail)
        self._ended(entry)

    def _replace_with_dead_letter(self, copy, reason, detail):
        extra = {HEADER_HOST: copy.host} if copy.kind == HOST_COPY else None
        self.dead_letter(copy.entry, reason, detail, extra_headers=extra)
        self._ended(copy.entry)

    def _ended(self, entry):
        entry.remaining -= 1
        if entry.remaining == 0:
            del self.entries[entry.key]
            self._settled_cb(entry)

    # --- channel faults ---------------------------------------------------------
    def _take_closures(self):
        """Replace every closed channel first, then judge the culprits: a
        culprit's dead letter must not go out on a channel already closed."""
        culprits = []
        for channel, exc in take(self._closed):
            if self._q_publisher is not None and self._q_publisher.owns(channel):
                culprits += [(copy, exc) for copy in
                             self._q_publisher.take_pending() if copy]
                self._q_channel = self._q_publisher = None
            elif self.publisher.owns(channel):
                self._publish_channel_lost(exc)
        for copy, exc in culprits:
            self._culprit(copy, exc)

    def _publish_channel_lost(self, exc):
        suspects = self.publisher.take_pending()
        self.stats["publish_channel_faults"] += 1
        self.stats["quarantined"] += len(suspects)
        LOG.warning("router %s: the broker closed the publish channel (%s); "
                    "%d copies in flight go through quarantine, one at a time",
                    self._router, _brief(exc), len(suspects))
        self.channel, self.publisher = self._open()
        self._quarantine.extend(c for c in suspects if c is not None)

    def _culprit(self, copy, exc):
        """This copy, published alone, closed its channel."""
        if not self.holds(copy.entry):
            return
        copy.suspect = True
        if _denied(exc):
            return self._hold_denied(copy, exc)
        if getattr(exc, "reply_code", None) == 404:
            # Every copy goes to an exchange or queue of the central
            # topology (host copies to the hosts exchange): one is gone.
            self._damaged(f"{copy.kind} copy: {_brief(exc)}")
        elif copy.kind == HOST_COPY and self._user is not None:
            # The host's own exchange closes channels (403 internal, 406...):
            # its copies stay off the shared channel for a while.
            self._avoid_host(copy.host, self._clock())
            self.stats["refused"] += 1
            return self._park(copy, _brief(exc))
        self._refused(copy, _brief(exc))

    def _avoid_host(self, host, now, until=None):
        """Until `until` (hold from now), `host`'s copies are parked without
        being published; then they go alone through the quarantine until
        one is confirmed."""
        if len(self._avoid) >= 1024:        # bounded: forget the expired
            self._avoid = {h: t for h, t in self._avoid.items() if t > now}
        self._avoid[host] = now + self.hold if until is None else until

    def _avoided(self, host):
        """Whether `host`'s exchange closed a channel less than hold ago."""
        until = self._avoid.get(host) if self._avoid else None
        return until is not None and self._clock() < until

    def _hold_denied(self, copy, exc):
        """The router user may not write to this copy's destination. Known
        to be one destination among writable ones (a partial grant), the
        destination refuses: _denied_copy. Otherwise the router may not
        publish at all, as far as it knows (a permission revoked): holding
        everything costs nobody more than the fault does, nothing could be
        routed anyway, and the prefetch window, once full, stops the
        intake. The copies go again, one at a time, with backoff, a copy
        for a destination not denied yet first: one that passes proves the
        grant partial. Their patience counts from when one passes."""
        now = self._clock()
        dest = copy.dest
        self.stats["publish_denied"] += 1
        if dest in self._denied and not self._denials:
            self._denied[dest] = now + self.hold
            return self._denied_copy(copy, _brief(exc))
        if len(self._denied) >= 1024:       # bounded: forget the expired
            self._denied = {d: t for d, t in self._denied.items() if t > now}
        self._denied[dest] = now            # may be tried: nothing proven
        self._denials += 1
        delay = backoff.refused_copy_delay(self._denials)
        self._denied_until = now + delay
        copy.refusals, copy.first_refused = 0, None
        # Behind the others: no copy is the probe twice in a row.
        self._quarantine.append(copy)
        if self._denials == 1 or self._denials % 12 == 0:
            LOG.error("router %s: the broker refuses the router user's "
                      "publishes (%s): %d event(s) held, trying again every "
                      "%.2fs up to %.0fs", self._router, _brief(exc),
                      len(self.entries), delay, backoff.REFUSED_CAP)

    def _denied_copy(self, copy, why):
        """A copy for a destination the router may not write while others
        take its publishes: that destination refuses it. A host's copies
        are parked, as a host whose exchange closes channels (see
        _culprit); any other copy is published again with backoff, given
        up after patience (_refused). The destination is tried again, one
        copy alone, after hold."""
        if copy.kind == HOST_COPY and self._user is not None:
            now = self._clock()
            self._avoid_host(copy.host, now,
                             self._denied.get(copy.dest, now))
            self.stats["refused"] += 1
            return self._park(copy, why)
        self._refused(copy, why)

    def _feed_quarantine(self):
        if not self._quarantine:
            return
        if self._denials and self._clock() < self._denied_until:
            return
        if self._q_publisher is None:
            self._q_channel, self._q_publisher = self._open(self._q_outcome)
        if self._q_publisher.in_flight:
            return
        if self._denials:
            self._probe_first()
        while self._quarantine:
            copy = self._quarantine.popleft()
            if not self.holds(copy.entry):
                continue
            if self._avoided(copy.host):
                self._park(copy, AVOIDED)
                continue
            if (self._denied and not self._denials
                    and self._denied.get(copy.dest, 0) > self._clock()):
                self._denied_copy(copy, DENIED)
                continue
            self._q_publisher.publish(copy.exchange, copy.routing_key,
                                      copy.body, copy, **copy.kwargs)
            return

    def _probe_first(self):
        """While the router's publishes are denied: a copy for a destination
        not denied yet goes first, if there is one. It passes if the grant
        is partial; it is denied if the whole permission is gone."""
        for i, copy in enumerate(self._quarantine):
            if copy.dest not in self._denied:
                if i:
                    del self._quarantine[i]
                    self._quarantine.appendleft(copy)
                return

    def _q_outcome(self, copy, outcome):
        if outcome == publishing.ACK:
            copy.suspect = False    # not this one; it is placed
            if self._avoid:
                self._avoid.pop(copy.host, None)    # its host takes copies again
            if self._denied:
                # Placed on a channel opened after the denials: the router
                # may write here now, whatever it may not write elsewhere.
                self._denied.pop(copy.dest, None)
            if self._denials:
                LOG.warning("router %s: the broker takes the router user's "
                            "publishes again (after %d refusals)%s",
                            self._router, self._denials, "; still refused: "
                            + ", ".join(sorted(map(repr, self._denied)))
                            if self._denied else "")
                self._denials = 0
                # Each destination still denied is tried once more, alone:
                # refused then, it is that destination's, not the router's.
                now = self._clock()
                self._denied = dict.fromkeys(self._denied, now)
        self._outcomes.append((copy, outcome))

    # --- what goes out -------------------------------------------------------------
    def bounded(self, untrusted, ours):
        """A sender's headers cut to what fits beside `ours` in one content
        frame, then `ours` on top (they win over anything sent as theirs)."""
        headers, cut = inbound.bounded_beside(untrusted, ours, self.frame_max)
        if cut:
            self.stats["headers_cut"] += 1
            LOG.info("headers cut from a copy: %s", cut)
        return headers

    def complete(self, entry):
        """`entry` needs no copy (the memory transport's parked retry)."""
        entry.remaining += 1
        self._ended(entry)

    def dead_letter(self, entry, reason, detail, *, extra_headers=None):
        """One more copy for `entry`: the message to the dead-letter exchange
        with a reason. Everything taken from the message is untrusted and
        passes inbound's filters, bounded to fit in one frame: this step
        cannot fail on what a sender put there."""
        message = entry.message
        # The id its sender gave it, which is what an operator looks for;
        # the id in its body only when the sender gave none (or no usable one)
        msg_id = (inbound.safe_shortstr(property_of(message, "message_id"))
                  or inbound.safe_shortstr(entry.env_id if entry.env_id != "-"
                                           else None))
        ours = {contract.HEADER_REASON: reason,
                contract.HEADER_DETAIL: inbound.clip(detail),
                "x-evrouter-router": self._router}
        if extra_headers:
            ours.update(extra_headers)
        headers = self.bounded(untrusted_headers(message, entry.ours), ours)
        # With the router's user_id, which the broker vouches for: a reader
        # of the dead-letter queue trusts x-evrouter-* from its users only
        # (the broker's own dead-lettering keeps the sender's user_id).
        self.send(entry, DEAD, None, self.topo.dead_letter_exchange_name,
                  reason, inbound.raw_body(message.body), message_id=msg_id,
                  headers=headers, user_id=self._user,
                  content_type=inbound.safe_shortstr(
                      property_of(message, "content_type")))
        self.stats[f"dead_lettered:{reason}"] += 1
        self.record(entry, journal_.DEAD, f"{reason}: {inbound.clip(detail, 300)}"
                     + (f" (host {extra_headers[HEADER_HOST]})"
                        if extra_headers and HEADER_HOST in extra_headers else ""),
                     msg_id)
        LOG.warning("event %s dead-lettered (%s): %s", inbound.loggable(msg_id),
                    reason, inbound.clip(detail, 300))

    def record(self, entry, hop, detail, msg_id=None):
        """One hop of `entry`'s event in the journal."""
        event, trace = entry.event, entry.trace
        span = trace and trace[36:52]
        trace = trace and trace[3:35]
        if event is None:
            self.journal.record(hop, msg_id or entry.env_id, trace, None,
                                None, None, None, detail, span_id=span)
        else:
            self.journal.record(hop, entry.env_id, trace, event.server_uuid,
                                event.tag, event.name, event.status, detail,
                                span_id=span)


def untrusted_headers(message, ours):
    """The sender's headers, without any x-evrouter-* a sender other than
    the router itself put there (they would be trusted on the way back)."""
    headers = property_of(message, "application_headers")
    if type(headers) is not dict or ours:
        return headers
    return {k: v for k, v in headers.items()
            if not (type(k) is str and k.startswith("x-evrouter-"))}


def property_of(message, name):
    """One AMQP property of a kombu message, whatever the transport."""
    if name == "application_headers":
        return getattr(message, "headers", None)
    if name == "content_type":
        return getattr(message, "content_type", None)
    props = getattr(message, "properties", None)
    return props.get(name) if type(props) is dict else None


def _denied(exc):
    """A 403 about the router user's rights, not about the destination (an
    internal exchange is refused with other words): every publish fails."""
    return (getattr(exc, "reply_code", None) == 403
            and "refused for user" in str(getattr(exc, "reply_text", "")))


def _for_host(copy):
    return f" for host {copy.host}" if copy.host else ""


def _brief(exc):
    code = getattr(exc, "reply_code", None)
    text = inbound.clip(getattr(exc, "reply_text", None) or str(exc), 200)
    return f"{code} {text}" if code else text
