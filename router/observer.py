"""What the router knows about hosts: placement from the lifecycle fanout,
and which host exchanges exist.

The placement consumer reads a queue of its own (a new name per session,
no_ack) bound to the lifecycle fanout. Its messages come from every compute
host, so each one is decoded totally and checked against its sender; a bad
one is ignored and counted, never requeued (there is nothing to requeue).
If the broker closes its channel (the queue deleted under it), the session
calls ``reopen()``: a new queue, and a resync request so the agents fill the
gap with snapshots.
"""

import collections
import logging
import time
import uuid

from kombu import Consumer

from router import routing
from router.bus import consuming, contract, inbound
from router.bus.connection import take, user_of
from router.delivery import property_of

LOG = logging.getLogger(__name__)

# A host exchange seen to exist is checked again after this long, so one
# deleted since (a decommissioned host) is noticed.
_POSITIVE_HOST_TTL = 60.0
# One seen missing, after 2 s, doubling with each miss up to 20 s. A host
# hint is the sender's to choose: an event whose hint names no exchange
# comes back from the retry tiers (0.5, 1, 2, 4, 8, 16, 16... s) for
# no_host_timeout, about 12 rounds in 120 s, each of which asked the broker
# (the old 0.5 s was no longer than the first tier). Now such a host is
# asked at 0, 3.5, 7.5, 15.5, 31.5 s and then every other round: 7 times,
# not 12. A host whose exchange appears soon after its first event (its
# consumer started late) is still found by the next round or two; one
# missing for long, at most 20 s plus a round after it appears, or at once
# when its agent speaks for it.
_NEGATIVE_HOST_TTL = 2.0
_MAX_NEGATIVE_HOST_TTL = 20.0
# A host its compute agent spoke for (``seen``: an authenticated lifecycle
# message) is the deployment's, not a sender's: their number is the number
# of compute hosts, and one that is missing is most likely one whose
# consumer has not declared its exchange yet. Asked again after 2 s (the
# first two tiers, not doubling), still within the budget; its agent speaking again owes
# it a check at once. One a delivery found gone (``forget``): half a second.
_VOUCHED_NEGATIVE_HOST_TTL = 2.0
_GONE_HOST_TTL = 0.5
# How many hosts are remembered, each way; the oldest answer goes first.
# Existing exchanges are the deployment's (only a host's own user or an
# operator declares one); missing ones are anybody's to name.
MAX_PRESENT_HOSTS = 100_000
MAX_ABSENT_HOSTS = 10_000
# Passive declares the routing loop may make, per second: each is a
# synchronous round trip (about 0.9 ms for a missing exchange, whose 404
# closes the channel). Over budget, a host not known to exist is not known
# yet: its event is parked as for an unknown host. Unspent, the budget
# keeps up to 5 s' worth (500 checks, about 0.45 s of the loop at once):
# parked events come back in waves (their tiers), and with one second's
# worth 1,000 new hosts no agent spoke for took over 2 minutes to check,
# some dead-lettered unknown-host meanwhile; with five, about 30 s.
DEFAULT_HOST_CHECK_RATE = 100.0
HOST_CHECK_BURST_SECONDS = 5.0


