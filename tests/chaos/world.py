"""What the chaos test runs and watches (no tests here).

The World owns the services under test (one router, a host consumer per
host, each as its own broker user), the test's clients (the network side's
confirmed publisher, a raw hostile one), the faults now in force, and a
ledger of every message sent. `check()` holds the invariants of
test_chaos.py's docstring against what the services did; any break raises
Broken, which the test prints with the seed and the step history.
"""

import collections
import errno
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

import amqp
import kombu

from compute.events import DELIVERED, HELD, InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router import routing
from router.bus import backoff, contract
from router.bus import connection as bus_connection
from router.bus.topology import Topology
from router.delivery import HEADER_HOST, REASON_REFUSED
from router.service import RouterService, RouterSettings
from tests.conftest import Bus
from tests.functional import poison
from tests.functional.waiter_harness import Publisher

ROUTER_USER = "chaos-router"
NETWORK_USER = "chaos-network"
NORMAL_LATENCY = 2.0    # an event with no fault in its way is woken within
RESUME = 2.0            # routing resumes this long after a fault is removed
REFUSED_PATIENCE = 3.0  # the router's, here: refusals outlast it sometimes
# router/session.py parks events for a host it cannot see in the retry
# tiers (Topology.retry_delays_ms); a parked event comes back by its tier.
PARKED_TIER = max(Topology().retry_delays_ms) / 1000
# A parked event the router queue refused on its way back is tried again
# by the broker this long after (dead_letter_worker_publisher_confirm_timeout
# of deploy/rabbitmq/advanced.config, which the chaos node runs with).
PARKED_RESEND = 5.0
# router/delivery.py publishes a refused copy again after at most this.
REFUSED_RETRY_CAP = backoff.REFUSED_CAP


def parked_backlog(patience):
    """How long after a host's refusal ends its copies may still arrive: a
    host copy refused past refused_hold is parked (router/delivery.py) in
    rounds of the retry tiers until they add up to `patience`, and comes
    back at most one tier after the refusal ended."""
    topo, parked, longest, n = Topology(), 0.0, 0.0, 1
    while parked < patience:
        tier = topo.retry_delay_ms(n) / 1000
        parked, longest, n = parked + tier, max(longest, tier), n + 1
    return max(REFUSED_RETRY_CAP, longest)


def avoided_resume(hold):
    """How long after a host exchange stops closing the channel (403) its
    events flow again: the router parks a host's copies without publishing
    them for `hold` after its last channel fault (router/delivery.py); one
    sent just after is parked and comes back by the tiers, one round after
    another, until the first return after hold is tried alone (half open),
    then within RESUME."""
    topo, back, n = Topology(), 0.0, 1
    while back <= hold:
        back, n = back + topo.retry_delay_ms(n) / 1000, n + 1
    return back + RESUME


class Broken(AssertionError):
    """An invariant broke."""


class _Undecodable(Exception):
    """A dead letter taken whose properties py-amqp could not decode."""


# What py-amqp raises decoding such properties: a message id that is not
# UTF-8, a timestamp out of range (OSError EOVERFLOW), a bad field table.
_UNDECODABLE = (UnicodeDecodeError, ValueError, OverflowError, OSError)


def host_user(host):
    return f"chaos-{host}"


# --- faults ---------------------------------------------------------------------

# What the services counted, summed over every instance (printed).
SHOWN = {"sessions", "reconnects", "redelivered", "refused", "quarantined",
         "publish_channel_faults", "lane_channel_faults",
         "placement_channel_faults", "intake_channel_faults",
         "dead_letter_channel_faults", "dead_letter_refusals", "dead_lettered",
         "rejected", "parked:refused"}


@dataclass(eq=False)
class Fault:
    """A broker-side fault, a restart or a connection cut, while in force.

    hosts: the hosts whose events it may hold up (ALL: every host's).
    lost: the services whose connection it takes (their reconnects then
    bound its resume time by the backoff schedule).
    backlog: seconds after removal within which the events it held up are
    woken, beyond the resume time (a parked tier, a refused copy's retry).
    settle: seconds the broker itself takes to serve again after the
    removal, beyond the services' reconnects (a quorum leader election on
    a cluster; none on a single node).
    (The dead-letter reasons it explains are EXCUSED's, by its kind: the
    first word of its name.)
    """

    name: str
    hosts: frozenset
    lost: tuple = ()
    backlog: float = 0.0
    settle: float = 0.0
    resume: float = None        # its own resume path's bound, beside the backoff
    undo: object = None
    began: float = field(default_factory=time.monotonic)
    ended: float = None


