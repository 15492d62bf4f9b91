"""The least-privilege deployment, as the README deploys it, on the real broker.

A fresh vhost and the users `evrouter permissions --apply` creates; then
every part runs as its own broker user: the topology (router user for the
central part, the compute user for its host's part), the router, the
lifecycle agent (libvirt's test driver), the host consumer with its
waiter registry, and the network publisher.
"""

import json
import threading
import time
import uuid

import amqp
import kombu
import libvirt
import pytest

from compute import libvirt_watch
from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router.bus import contract
from router.bus.publishing import BlockingPublisher
from router.routing import Policy
from tests.conftest import RunningRouter, collect, wait_for
from tests.functional.agent_harness import RunningAgent, domain_xml
from tests.functional.test_security import secure  # noqa: F401

pytestmark = pytest.mark.timeout(120)


class Deployed:
    """What `evrouter permissions --apply` and `evrouter topology --declare`
    leave behind, each part of the topology declared by its owner."""

    def __init__(self, d, tmp_path):
        self.d = d
        self.running = []
        out = d.evrouter("permissions", "--apply", "--vhost", d.vhost,
                         "--bus-prefix", d.prefix, "--network-user", d.network,
                         "--router-user", d.router_user,
                         "--compute-user-prefix", d.compute_prefix,
                         "--host", "a", "--host", "b", "--password", d.password)
        assert out.returncode == 0, out.stderr
        # The central topology, as the router user (the compose `topology`
        # service); host a's exchange and queue, as a's compute user.
        out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                         "--transport-url", d.url(d.router_user))
        assert out.returncode == 0, out.stdout + out.stderr
        out = d.evrouter("topology", "--declare", "--host", "a",
                         "--bus-prefix", d.prefix,
                         "--transport-url", d.url(self.compute("a")))
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{d.topology.host_queue_name('a')}: declared" in out.stdout
        assert f"{d.topology.router_queue_name}: exists" in out.stdout
        # libvirt: a test driver of this test's own (test:///<file>), so
        # the host's snapshots hold only this test's domains.
        libvirt_watch.start_event_loop()
        node = tmp_path / "node.xml"
        node.write_text("<node/>")
        self.libvirt_uri = f"test://{node}"
        self.libvirt = None

    def compute(self, host):
        return self.d.compute_prefix + host

    def bus(self, user):
        d = self.d

        class Bus:
            url = d.url(user)
            topology = d.topology
            prefix = d.prefix
        return Bus

    def router(self):
        r = RunningRouter(self.bus(self.d.router_user), policy=Policy(
            allowed_publishers=frozenset({self.d.network}),
            compute_user_prefix=self.d.compute_prefix))
        self.running.append(r)
        return r

    def agent(self, host, **settings):
        # Each open of a test:///<file> URI is a hypervisor of its own, so
        # the agent gets the connection the test drives its domains through.
        self.libvirt = libvirt.open(self.libvirt_uri)
        settings.setdefault("stopped_delay", 0.3)
        # The topology command declared the central exchanges, as the
        # router user: the agent's user may not.
        a = RunningAgent(self.bus(self.compute(host)), declare=False,
                         host=host, libvirt_uri=self.libvirt_uri,
                         resync_from=(self.d.router_user,),
                         opener=lambda _, conn=self.libvirt: conn, **settings)
        self.running.append(a)
        a.wait_healthy()
        return a

    def waiter(self, host):
        events = InstanceEvents()
        consumer = HostConsumer(HostConsumerSettings(
            host=host, transport_url=self.d.url(self.compute(host)),
            topology=self.d.topology), events.deliver)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        assert consumer.ready.wait(15), "host consumer did not start"
        self.running.append(_Stoppable(consumer.stop, thread))
        return events

    def publisher(self):
        p = InstanceEventPublisher(PublisherSettings(
            transport_url=self.d.url(self.d.network), topology=self.d.topology,
            producer="network-test"))
        p.start()
        self.running.append(_Stoppable(p.close, None))
        return p

    def running_domain(self):
        dom = self.libvirt.defineXML(domain_xml(f"evt-{uuid.uuid4().hex[:8]}"))
        dom.create()
        return dom.UUIDString()

    def stop(self):
        for part in reversed(self.running):
            part.stop()


class _Stoppable:
    def __init__(self, stop, thread):
        self._stop, self._thread = stop, thread

    def stop(self):
        self._stop()
        if self._thread is not None:
            self._thread.join(15)


@pytest.fixture
def deployed(secure, tmp_path):  # noqa: F811
    dep = Deployed(secure, tmp_path)
    try:
        yield dep
    finally:
        dep.stop()