class PlacementObserver:
    def __init__(self, conn, delivery, settings, placement, stats, *, memory,
                 heard=None, placed=None):
        self.conn = conn
        self.delivery = delivery
        self.s = settings
        self.topo = settings.topology
        self.placement = placement
        self.stats = stats
        self.memory = memory
        # heard(host): a host's own agent spoke for it (KnownHosts.seen)
        self._heard = heard or (lambda host: None)
        # placed(instance uuids): the placement of these may have changed
        # (the session routes the events it holds for them)
        self._placed = placed or (lambda uuids: None)
        self._messages = []
        self.channel = self.consumer = self.queue_watch = None

    def start(self):
        # A new name per session: after a half-open connection the old
        # exclusive queue lingers until the broker reaps it, and declaring
        # the same name would fail RESOURCE_LOCKED.
        queue = self.topo.placement_queue(
            f"{self.s.name}.{uuid.uuid4().hex[:8]}")
        self.channel = self.delivery.watch(self.conn.channel())
        self.consumer = Consumer(self.channel, [queue], no_ack=True,
                                 on_message=self._messages.append)
        self.consumer.consume()
        if self.queue_watch is not None:
            self.queue_watch.close()
        # Bound again when idle: the lifecycle fanout deleted and declared
        # again leaves it unbound, and no cancel says so.
        self.queue_watch = consuming.QueueWatch(self.conn, queue,
                                                self.s.consume_check)
        self.ask_for_snapshots()

    def reopen(self, exc):
        self.stats["placement_channel_faults"] += 1
        LOG.warning("router %s: the broker closed the placement consumer's "
                    "channel (%s); consuming a new queue", self.s.name, exc)
        if getattr(self.channel, "is_open", False):
            try:
                self.channel.close()
            except self.conn.channel_errors:
                pass
        self.start()

    def ask_for_snapshots(self):
        """Every agent answers with its host's whole placement: a router that
        (re)connects knows it within seconds instead of learning it from
        whatever lifecycle events happen next."""
        self.placement.connected(self.s.resync_window)
        if self.memory:
            return      # the memory transport's agents snapshot on start
        request = contract.envelope(contract.ResyncRequest(self.s.name),
                                    f"router@{self.s.name}")
        self.delivery.send_untracked(self.topo.control_exchange_name, "",
                                     contract.encode(request),
                                     message_id=request.id, mandatory=False,
                                     user_id=user_of(self.conn))
        LOG.info("router %s asked the agents for snapshots (%s)", self.s.name,
                 request.id)

    @property
    def pending(self):
        return bool(self._messages)

    def pump(self, broker_errors):
        if not self._messages:
            return          # the usual turn: nothing from the fanout
        self.queue_watch.delivered()
        for message in take(self._messages):
            try:
                self._observe(message)
            except broker_errors:
                raise
            except Exception:
                # Consumed without ack: nothing comes back to loop on, and
                # one compute host's bad message must not stop every router.
                self.stats["lifecycle_errors"] += 1
                LOG.exception("lifecycle message %s: unexpected error; ignored",
                              inbound.loggable(property_of(message, "message_id")))

    def _observe(self, message):
        try:
            env = inbound.decode_message(message.body,
                                         inbound.properties_of(message),
                                         self.s.max_body_bytes)
        except contract.ContractError as exc:
            self.stats["lifecycle_invalid"] += 1
            LOG.warning("lifecycle message %s ignored (%s): %s",
                        inbound.loggable(property_of(message, "message_id")),
                        exc.reason, exc)
            return
        p = env.payload
        if env.kind == contract.RESYNC_REQUEST:
            return      # another router asking the agents; not for us
        refusal = routing.lifecycle_refusal(property_of(message, "user_id"), p.host,
                                            self.s.policy, authenticated=not self.memory)
        if refusal is not None:
            self.stats[f"forbidden:{env.kind}"] += 1
            LOG.warning("%s %s ignored: %s", env.kind, env.id, refusal)
            return
        if env.kind == contract.LIFECYCLE_EVENT:
            self.placement.observe(p)
            self.stats["lifecycle_seen"] += 1
            placed = (p.instance_uuid,)
        elif env.kind == contract.HOST_SNAPSHOT:
            self.placement.replace_host(p.host, p.instances)
            self.stats["snapshots_seen"] += 1
            LOG.info("host %s snapshot %s: %d instance(s)", p.host, env.id,
                     len(p.instances))
            placed = [uuid for uuid, _ in p.instances]
        elif env.kind == contract.HOST_ANNOUNCE:
            placed = ()
        else:
            return
        # A host that speaks for itself is not yet a host whose exchange
        # exists (its consumer may start later): routing checks that, at
        # once rather than when a cached "missing" runs out. Before the
        # events held for its instances are looked at: with a cached
        # "missing" they would stay held for nothing.
        self._heard(p.host)
        if placed:
            self._placed(placed)


