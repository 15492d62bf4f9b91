"""The chaos test on the 3-node cluster, with node faults (issue 19, item 10).

The machine of test_chaos.py (its docstring states the schedule and the
invariants; tests/chaos/world.py holds them) against c1..c3@localhost of
tests/cluster/rabbitmq-cluster.sh with quorum queues, every service given a
failover URL of the three nodes (each service's list begins at another
node, so they spread). The whole-broker `stop_app` of the single-node run
gives way to faults of one node at a time:

- kill -9 of a node, started again with its data some steps later;
- `stop_app` of a node, `start_app` some steps later;
- `rabbitmqctl stop` of a node (the whole Erlang VM, cleanly), started
  again some steps later;

each aimed at a node chosen at random, at the node a service uses now,
or at the node leading the router queue or a host queue now. The services
fail over to the nodes that are up, the quorum queues elect new leaders;
the node's return happens while the traffic and the other faults go on.
They run beside the other faults, one node away at a time (two would take
every queue's majority), and no host queue is deleted and declared again
while one is (a quorum queue declared then gets two members, and 3.10
never grows it).

Bounds that differ from the single node's, each named here with why:
NODE_FAILOVER (a leader election), CLUSTER_REFUSED_PATIENCE and
QUEUE_GONE_UNCANCELLED (a deleted quorum queue's consumers are not always
cancelled).
EVROUTER_CHAOS_STEPS (default 120) and EVROUTER_CHAOS_SEED as there.
"""

import os
import random
import re
import time

import pytest

from compute.host_consumer import HostConsumerSettings
from tests.chaos import test_chaos as tc
from tests.chaos import world as cw

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(0)]

HOSTS = tc.HOSTS
STEPS = int(os.environ.get("EVROUTER_CHAOS_STEPS", "120"))

# A node lost, the quorum queues it led have no leader until the others
# elect one (about a second when idle; the election, the queue record's
# update and the consumers' re-registration take longer on this busy
# 2-core VM running three nodes). Routing resumes within this plus the
# services' next backoff attempt (+ world.RESUME); nothing of the kind
# exists on a single node, whose run keeps its bounds.
NODE_FAILOVER = 5.0
# The router's refused_patience here (world.REFUSED_PATIENCE, 3 s, on the
# single node): a copy for a host queue whose leader died is refused until
# the election is over, so the patience must outlast NODE_FAILOVER or an
# innocent copy is dead-lettered `refused` for a failover (a deployment's
# default, 20 s, outlasts it). refuse-* faults still outlast it at times.
CLUSTER_REFUSED_PATIENCE = NODE_FAILOVER + 3.0
# A host queue deleted: RabbitMQ 3.10 does not always cancel the consumers
# of a deleted quorum queue (1 deletion in 10 here); the host consumer then
# finds it out by its idle check (router/bus/consuming.py: every
# consume_check seconds, and once more a second later when its queue is
# there without a consumer), and only then reconnects. A classic queue's
# deletion always cancels: the single node's run keeps its bound.
QUEUE_GONE_UNCANCELLED = HostConsumerSettings(host="-").consume_check + 1.0
# Each step, with every node up, a node fault begins with this chance. A
# node's return takes 5-28 s (as many steps), when no other may go: a
# 120-step run sees two or three.
NODE_FAULT_CHANCE = 0.08