def test_hintless_event_reaches_the_announced_host_under_least_privilege(
        deployed):
    d = deployed.d
    router = deployed.router()
    events = deployed.waiter("a")
    agent = deployed.agent("a")
    publisher = deployed.publisher()

    # The agent, as compute user a, publishes (it only checks the lifecycle
    # exchange it may not declare) and the router learns where it runs.
    server = deployed.running_domain()
    wait_for(lambda: router.service.placement.hosts_for(server) == ("a",),
             what="the router learning the instance's host from the agent")
    assert agent.agent.healthy and agent.agent.published >= 2
    assert not any(k.startswith("forbidden:") for k in router.service.stats)

    # An event without a host hint reaches host a's waiter.
    port = str(uuid.uuid4())
    with events.wait_for_instance_event(server, [(contract.VIF_PLUGGED, port)],
                                        timeout=15):
        receipt = publisher.publish(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, port), timeout=15)
        assert not receipt.spooled

    # Compute user b reads neither a's queue nor a's control queue...
    for queue in (d.topology.host_queue_name("a"), agent.agent.control_queue):
        with pytest.raises(amqp.exceptions.AccessRefused):
            collect(d.url(deployed.compute("b")), queue, 1, timeout=2)
    # ...and no compute user may ask the agents for snapshots.
    request = contract.envelope(contract.ResyncRequest("forged"), "b")
    with pytest.raises(amqp.exceptions.AccessRefused):
        with kombu.Connection(d.url(deployed.compute("b"))) as conn:
            BlockingPublisher(conn, user_id=conn.userid).publish(
                d.topology.control_exchange_name, "", contract.encode(request),
                mandatory=False)
    # Nor can b declare a's entities.
    out = d.evrouter("topology", "--declare", "--host", "a",
                     "--bus-prefix", d.prefix,
                     "--transport-url", d.url(deployed.compute("b")))
    assert out.returncode == 0, out.stderr      # they exist: only checked
    assert f"{d.topology.host_queue_name('a')}: exists" in out.stdout
    out = d.evrouter("topology", "--declare", "--host", "c",
                     "--bus-prefix", d.prefix,
                     "--transport-url", d.url(deployed.compute("b")))
    assert out.returncode == 1
    assert f"{d.topology.host_queue_name('c')} (host c: declare it as that " \
           f"host's compute user" in out.stderr


def test_a_restarted_router_learns_the_placement_within_seconds(deployed):
    # Waits on the router side of issue 11 item 3: the router publishes a
    # resync-request on the control exchange when its session starts.
    deployed.agent("a", snapshot_interval=0)      # no periodic snapshots
    server = deployed.running_domain()
    first = deployed.router()
    wait_for(lambda: first.service.placement.hosts_for(server) == ("a",),
             what="the first router learning the placement")
    first.stop()
    deployed.running.remove(first)

    started = time.monotonic()
    second = deployed.router()
    wait_for(lambda: second.service.placement.hosts_for(server) == ("a",),
             timeout=10, what="the restarted router learning the placement "
                              "(resync request answered by a host snapshot)")
    took = time.monotonic() - started
    print(f"restarted router knows the placement {took * 1000:.0f} ms "
          f"after it started")
    assert took < 5


def test_the_dead_letter_queue_every_host_may_fill_is_bounded(deployed):
    """Every compute user may write the dead-letter exchange and nothing
    consumes its queue: `permissions --apply` bounds it with a policy (the
    oldest dead letters go first), and only it (hostile review of issue 20:
    one compromised host could fill the broker until its alarm blocked every
    publisher)."""
    import subprocess
    d = deployed.d
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", d.vhost,
                          "name", "policy", "--no-table-headers"],
                         capture_output=True, text=True, timeout=60, check=True)
    policy_of = dict(line.split("\t") for line in out.stdout.splitlines()
                     if "\t" in line)
    assert policy_of[d.topology.dead_letter_queue_name] == \
        f"{d.prefix}-dead-letter-bound"
    others = {q: p for q, p in policy_of.items()
              if q != d.topology.dead_letter_queue_name and p}
    assert others == {}
    out = subprocess.run(["rabbitmqctl", "-q", "list_policies", "-p", d.vhost,
                          "--formatter", "json"], capture_output=True, text=True,
                         timeout=60, check=True)
    [policy] = json.loads(out.stdout)
    definition = json.loads(policy["definition"]) if isinstance(
        policy["definition"], str) else policy["definition"]
    assert definition["overflow"] == "drop-head"
    assert 0 < definition["max-length-bytes"] <= 1 << 30