class KnownHosts:
    """Whether a host's exchange exists, asked of the broker and cached.

    A passive declare that fails closes its channel: it has one of its own,
    and waits on it synchronously, so the answer is its own error.

    The host names come from senders (an event's hint): what a sender can
    make the loop ask is budgeted (a token bucket of ``rate`` checks a
    second, holding 5 s' worth), and what it can make the cache hold is
    bounded (each way, the oldest answer evicted first). A host its compute agent spoke for
    (``seen``) is owed one check outside the budget and, missing, is asked
    again sooner; a host known to exist whose answer is due again stays
    known while the budget is spent.
    """

    def __init__(self, conn, topo, clock=time.monotonic, *, stats=None,
                 rate=DEFAULT_HOST_CHECK_RATE, max_present=MAX_PRESENT_HOSTS,
                 max_absent=MAX_ABSENT_HOSTS, check=None):
        self.conn = conn
        self.topo = topo
        self._clock = clock
        self.stats = stats if stats is not None else collections.Counter()
        self._present = {}          # host -> checked again after (oldest first)
        self._absent = {}           # host -> (checked again after, for how long)
        self._owed = set()          # hosts owed a check outside the budget
        self._vouched = {}          # hosts their agents spoke for (oldest first)
        self._max_present = max_present
        self._max_absent = max_absent
        self._rate = rate
        self._burst = rate * HOST_CHECK_BURST_SECONDS
        self._tokens = self._burst
        self._filled = clock()
        self._check = check or self._passive_declare
        self._channel = None

    def forget(self, host):
        """A delivery found host's exchange gone: missing, for a moment."""
        self._present.pop(host, None)
        self._remember(self._absent, host,
                       (self._clock() + _GONE_HOST_TTL, _GONE_HOST_TTL),
                       self._max_absent)

    def seen(self, host):
        """host's compute agent spoke for it (an authenticated lifecycle
        message): its exchange may have just appeared, so a cached "missing"
        is dropped and its next check is not charged to the budget."""
        if host not in self._vouched:
            self._remember(self._vouched, host, None, self._max_present)
        if host in self._present:
            return
        self._absent.pop(host, None)
        if len(self._owed) < self._max_absent:
            self._owed.add(host)

    def __call__(self, host):
        until = self._present.get(host)
        now = self._clock()
        if until is not None and now < until:
            return True             # the hot path: one lookup, one clock read
        known = until is not None
        absent = self._absent.get(host)
        if absent is not None and now < absent[0]:
            return False
        if not self._may_check(host, now):
            if not known:
                self.stats["host_checks_deferred"] += 1
            return known            # an existing host stays known meanwhile
        self.stats["host_checks"] += 1
        if self._check(host):
            self._absent.pop(host, None)
            self._remember(self._present, host, now + _POSITIVE_HOST_TTL,
                           self._max_present)
            return True
        self._present.pop(host, None)
        if absent is not None and absent[1] == _GONE_HOST_TTL:
            # One a delivery found gone (it existed: the deployment's) is
            # asked again as often while it stays gone, within the budget:
            # doubled, a host exchange deleted and declared again 3 s later
            # stayed unknown 4-8 s more (the chaos test's resume bound).
            ttl = _GONE_HOST_TTL
        elif host in self._vouched:
            ttl = _VOUCHED_NEGATIVE_HOST_TTL
        elif absent is None:
            ttl = _NEGATIVE_HOST_TTL
        else:
            ttl = min(max(_NEGATIVE_HOST_TTL, 2 * absent[1]),
                      _MAX_NEGATIVE_HOST_TTL)
        self._remember(self._absent, host, (now + ttl, ttl), self._max_absent)
        return False

    def _may_check(self, host, now):
        if self._owed and host in self._owed:
            self._owed.discard(host)
            return True
        tokens = min(self._burst, self._tokens + (now - self._filled) * self._rate)
        self._filled = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    @staticmethod
    def _remember(table, host, until, limit):
        table.pop(host, None)       # to the end: the newest answer
        if len(table) >= limit:
            del table[next(iter(table))]
        table[host] = until

    def _passive_declare(self, host):
        if self._channel is None:
            self._channel = self.conn.channel()
        try:
            self._channel.exchange_declare(self.topo.host_exchange_name(host),
                                           "topic", passive=True)
            return True
        except self.conn.channel_errors:
            return False            # py-amqp reopened the channel in place