class ClusterSchedule(tc.Schedule):
    """test_chaos.Schedule with node faults in place of stop_app.

    Node faults run on a track of their own, beside the schedule's other
    faults (a node may die while a policy refuses a queue or a user is
    revoked): at most one node away at a time, from its fault until its
    return has finished, and none while a host queue is deleted (nor one
    deleted while a node is away: declared again then, it would get two
    members and stop when either of them dies).
    """

    def __init__(self, world, rng, broker):
        super().__init__(world, rng)
        self.broker = broker
        self.going = None           # (node, how, process, failover fault)
        self.away = None            # (node, how, steps left) while down
        self.reviving = None        # (node, how, process, since)
        self.failovers = []         # the instant faults of node faults

    def step(self):
        self._node_track()
        super().step()

    def whole(self):
        return not self.broker.down

    def begin_fault(self):
        kinds = [(self.exchange_gone, 3), (self.refuse_host, 3),
                 (self.refuse_central, 4), (self.maxlen_host, 2),
                 (self.revoke, 2), (self.internal_host, 2),
                 (self.deny_write, 2)]
        if self.whole():
            kinds.append((self.queue_gone, 2))
        make = self.rng.choices([k for k, _ in kinds], [n for _, n in kinds])[0]
        fault = make()
        if fault is None:
            return
        self.fault, self.steps_left = fault, self.rng.randint(1, 10)
        self._did(fault.name.split(" ")[0], f"fault: {fault.name} "
                  f"(for {self.steps_left} steps)")

    def queue_gone(self):
        fault = super().queue_gone()
        if fault is not None:
            fault.settle = QUEUE_GONE_UNCANCELLED
        return fault

    # --- node faults ---------------------------------------------------------------
    def _node_track(self):
        """One step of the node faults: a node going, away for some steps,
        coming back, or (with the whole cluster up) a fault beginning."""
        if self.going is not None:
            return self._poll_going()
        if self.reviving is not None:
            return self._poll_revival()
        if self.away is not None:
            n, how, left = self.away
            self.away = (n, how, left - 1) if left > 1 else None
            if self.away is None:
                self._revive(n, how)
            return None
        deleting = self.fault is not None and self.fault.name.startswith("queue-gone")
        if not deleting and self.rng.random() < NODE_FAULT_CHANCE:
            how = self.rng.choices(("kill", "stop_app", "stop"), (3, 2, 1))[0]
            self._node_fault(how)
        return None

    def _node_fault(self, how):
        """Take a node away, while the traffic and the other faults go on.
        The failover it causes is a fault on every host's events, in force
        until the node is down (stop_app takes seconds); then routing
        resumes within NODE_FAILOVER and the next backoff attempt of the
        services that were connected there. The node being away holds
        nothing up: the others serve."""
        w = self.w
        n, why = self._target()
        lost = tuple(who for who in ("router",) + HOSTS if self._node_of(who) == n)
        failover = cw.Fault(f"{how}-node c{n}", cw.ALL, lost=lost,
                            settle=NODE_FAILOVER,
                            backlog=cw.parked_backlog(w.refused_patience))
        w.begin(failover)
        self.failovers.append(failover)
        self._did(how, f"node fault: {how} of c{n} ({why}; connected there: "
                  f"{', '.join(lost) or 'none'})")
        w._drop_clients()
        w._close_admin()
        self.going = (n, how, self.broker.take_down(n, how), failover)

    def _poll_going(self, wait=False):
        n, how, proc, failover = self.going
        while wait and proc.poll() is None:
            self.watch(0.1)
        if proc.poll() is None:
            return
        if proc.returncode:
            raise RuntimeError(f"{how} of c{n}: {proc.stderr.read()}")
        self.going = None
        self.w.log(f"   c{n} down ({time.monotonic() - failover.began:.2f}s)")
        self.w.remove(failover)
        self.away = (n, how, self.rng.randint(1, 10))
        self.w.log(f"   c{n} stays down for {self.away[2]} steps")

    def _target(self):
        """A node to hurt, and why that one."""
        rng, w, broker = self.rng, self.w, self.broker
        kind = rng.choice(("random", "service", "router-leader", "host-leader"))
        n = None
        if kind == "service":
            who = rng.choice(("router",) + HOSTS)
            n, why = self._node_of(who), f"{who}'s node"
        elif kind == "router-leader":
            n, why = broker.leader(w.topo.router_queue_name), "router queue's leader"
        elif kind == "host-leader":
            host = rng.choice(HOSTS)
            n, why = (broker.leader(w.topo.host_queue_name(host)),
                      f"{host} queue's leader")
        if n not in broker.up():
            n, why = rng.choice(broker.up()), "at random"
        return n, why

    def _node_of(self, who):
        run = self.w.router if who == "router" else self.w.consumers[who]
        return self.broker.node_of_port(
            self.w.attempts.port_of.get(run.thread.name))

    def _revive(self, n, how):
        self.w.log(f"   c{n} coming back ({REVIVE[how]})")
        self.reviving = (n, how, self.broker.revive(n, how), time.monotonic())

    def _poll_revival(self, wait=False):
        if self.reviving is None:
            return
        n, how, proc, since = self.reviving
        while wait and proc.poll() is None:
            self.watch(0.2)
        if proc.poll() is None:
            return
        if proc.returncode:
            raise RuntimeError(f"c{n} did not come back: {proc.stderr.read()}")
        self.broker.back(n)
        self.reviving = None
        self.w.log(f"   c{n} back in the cluster after {time.monotonic() - since:.1f}s")