ALL = frozenset({"*"})


def covers(hosts, host):
    return hosts is ALL or host in hosts


# A good event may be dead-lettered only for a reason its own fault
# explains. (reason, or x-death reason for the broker's own dead-lettering)
# -> the fault kinds that explain it, each with why.
EXCUSED = {
    # Its host's queue, or the hosts exchange with every binding, was
    # deleted: the router's copy came back returned, was parked for its
    # host, and no_host_timeout ran out before the host was bound again.
    contract.REASON_UNKNOWN_HOST: {"exchange-gone", "queue-gone"},
    # Its host queue (or the probation/retry queue it had to pass) refused
    # every copy for longer than refused_patience (REFUSED_PATIENCE here).
    # (internal-host: its exchange closed the channel on every copy.)
    REASON_REFUSED: {"refuse-host", "refuse-probation", "refuse-retry",
                     "internal-host"},
    # x-death "maxlen": the broker dropped it from the head of a queue a
    # max-length policy was put on (no evrouter reason: the broker did
    # it): a host queue under max-length 1, or a queue it was waiting in
    # (host, router, probation) when a reject-publish policy of length 0
    # came: a new limit trims what is already there.
    "x-death:maxlen": {"maxlen-host", "refuse-host", "refuse-router",
                       "refuse-probation"},
}
GRACE = 1.0     # an excuse holds this long after its fault was removed


@dataclass(eq=False)
class Good:
    id: str
    host: str
    sent: float
    due: float = None           # None while a fault holds it up
    blockers: set = field(default_factory=set)
    faults_seen: list = field(default_factory=list)
    woken: list = field(default_factory=list)
    dead: str = None            # the reason it was dead-lettered, excused


# --- the services ------------------------------------------------------------------

class RouterRun:
    def __init__(self, node, topo, n, refused_patience=REFUSED_PATIENCE):
        self.service = RouterService(RouterSettings(
            transport_url=node.url(ROUTER_USER), topology=topo,
            policy=routing.Policy(), name=f"chaos-router-{n}",
            refused_patience=refused_patience))
        self.thread = threading.Thread(target=self.service.run, daemon=True,
                                       name=f"chaos-router-{n}")
        self.thread.start()

    def stop(self):
        self.service.stop()
        self.thread.join(30)
        if self.thread.is_alive():
            raise Broken(f"{self.thread.name} did not stop within 30 s")


class HostRun:
    def __init__(self, node, topo, host, deliver, n):
        self.service = HostConsumer(HostConsumerSettings(
            host=host, transport_url=node.url(host_user(host)), topology=topo),
            deliver)
        self.thread = self.service.start(name=f"chaos-host-{host}-{n}")

    def stop(self):
        self.service.stop()
        self.thread.join(30)
        if self.thread.is_alive():
            raise Broken(f"{self.thread.name} did not stop within 30 s")


class Attempts:
    """Every connect attempt of every service, by thread name: wraps
    router.bus.connection.connect_once, which each session calls once.
    port_of: the broker port each thread's last successful attempt reached
    (which node of a cluster it uses)."""

    def __init__(self):
        self.by_thread = collections.defaultdict(list)
        self.port_of = {}
        self._real = bus_connection.connect_once

    def install(self, monkeypatch):
        def connect_once(conn):
            name = threading.current_thread().name
            self.by_thread[name].append(time.monotonic())
            self.port_of.pop(name, None)
            result = self._real(conn)
            self.port_of[name] = conn.port
            return result
        monkeypatch.setattr(bus_connection, "connect_once", connect_once)


# --- the world -------------------------------------------------------------------------

