"""The stateful chaos test (issue 19, item 10): a seeded random schedule.

Against a RabbitMQ node of its own (chaos1@localhost, 127.0.0.1:5740), a
real router and a real host consumer for each of three hosts, each service
its own broker user, interleave for EVROUTER_CHAOS_STEPS steps (default
200; the seed is printed, EVROUTER_CHAOS_SEED replays its choices, the
broker's timing aside):

- good events for the three hosts through the confirmed publisher, some
  forging the router's own headers (forbidden claims, to be ignored);
- hostile messages on the ingress exchange and straight onto a host's
  exchange: the poison corpus (tests/functional/poison.py: undecodable,
  oversized, wrong schema...) and headers that inflate when re-encoded;
- broker-side faults, each in force for a few steps: a host exchange or
  host queue deleted (then declared again); a reject-publish policy on a
  host queue, the dead-letter, probation, a retry or the router queue; a
  max-length policy on a host queue; a user's permissions revoked with its
  connections closed (then restored); `stop_app`/`start_app` of the node;
- instant faults: `close_connection` of the router's or a host consumer's
  connection, and restarts of the router or of one host consumer;
- pauses, while what is in flight settles.

After every step the invariants are checked (tests/chaos/world.py):

1. every confirmed good event is woken exactly once at its host's
   registry (the waiter dedupes by message id: wakeups are counted, not
   broker copies), and by its deadline;
2. nothing innocent is dead-lettered: a good event may be dead-lettered
   only for a reason its own fault explains (world.EXCUSED, while that
   fault was in force or within a second of its removal), and is then
   accounted for; every hostile message is dead-lettered with an evrouter
   reason or dropped and counted (`dropped:<reason>`), checked at the end;
3. routing resumes in time. The reading: an event no fault holds up is
   woken within 2 s of its confirm. After a fault that leaves the
   connection up (deleted exchange or queue, a policy, a restart) routing
   resumes within 2 s of its removal: an event sent then is woken within
   2 s. After one that takes a service's connection (close_connection,
   stop_app, revoked permissions) it resumes within that service's next
   backoff attempt by the documented schedule (router/bus/backoff.py: the
   ceiling of its next failure count, 0.5 s doubling to 30 s, reset only
   after 10 s healthy) + 2 s. Events the fault held up arrive within that
   plus what the fault's own retry path documents: a parked event's retry
   tier (16 s at most), a refused copy's next try (5 s at most);
4. reconnects follow the backoff schedule: per service, no two connect
   attempts closer than first × (1 − jitter), and no more in any 10 s
   than the waits of the schedule let fit (no herd);
5. no service died, none restarted itself after an unexpected error, and
   no thread is left behind (tests/isolation.py, autouse).

Any break fails with the seed and the step history.
"""

import os
import random
import time
import uuid

import pytest

from tests.chaos import world as cw
from tests.functional import poison

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(0)]

HOSTS = ("h1", "h2", "h3")
STEPS = int(os.environ.get("EVROUTER_CHAOS_STEPS", "200"))


def _seed():
    given = os.environ.get("EVROUTER_CHAOS_SEED")
    return int(given) if given else random.SystemRandom().randrange(2 ** 32)


def hostile_cases(host):
    """(name, body, properties, raw properties): the poison corpus, and
    headers that inflate when re-encoded. Raw ones get a message id where
    the id is not what is hostile about them, for the accounting. All
    persistent, as evrouter's publishers send: a transient one is lost by
    stop_app, rightly."""
    cases = []
    for name, body, props, raw, _ in poison.cases(host):
        if raw is not None:
            raw = PERSISTENT_RAW[name]
        cases.append((name, body, props, raw))
    for name, headers, raw in poison.oversized_header_cases():
        if raw is not None:
            cases.append((name, b"not json", None, poison.raw_properties(
                message_id=_bad_id(), headers=raw, delivery_mode=2)))
        else:
            cases.append((name, b"not json",
                          {"application_headers": headers}, None))
    return cases