def test_chaos_on_the_cluster(chaos_cluster, monkeypatch):
    seed = tc._seed()
    rng = random.Random(seed)
    history = []
    print(f"\ncluster chaos: seed {seed} (EVROUTER_CHAOS_SEED={seed} replays it), "
          f"{STEPS} steps")
    t0 = time.monotonic()
    world = schedule = None
    try:
        world = cw.World(chaos_cluster, HOSTS, rng, history, monkeypatch,
                         queue_type="quorum",
                         refused_patience=CLUSTER_REFUSED_PATIENCE)
        schedule = ClusterSchedule(world, rng, chaos_cluster)
        for i in range(STEPS):
            world.log(f"step {i + 1}")
            schedule.step()
            world.check()
        if schedule.fault is not None:
            schedule._end_fault()
        if schedule.going is not None:
            schedule._poll_going(wait=True)
        if schedule.away is not None:
            schedule._revive(*schedule.away[:2])
        schedule._poll_revival(wait=True)
        tc._finish(world)
    except cw.Broken as exc:
        _diagnose(world, chaos_cluster)
        pytest.fail(tc._report(seed, history, f"invariant broken: {exc}", STEPS),
                    pytrace=False)
    except Exception as exc:
        pytest.fail(tc._report(seed, history,
                               f"{type(exc).__name__}: {exc}", STEPS),
                    pytrace=True)
    finally:
        for proc in (schedule.going, schedule.reviving) if schedule else ():
            if proc is not None:
                proc[2].wait(240)
        chaos_cluster.make_whole()
        if world is not None:
            world.close()
    elapsed = time.monotonic() - t0
    print("\n".join(world.summary("cluster chaos", seed, STEPS, elapsed,
                                   schedule.counts)))
    print("cluster chaos: node faults\n" + "\n".join(
        line for line in history if NODE_LINE.search(line)))
    for fault in schedule.failovers:
        print(f"cluster chaos: {fault.name}: {_failover_wait(world, fault)}")


def _diagnose(world, broker):
    """At a break: what each service says and what the broker holds."""
    if world is None:
        return
    for host, run in world.consumers.items():
        port = world.attempts.port_of.get(run.thread.name)
        world.log(f"diagnosis: host consumer {host}: {run.service.health()}, "
                  f"connected to c{broker.node_of_port(port)}")
    for name in [world.topo.router_queue_name] + [
            world.topo.host_queue_name(h) for h in world.hosts]:
        try:
            info = broker.api("GET", f"/queues/%2F/{name}", timeout=5) or {}
        except (OSError, RuntimeError) as exc:
            info = {"error": str(exc)}
        world.log(f"diagnosis: {name}: " + ", ".join(
            f"{k}={info.get(k)}" for k in ("leader", "members", "online",
                                           "consumers", "messages_ready",
                                           "messages_unacknowledged", "error")))


def _failover_wait(world, fault, after=10.0):
    """The longest wait, from the node fault's start (or its send, if
    later), of an event the node fault held up or sent within `after` s of
    the node being down: how long the failover really took for traffic
    (with every fault that event met: another may have held it longer)."""
    waits = [(g.woken[0][1] - max(g.sent, fault.began), g)
             for g in world.good.values() if g.woken and g.dead is None and (
                 fault in g.faults_seen
                 or fault.ended <= g.sent <= fault.ended + after)]
    if not waits:
        return "no events"
    wait, slowest = max(waits, key=lambda w: w[0])
    return (f"{len(waits)} events, longest wait {wait:.2f}s "
            f"(faults it met: {', '.join(f.name for f in slowest.faults_seen) or 'none'})")


REVIVE = {"kill": "started again", "stop": "started again",
          "stop_app": "start_app"}
NODE_LINE = re.compile(r"(kill|stop_app|stop)(-node| of)? c\d|c\d (down|back|coming)")