class World:
    def __init__(self, node, hosts, rng, history, monkeypatch, *,
                 queue_type="classic", refused_patience=REFUSED_PATIENCE):
        self.node, self.hosts, self.rng, self.history = node, hosts, rng, history
        self.refused_patience = refused_patience
        self.refused_hold = RouterSettings.refused_hold     # the router's
        self.t0 = time.monotonic()
        self._dead_letter_users = {None, ROUTER_USER} | {
            host_user(h) for h in hosts}
        for user in [ROUTER_USER, NETWORK_USER] + [host_user(h) for h in hosts]:
            node.add_user(user)
        self.bus = Bus(node.client_url(), queue_type=queue_type)
        self.topo = self.bus.topology
        self.bus.declare_central()
        # Every dead letter, read here: a queue of the test's own on the
        # dead-letter fanout, which no fault touches (a policy on the
        # dead-letter queue trims it).
        self.observer = f"{self.topo.prefix}.chaos-observer"
        with self.bus.conn.channel() as ch:
            # Quorum on a cluster: it must outlive any one node.
            ch.queue_declare(self.observer, durable=True, auto_delete=False,
                             arguments={"x-queue-type": queue_type})
            ch.queue_bind(self.observer, self.topo.dead_letter_exchange_name)
        self.bus.own(queues=[self.observer])
        for host in hosts:
            self.bus.declare_host(host)
        self.attempts = Attempts()
        self.attempts.install(monkeypatch)
        self.registries = {h: InstanceEvents() for h in hosts}
        self.good = {}                  # message id -> Good
        self.wakeups = collections.defaultdict(list)   # id -> [(host, when)]
        self.unconfirmed = set()        # good events whose publish failed
        self.hostile_sent = 0
        self.hostile_ids = {}           # id -> what, for those with one
        self.hostile_dead = {}          # id (or a count) -> reason
        # The hostile messages no id can name, sent and dead-lettered, with
        # their times: when the count falls short, these say which.
        self.unnamed_sent, self.unnamed_dead = [], []
        self.dead_seen = 0
        self.faults = []                # in force
        self.ended = []                 # removed, for excuses and bounds
        self.recovering = []            # (hosts, until): resume windows
        self.node_up = True
        self._lock = threading.Lock()
        self._n = collections.Counter()
        self.retired_stats = []         # stats of stopped service instances
        self.router = self._start_router()
        self.consumers = {h: self._start_host(h) for h in hosts}
        self._publisher = self._raw = None
        self._admin = None
        self.wait(lambda: self.router.service.ready.is_set() and all(
            c.service.ready.is_set() for c in self.consumers.values()), 20,
            "every service consuming at the start")

    def log(self, what):
        self.history.append(f"{time.monotonic() - self.t0:8.2f}s  {what}")

    # --- services --------------------------------------------------------------------
    def _start_router(self):
        self._n["router"] += 1
        return RouterRun(self.node, self.topo, self._n["router"],
                         self.refused_patience)

    def _start_host(self, host):
        self._n[host] += 1
        return HostRun(self.node, self.topo, host,
                       lambda event, mid: self._deliver(host, event, mid),
                       self._n[host])

    def _deliver(self, host, event, message_id):
        outcome = self.registries[host].deliver(event, message_id)
        if outcome in (DELIVERED, HELD):
            # Recorded by id: a wakeup may come before the publisher's
            # confirm has returned to the test.
            with self._lock:
                self.wakeups[message_id].append((host, time.monotonic()))
        return outcome

    def restart_router(self):
        fault = Fault("restart-router", ALL)
        self.begin(fault)
        self.router.stop()
        self.retired_stats.append(self.router.service.stats)
        self.router = self._start_router()
        self._restarted("router", fault)

    def restart_host(self, host):
        fault = Fault(f"restart-host {host}", frozenset({host}))
        self.begin(fault)
        old = self.consumers[host]
        old.stop()
        self.retired_stats.append(old.service.stats)
        self.consumers[host] = self._start_host(host)
        self._restarted(host, fault)

    def _restarted(self, who, fault):
        """Up within 20 s, unless a fault in force keeps it from the broker
        (then that fault's removal bounds it)."""
        if not self.node_up or any(who in f.lost for f in self.faults):
            return self.remove(fault, resume=NORMAL_LATENCY)
        t = time.monotonic()
        self.wait(lambda: self.service_of(who).ready.is_set(), 20,
                  f"the restarted {who} consuming")
        self.remove(fault, resume=NORMAL_LATENCY + time.monotonic() - t)

    def service_of(self, who):
        return (self.router if who == "router" else self.consumers[who]).service

    # --- clients ------------------------------------------------------------------------
    def _client(self):
        if self._publisher is None:
            # One node's URL (the raw publisher takes no failover list):
            # a cluster's names a node that is up now.
            url = self.node.client_url(NETWORK_USER)
            self._publisher = Publisher(_UrlBus(url, self.topo))
            self._raw = poison.RawPublisher(url)
        return self._publisher, self._raw

    def _drop_clients(self):
        for c in (self._publisher, self._raw):
            try:
                c.close()
            except Exception:
                pass
        self._publisher = self._raw = None

    def send_good(self, host, *, forged=False):
        """A confirmed good event for host (forged: claiming the router's
        own headers, which must be ignored); None if not confirmed."""
        env = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
            contract.COMPLETED, host), "chaos")
        with self._lock:
            self.unconfirmed.add(env.id)
        try:
            publisher, raw = self._client()
            if forged:
                raw.publish(self.topo.ingress_exchange_name,
                            "instance.network-vif-plugged", contract.encode(env),
                            message_id=env.id, content_type="application/json",
                            content_encoding="utf-8",
                            application_headers=FORGED_CLAIMS)
            else:
                publisher.to_ingress(env)
        except Exception as exc:
            self.log(f"   good {env.id[:8]} for {host} not confirmed: "
                     f"{type(exc).__name__}")
            self._drop_clients()
            return None
        now = time.monotonic()
        with self._lock:
            good = Good(env.id, host, now, woken=self.wakeups[env.id])
        blockers = [f for f in self.faults if covers(f.hosts, host)]
        with self._lock:
            self.unconfirmed.discard(env.id)
            good.blockers.update(blockers)
            good.faults_seen.extend(blockers)
            if not blockers:
                good.due = now + self._resume_after(host, now)
            self.good[env.id] = good
        return good

    def _resume_after(self, host, now):
        until = max((u for hosts, u in self.recovering if covers(hosts, host)),
                    default=0.0)
        return max(NORMAL_LATENCY, until - now)

    def send_hostile(self, case, to_host=None):
        name, body, props, raw_props = case
        exchange = (self.topo.host_exchange_name(to_host) if to_host
                    else self.topo.ingress_exchange_name)
        try:
            _, raw = self._client()
            if raw_props is not None:
                raw.publish_raw(exchange, "instance.network-vif-plugged", body,
                                raw_props)
                if b"bad-" in raw_props:
                    at = raw_props.index(b"bad-")
                    self.hostile_ids[raw_props[at:at + 16].decode()] = (
                        f"{name!r} to {to_host or 'ingress'}")
                else:
                    self.unnamed_sent.append(
                        f"{time.monotonic() - self.t0:.2f}s {name!r} to "
                        f"{to_host or 'ingress'}")
            else:
                props = dict(props or {})
                props.setdefault("message_id", f"bad-{uuid.uuid4().hex[:12]}")
                raw.publish(exchange, "instance.network-vif-plugged", body,
                            **props)
                self.hostile_ids[props["message_id"]] = (
                    f"{name!r} to {to_host or 'ingress'}")
        except Exception as exc:
            self.log(f"   hostile {name!r} not confirmed: {type(exc).__name__}")
            self._drop_clients()
            return False
        self.hostile_sent += 1
        return True

    # --- faults ---------------------------------------------------------------------------
    def begin(self, fault):
        self.faults.append(fault)
        with self._lock:
            for good in self.good.values():
                if not good.woken and not good.dead and covers(
                        fault.hosts, good.host):
                    good.blockers.add(fault)
                    good.faults_seen.append(fault)
                    # Due again when this one is removed: an event due
                    # after an earlier fault (a service's backoff, say)
                    # may be held by this one too (a run failed so: due
                    # 6 s after a revocation ended, stop_app began at once).
                    good.due = None

    def remove(self, fault, resume=None):
        """The fault is over: what it held up is due within its bound.

        resume: seconds within which routing resumes for its hosts; by
        default RESUME, plus, for each host, the next backoff attempt of
        the services it took the connection of that serve that host (the
        router serves all)."""
        if fault.undo is not None:
            fault.undo()
        now = time.monotonic()
        fault.ended = now
        self.faults.remove(fault)
        self.ended.append(fault)
        within = {}
        for host in self.hosts:
            if not covers(fault.hosts, host):
                continue
            if resume is not None:
                within[host] = resume
            else:
                within[host] = RESUME + fault.settle + max(
                    (self._next_attempt(who) for who in fault.lost
                     if who in ("router", host)), default=0.0)
                if fault.resume is not None:    # its own path's bound
                    within[host] = max(within[host], fault.resume)
            self.recovering.append((frozenset({host}), now + within[host]))
        with self._lock:
            for good in self.good.values():
                if fault in good.blockers:
                    good.blockers.discard(fault)
                    # Not before a service still waiting out its backoff
                    # from an earlier fault may be back (_resume_after).
                    due = max(now + within[good.host] + fault.backlog,
                              now + self._resume_after(good.host, now))
                    good.due = max(good.due or 0.0, due)
                    if good.blockers:
                        good.due = None
        longest = max(within.values(), default=0.0)
        self.log(f"   {fault.name} removed; resume within {longest:.2f}s"
                 + (f", backlog within {longest + fault.backlog:.2f}s"
                    if fault.backlog else ""))

    def _next_attempt(self, who):
        """Longest wait, by the documented schedule, before the service's
        next connect attempt: its current failure count, plus one for an
        attempt that may fail as the fault ends."""
        service = self.service_of(who)
        b = service.backoff
        attempt = b.attempt if b is not None else 0
        return (b.schedule if b else backoff.Schedule()).ceiling(attempt + 1)

    def admin(self):
        if self._admin is None:
            self._admin = kombu.Connection(self.node.client_url())
            self._admin.connect()
        return self._admin

    def admin_do(self, op):
        try:
            return op(self.admin().channel())
        except Exception:
            self._close_admin()
            return op(self.admin().channel())

    def _close_admin(self):
        if self._admin is not None:
            try:
                self._admin.release()
            except Exception:
                pass
            self._admin = None

    # --- invariants ---------------------------------------------------------------------------
    def check(self):
        self._read_dead_letters()
        now = time.monotonic()
        with self._lock:
            goods = list(self.good.values())
        for good in goods:
            hosts = {h for h, _ in good.woken}
            if len(good.woken) > 1:
                raise Broken(f"good event {good.id} for {good.host} woken "
                             f"{len(good.woken)} times: {good.woken}")
            if hosts and hosts != {good.host}:
                raise Broken(f"good event {good.id} for {good.host} woken on "
                             f"{hosts}")
            if good.woken:
                at = good.woken[0][1]
                if good.due is not None and at > good.due + 0.05 and \
                        not good.blockers:
                    raise Broken(f"good event {good.id} for {good.host} woken "
                                 f"{at - good.due:.2f}s after it was due "
                                 f"({self._faults_of(good)})")
            elif good.dead is None and good.due is not None and now > good.due:
                raise Broken(f"good event {good.id} for {good.host} (sent at "
                             f"{good.sent - self.t0:.2f}s) not woken "
                             f"{now - good.due:.2f}s after it was due at "
                             f"{good.due - self.t0:.2f}s "
                             f"({self._faults_of(good)})")
        with self._lock:
            stray = [m for m in self.wakeups
                     if m not in self.good and m not in self.unconfirmed]
        if stray:
            raise Broken(f"events nobody sent were woken: {stray}")
        self._check_services()
        self._check_reconnects()

    def _faults_of(self, good):
        return "faults: " + (", ".join(
            f"{f.name} [{f.began - self.t0:.2f}s-"
            + (f"{f.ended - self.t0:.2f}s]" if f.ended else "in force]")
            for f in good.faults_seen) or "none")

    def _check_services(self):
        runs = [("router", self.router)] + list(self.consumers.items())
        for who, run in runs:
            if not run.thread.is_alive():
                raise Broken(f"service {who} ({run.thread.name}) died")
        for stats in self.all_stats():
            if stats["failures"]:
                raise Broken(f"a service restarted itself after an unexpected "
                             f"error ({stats['failures']} times): see its log")

    def all_stats(self):
        return self.retired_stats + [self.router.service.stats] + [
            c.service.stats for c in self.consumers.values()]

    def summary(self, name, seed, steps, elapsed, counts):
        """The lines a chaos run prints at its end: what was sent and seen,
        the steps taken, and what the services counted (SHOWN, summed over
        every instance)."""
        totals = collections.Counter()
        for stats in self.all_stats():
            totals.update({k: n for k, n in stats.items() if k in SHOWN
                           or k.startswith("dropped:")})
        return [f"{name}: seed {seed}: {steps} steps in {elapsed:.1f}s "
                f"({steps / elapsed:.2f} steps/s); {len(self.good)} good events, "
                f"{self.hostile_sent} hostile, {self.dead_seen} dead letters; "
                f"steps: {dict(sorted(counts.items()))}",
                f"{name}: the services counted {dict(sorted(totals.items()))}"]

    def _check_reconnects(self):
        """No herd. By the schedule, the wait after the n-th failure in a
        row is at least ceiling(n) * (1 - jitter): 0.25, 0.5, 1, 2, 4 s...
        The count restarts only after a session up for healthy_after (10
        s), so within any 10 s no count restarts between two attempts,
        and the gaps between a service's attempts in it grow like that:
        at most log2(10 / 0.25 + 1) + 1 = 6 attempts in any 10 s, and no
        two closer than 0.25 s."""
        s = backoff.Schedule()
        min_gap = s.first * (1 - s.jitter)
        window = s.healthy_after
        most = int(math.log2(window / min_gap + 1)) + 1
        min_gap *= 0.95         # the clocks of two threads, and rounding
        for name, times in self.attempts.by_thread.items():
            for a, b in zip(times, times[1:], strict=False):
                if b - a < min_gap:
                    raise Broken(f"{name} reconnected {b - a:.3f}s after its "
                                 f"previous attempt (schedule: >= {min_gap:.3f}s)")
            j = 0
            for i, t in enumerate(times):
                while t - times[j] > window:
                    j += 1
                if i - j + 1 > most:
                    raise Broken(f"{name}: {i - j + 1} connect attempts within "
                                 f"{window:.0f}s (schedule allows {most})")

    def _read_dead_letters(self):
        if not self.node_up:
            return
        queue = self.observer
        got, undecodable = [], []

        def drain(channel):
            while True:
                try:
                    m = channel.basic_get(queue, no_ack=True)
                except _UNDECODABLE as exc:
                    if isinstance(exc, OSError) and exc.errno != errno.EOVERFLOW:
                        raise
                    # Taken (no_ack), then py-amqp could not decode its
                    # properties: the broker's own dead letter of a hostile
                    # message (x-death, say, from a max-length trim) keeps
                    # the sender's undecodable ones. Counted, and read on.
                    undecodable.append(f"{type(exc).__name__}: {exc}")
                    raise _Undecodable() from exc
                if m is None:
                    return
                got.append(m)
        for _ in range(100):
            try:
                self.admin_do(drain)
                break
            except _Undecodable:
                self._close_admin()     # its frames half read: a new one
            except (amqp.exceptions.AMQPError, OSError) as exc:
                # A quorum observer has no leader for a moment after a
                # cluster node is lost (541 nodedown/noproc): what it holds
                # stays there, read at the next check (_finish bounds it).
                self._close_admin()
                self.log(f"   dead letters not read now: {exc}")
                break
        for m in got:       # taken (no_ack) before any error: never lost
            self._dead_letter(m)
        for what in undecodable:
            self.dead_seen += 1
            self.hostile_dead[self.dead_seen] = "undecodable"
            self.unnamed_dead.append(f"{time.monotonic() - self.t0:.2f}s "
                                     f"undecodable: {what}")

    def _dead_letter(self, m):
        self.dead_seen += 1
        props = m.properties
        headers = props.get("application_headers") or {}
        reason = headers.get(contract.HEADER_REASON)
        if props.get("user_id") not in self._dead_letter_users:
            # The broker's own dead-lettering of a sender's message keeps
            # the sender's user_id and headers: its x-evrouter-reason is
            # the sender's (a forged one, FORGED_CLAIMS), not evrouter's;
            # why it died is in x-death. (evrouter's dead letters carry no
            # user_id, or a service's.)
            reason = None
        if reason is None:
            deaths = headers.get("x-death") or []
            why = deaths[0].get("reason") if deaths else None
            reason = f"x-death:{why}"
        mid = props.get("message_id")
        if isinstance(mid, bytes):
            mid = mid.decode("utf-8", "replace")
        good = self.good.get(mid)
        if good is None:
            if mid in self.unconfirmed:
                return      # a good event whose confirm was lost: may be anywhere
            if reason.startswith("x-death:") and not self._excused(
                    reason, headers.get(HEADER_HOST) or self._host_of(m)):
                raise Broken(f"a hostile message ({mid!r}) dead-lettered by the "
                             f"broker ({reason}), without an evrouter reason")
            # A copy refused by the dead-letter queue reaches the observer
            # too, and may come again: by id (an undecodable one counts).
            named = mid and mid.startswith("bad-")
            self.hostile_dead[mid if named else self.dead_seen] = reason
            if not named:
                self.unnamed_dead.append(
                    f"{time.monotonic() - self.t0:.2f}s {reason} "
                    f"{headers.get(HEADER_HOST) or ''} "
                    f"{str(headers.get(contract.HEADER_DETAIL))[:60]!r}")
            return
        if self._excused(reason, good.host, since=good.sent):
            # Woken as well is fine (a copy the broker took before it
            # refused the rest): exactly once is counted at the waiter.
            good.dead = good.dead or reason
            self.log(f"   good {good.id[:8]} for {good.host} dead-lettered "
                     f"{reason}: excused")
            return
        raise Broken(f"innocent good event {good.id} for {good.host} "
                     f"dead-lettered: {reason} "
                     f"({headers.get(contract.HEADER_DETAIL)!r}; "
                     f"{self._faults_of(good)})")

    def _host_of(self, m):
        deaths = (m.properties.get("application_headers") or {}).get("x-death")
        queue = deaths[0].get("queue", "") if deaths else ""
        for host in self.hosts:
            if queue == self.topo.host_queue_name(host):
                return host
        return None

    def _excused(self, reason, host, since=0.0):
        kinds = EXCUSED.get(reason, set())
        now = time.monotonic()
        for fault in self.faults + self.ended:
            kind = fault.name.split(" ")[0]
            # A message whose host is unknown (hostile, undecodable) is
            # excused only by a fault on every host's way (covers(ALL, None)).
            if kind in kinds and covers(fault.hosts, host) \
                    and (fault.ended is None or fault.ended + GRACE >= since) \
                    and fault.began <= now:
                return True
        return False

    def outstanding(self):
        with self._lock:
            return [g for g in self.good.values()
                    if not g.woken and g.dead is None]

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise Broken(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)

    def close(self):
        for fault in list(self.faults):
            try:
                self.remove(fault)
            except Exception:
                pass
        errors = []
        for run in [self.router] + list(self.consumers.values()):
            try:
                run.stop()
            except Exception as exc:
                errors.append(exc)
        self._drop_clients()
        self._close_admin()
        try:
            self.bus.cleanup()
        except Exception:
            pass
        for name in self.node.policies():
            if name.startswith(self.topo.prefix):
                self.node.clear_policy(name)
        if errors:
            raise errors[0]


# Headers only the router's own user may set (README, "Fault model",
# forbidden claims): from anyone else they are stripped, so this event is
# routed like any other. Trusted, it would go straight to poison.
FORGED_CLAIMS = {
    "x-evrouter-redeliveries": 99,
    "x-evrouter-verdict": "poison",
    "x-evrouter-host": "somebody-else",
    "x-evrouter-reason": "forged",
}


class _UrlBus:
    """What waiter_harness.Publisher wants of a Bus: a URL and a topology."""

    def __init__(self, url, topo):
        self.url = url
        self.topology = topo