# The corpus's raw-property cases, persistent. Their message id cannot
# reach a dead letter (undecodable), so they are counted, not named.
PERSISTENT_RAW = {
    "message_id that is not UTF-8": poison.raw_properties(
        message_id=b"\xff\xfe-id", delivery_mode=2),
    "timestamp header out of range": poison.raw_properties(
        headers=poison.raw_timestamp_header(), delivery_mode=2),
}


def _bad_id():
    return f"bad-{uuid.uuid4().hex[:12]}".encode()


class Schedule:
    """Chooses and does one step at a time; the World checks after each."""

    def __init__(self, world, rng):
        self.w, self.rng = world, rng
        self.fault = None           # the durational fault in force
        self.steps_left = 0         # ... for so many more steps
        self.down_for = 0.0         # seconds the node stays stopped
        self.counts = {}

    def step(self):
        w, rng = self.w, self.rng
        if not w.node_up:
            # Nothing can be sent: watch the services try until start_app.
            self.watch(self.down_for)
            return self._end_fault()
        if self.fault is not None:
            self.steps_left -= 1
            if self.steps_left <= 0:
                return self._end_fault()
        actions = [(self.good, 35), (self.forged, 4), (self.hostile, 10),
                   (self.hostile_at_host, 6), (self.settle, 15),
                   (self.close, 4), (self.restart, 3)]
        if self.fault is None:
            actions.append((self.begin_fault, 14))
        action = rng.choices([a for a, _ in actions],
                             [n for _, n in actions])[0]
        action()
        # Steps take time, as traffic does: faults last seconds, patience
        # and backoff run out, retries come back; meanwhile the invariants
        # are watched.
        self.watch(rng.uniform(0.0, 0.8))

    def watch(self, seconds):
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            self.w.check()
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))

    def _did(self, kind, what):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.w.log(what)

    # --- traffic ----------------------------------------------------------------
    def good(self):
        hosts = [self.rng.choice(HOSTS) for _ in range(self.rng.randint(1, 4))]
        sent = [self.w.send_good(h) for h in hosts]
        self._did("good", f"good events for {', '.join(hosts)}: "
                  f"{sum(1 for s in sent if s)} confirmed")

    def forged(self):
        host = self.rng.choice(HOSTS)
        ok = self.w.send_good(host, forged=True)
        self._did("forged", f"good event for {host} forging x-evrouter-* "
                  f"headers: {'confirmed' if ok else 'not confirmed'}")

    def hostile(self, to_host=None):
        case = self.rng.choice(hostile_cases(self.rng.choice(HOSTS)))
        ok = self.w.send_hostile(case, to_host)
        where = f"host {to_host}'s exchange" if to_host else "ingress"
        self._did("hostile", f"hostile {case[0]!r} to {where}: "
                  f"{'confirmed' if ok else 'not confirmed'}")

    def hostile_at_host(self):
        host = self.rng.choice(HOSTS)
        if any(f.name.split(" ")[0] in ("exchange-gone", "queue-gone")
               for f in self.w.faults):
            return self.hostile()
        self.hostile(host)

    def settle(self):
        """Let time pass: until nothing unblocked is outstanding, or a
        random while (0.1-1.5 s), whichever comes first."""
        limit = self.rng.uniform(0.1, 1.5)
        took = self._settle(limit)
        self._did("settle", f"settle ({took:.2f}s of {limit:.2f}s)")

    def _settle(self, limit):
        w = self.w
        t = time.monotonic()
        while time.monotonic() - t < limit:
            if not any(g.due is not None for g in w.outstanding()):
                break
            time.sleep(0.02)
        return time.monotonic() - t

    # --- instant faults ---------------------------------------------------------------
    def close(self):
        who = self.rng.choice(("router",) + HOSTS)
        user = cw.ROUTER_USER if who == "router" else cw.host_user(who)
        fault = cw.Fault(f"close-connection {who}",
                        cw.ALL if who == "router" else frozenset({who}),
                        lost=(who,))
        self.w.begin(fault)
        self._did("close", f"close_connection of {who}'s connections")
        self.w.node.close_connections(user)
        self.w.remove(fault)

    def restart(self):
        if self.rng.random() < 0.4:
            self._did("restart", "restart the router")
            self.w.restart_router()
        else:
            host = self.rng.choice(HOSTS)
            self._did("restart", f"restart host consumer {host}")
            self.w.restart_host(host)

    # --- durational faults ---------------------------------------------------------------
    def begin_fault(self):
        kinds = [(self.exchange_gone, 3), (self.queue_gone, 2),
                 (self.refuse_host, 3), (self.refuse_central, 4),
                 (self.maxlen_host, 2), (self.revoke, 2), (self.stop_app, 0.6),
                 (self.internal_host, 2), (self.deny_write, 2)]
        make = self.rng.choices([k for k, _ in kinds], [n for _, n in kinds])[0]
        fault = make()
        if fault is None:
            return
        # A step takes 0.4 s on average (its watch), so faults last from
        # a moment to several seconds: some outlast the router's
        # refused_patience (world.REFUSED_PATIENCE). Counted in steps, not
        # seconds, so that a seed replays the same choices.
        self.fault, self.steps_left = fault, self.rng.randint(1, 10)
        self.down_for = self.rng.uniform(0.3, 5.0)
        self._did(fault.name.split(" ")[0], f"fault: {fault.name} "
                  f"(for {self.steps_left} steps)")

    def _end_fault(self):
        fault, self.fault = self.fault, None
        self.w.log(f"end of fault {fault.name}")
        self.w.remove(fault)

    def exchange_gone(self):
        """An operator deletes the hosts exchange every host copy goes
        through, and every host's binding with it. The router's next copy
        finds it gone (404) and declares it again; until the host queues
        are bound again (each consumer's queue watch, or the undo as an
        operator would) the copies come back and are parked."""
        w = self.w
        name = w.topo.hosts_exchange_name

        def undo():
            w.admin_do(lambda ch: w.topo.hosts_exchange()(ch).declare())
            for host in HOSTS:
                w.admin_do(lambda ch, host=host: _declare_host(w, ch, host))
        fault = cw.Fault(f"exchange-gone {name}", cw.ALL,
                         backlog=cw.PARKED_TIER, undo=undo)
        w.begin(fault)
        w.admin_do(lambda ch: ch.exchange_delete(name))
        return fault

    def queue_gone(self):
        w, host = self.w, self.rng.choice(HOSTS)
        # An operator deleting a queue loses what is in it: delete it only
        # once what was sent for the host has been taken.
        try:
            w.wait(lambda: not [g for g in w.outstanding() if g.host == host
                                and g.due is not None], 5, "quiet")
        except cw.Broken:
            return None
        fault = cw.Fault(f"queue-gone {host}", frozenset({host}), lost=(host,),
                        backlog=cw.PARKED_TIER,
                        undo=lambda: w.admin_do(lambda ch: _declare_host(w, ch, host)))
        w.begin(fault)
        w.admin_do(lambda ch: ch.queue_delete(w.topo.host_queue_name(host)))
        return fault

    def _policy(self, fault, queue, definition):
        w = self.w
        name = f"{w.topo.prefix}-{fault.name.replace(' ', '-')}"
        fault.undo = lambda: w.node.clear_policy(name)
        w.begin(fault)
        w.node.set_policy(name, queue, definition)
        return fault

    def refuse_host(self):
        """A host's queue refuses every copy (reject-publish). The router
        parks its copies, and for refused_hold after its last refusal parks
        that host's new copies without publishing them (router/delivery.py,
        _avoid_host): a copy refused just after the policy went (the broker
        applies its removal a moment later) opens that window again, so an
        event sent then resumes within avoided_resume, not RESUME (a CI run:
        an event sent as the fault ended came 3.7 s later, parked past the
        window by the tiers)."""
        w, host = self.w, self.rng.choice(HOSTS)
        return self._policy(
            cw.Fault(f"refuse-host {host}", frozenset({host}),
                    backlog=cw.parked_backlog(w.refused_patience),
                    resume=cw.avoided_resume(w.refused_hold)),
            w.topo.host_queue_name(host), REJECT_ALL)

    def refuse_central(self):
        w = self.w
        which = self.rng.choice(("dead-letter", "probation", "retry", "router"))
        queue = {"dead-letter": w.topo.dead_letter_queue_name,
                 "probation": w.topo.probation_queue_name,
                 "retry": w.topo.retry_queue_name(min(w.topo.retry_delays_ms)),
                 "router": w.topo.router_queue_name}[which]
        # Probation and retry copies carry good events (redelivered or
        # parked ones), and a parked event goes back through the router
        # queue: those faults may hold up anybody's. The router queue keeps
        # a parked event out until the broker tries again (cw.PARKED_RESEND)
        # after its tier; dead letters carry no good event.
        hosts = frozenset() if which == "dead-letter" else cw.ALL
        backlog = (cw.PARKED_TIER + cw.PARKED_RESEND if which == "router"
                   else cw.REFUSED_RETRY_CAP)
        return self._policy(cw.Fault(f"refuse-{which}", hosts, backlog=backlog),
                            queue, REJECT_ALL)

    def maxlen_host(self):
        w, host = self.w, self.rng.choice(HOSTS)
        return self._policy(cw.Fault(f"maxlen-host {host}", frozenset({host})),
                            w.topo.host_queue_name(host), {"max-length": 1})

    def revoke(self):
        """A user's permissions taken away, its connections closed. Either
        deleted (it cannot even open the vhost: 530 at connect) or emptied
        (it connects, and its first declare gets 403: a session that dies
        at once, the thundering-herd case of issue 19 item 2)."""
        w = self.w
        who = self.rng.choice(("router",) + HOSTS)
        how = self.rng.choice(("revoke", "deny"))
        user = cw.ROUTER_USER if who == "router" else cw.host_user(who)
        fault = cw.Fault(f"{how} {who}",
                         cw.ALL if who == "router" else frozenset({who}),
                         lost=(who,), undo=lambda: w.node.grant(user))
        w.begin(fault)
        if how == "revoke":
            w.node.revoke(user)
        else:
            w.node.grant(user, "^$")
        w.node.close_connections(user)
        return fault

    def internal_host(self):
        """A compromised host declares its exchange again as `internal`.
        Before the hosts exchange, every publish to it closed the router's
        channel with 403; now the router never publishes there, and its
        queue stays bound to the hosts exchange: nobody's events are held
        up (its own consumer, if it restarts, cannot declare the exchange
        as it is: lost until the undo)."""
        w, host = self.w, self.rng.choice(HOSTS)
        # lost: its consumer's connection stays, but a new session (a
        # restart, a close_connection) cannot declare the exchange as it
        # is (406 inequivalent arg 'internal') until the fault is undone.
        fault = cw.Fault(
            f"internal-host {host}", frozenset({host}), lost=(host,),
            backlog=cw.parked_backlog(w.refused_patience),
            resume=cw.avoided_resume(w.refused_hold),
            undo=lambda: w.admin_do(lambda ch: _redeclare_host(w, ch, host)))
        w.begin(fault)
        w.admin_do(lambda ch: _redeclare_host(w, ch, host, internal=True))
        return fault

    def deny_write(self):
        """A user's write permission taken away with its connections left
        open (issue 19's review: the router's publishes refused "for user",
        every copy alike). The router holds every copy and tries one again
        with backoff; a host consumer can no longer dead-letter. What a
        channel already wrote to may go on: the broker checks a permission
        once per channel and destination."""
        w = self.w
        who = self.rng.choice(("router",) + HOSTS)
        user = cw.ROUTER_USER if who == "router" else cw.host_user(who)
        # lost: its connection stays, but a new one (a restart, a
        # close_connection) cannot declare or bind, as a revoked one.
        fault = cw.Fault(
            f"deny-write {who}", cw.ALL if who == "router" else frozenset(),
            lost=(who,), backlog=cw.REFUSED_RETRY_CAP,
            resume=cw.RESUME + cw.REFUSED_RETRY_CAP,
            undo=lambda: w.node.grant(user))
        w.begin(fault)
        w.node.grant(user, write="^$")
        return fault

    def stop_app(self):
        w = self.w

        def start():
            w.node.start_app()
            w.node_up = True

        fault = cw.Fault("stop_app", cw.ALL, lost=("router",) + HOSTS,
                        undo=start)
        w.begin(fault)
        w.node_up = False
        w._drop_clients()
        w._close_admin()
        w.node.stop_app()
        return fault


REJECT_ALL = {"max-length": 0, "overflow": "reject-publish"}


def _declare_host(world, channel, host):
    from router.bus import topology
    topology.declare(channel, *world.topo.for_host(host))


def _redeclare_host(world, channel, host, internal=False):
    """The host's exchange deleted and declared again (internal or not),
    bound to its queue as the topology binds it."""
    from router.bus import topology
    [exchange], [queue] = world.topo.for_host(host)
    channel.exchange_delete(exchange.name)
    if internal:
        poison.declare_internal_exchange(channel, exchange.name, exchange.type)
    else:
        exchange(channel).declare()
    channel.queue_bind(queue.name, exchange.name,
                       routing_key=topology.INSTANCE_BINDING)


def test_chaos(chaos_node, monkeypatch):
    seed = _seed()
    rng = random.Random(seed)
    history = []
    print(f"\nchaos: seed {seed} (EVROUTER_CHAOS_SEED={seed} replays it), "
          f"{STEPS} steps")
    t0 = time.monotonic()
    world = None
    try:
        world = cw.World(chaos_node, HOSTS, rng, history, monkeypatch)
        schedule = Schedule(world, rng)
        for i in range(STEPS):
            world.log(f"step {i + 1}")
            schedule.step()
            world.check()
        if schedule.fault is not None:
            schedule._end_fault()
        _finish(world)
    except cw.Broken as exc:
        pytest.fail(_report(seed, history, f"invariant broken: {exc}"),
                    pytrace=False)
    except Exception as exc:
        pytest.fail(_report(seed, history,
                            f"{type(exc).__name__}: {exc}"), pytrace=True)
    finally:
        if world is not None:
            world.close()
    elapsed = time.monotonic() - t0
    print("\n".join(world.summary("chaos", seed, STEPS, elapsed, schedule.counts)))


def _finish(world):
    """Everything in flight arrives by its deadline; every hostile message
    is accounted for."""
    world.log("finish: waiting for everything due")
    last = max((g.due for g in world.outstanding() if g.due), default=0.0)
    deadline = max(last, time.monotonic()) + 1.0
    while world.outstanding() and time.monotonic() < deadline:
        world.check()
        time.sleep(0.05)
    world.check()
    if world.outstanding():
        raise cw.Broken(f"{len(world.outstanding())} good events never woken")

    def dropped():
        return sum(n for stats in world.all_stats()
                   for k, n in stats.items() if k.startswith("dropped:"))

    def accounted():
        world.check()
        return len(world.hostile_dead) + dropped() >= world.hostile_sent
    try:
        world.wait(accounted, 2 * world.refused_patience + 10,
                   "every hostile message dead-lettered or dropped")
    except cw.Broken:
        missing = {i: what for i, what in world.hostile_ids.items()
                   if i not in world.hostile_dead}
        raise cw.Broken(f"{world.hostile_sent} hostile messages sent, "
                        f"{len(world.hostile_dead)} dead-lettered, "
                        f"{dropped()} dropped: some are lost; never "
                        f"dead-lettered: {missing}; without an id, sent: "
                        f"{world.unnamed_sent}; dead letters without one: "
                        f"{world.unnamed_dead}") from None


def _report(seed, history, what, steps=STEPS):
    shown = history if len(history) <= 400 else (
        [f"... {len(history) - 400} earlier lines"] + history[-400:])
    return (f"{what}\n\nseed {seed}: replay with EVROUTER_CHAOS_SEED={seed} "
            f"EVROUTER_CHAOS_STEPS={steps}\nstep history:\n" + "\n".join(shown))
