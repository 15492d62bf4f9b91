"""Permissions applied on the real broker: nobody can pretend to be somebody else."""

import subprocess
import sys
import uuid

import amqp
import kombu
import pytest

from router.bus import contract, topology
from router.bus.publishing import BlockingPublisher
from router.routing import Policy
from tests.conftest import RunningRouter, collect, wait_for


class SecureDeployment:
    def __init__(self):
        tag = uuid.uuid4().hex[:8]
        self.vhost = f"evt-sec-{tag}"
        self.password = f"pw-{tag}"
        self.network = f"evt-{tag}-net"
        self.rogue = f"evt-{tag}-rogue"
        self.router_user = f"evt-{tag}-router"
        self.compute_prefix = f"evt-{tag}-cmp-"
        self.topology = topology.Topology(prefix=f"evt-{tag}")
        self.prefix = self.topology.prefix
        self.users = [self.network, self.rogue, self.router_user,
                      self.compute_prefix + "a", self.compute_prefix + "b"]

    def url(self, user):
        return f"amqp://{user}:{self.password}@127.0.0.1:5672/{self.vhost}"

    def evrouter(self, *args):
        return subprocess.run([sys.executable, "-m", "router.cli", *args],
                              capture_output=True, text=True, timeout=120)

    def cleanup(self):
        subprocess.run(["rabbitmqctl", "delete_vhost", self.vhost], capture_output=True)
        for user in self.users:
            subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True)


@pytest.fixture
def secure():
    d = SecureDeployment()
    try:
        yield d
    finally:
        d.cleanup()


def publish(url, exchange, key, body, **kwargs):
    with kombu.Connection(url) as conn:
        BlockingPublisher(conn, user_id=conn.userid).publish(exchange, key, body, **kwargs)


def event(host):
    return contract.envelope(contract.InstanceEvent(
        "network-vif-plugged", str(uuid.uuid4()), "p1", host=host), "t")


def test_permissions_confine_every_user_to_its_role(secure):
    d = secure
    out = d.evrouter("permissions", "--apply", "--vhost", d.vhost, "--bus-prefix", d.prefix,
                     "--network-user", d.network, "--router-user", d.router_user,
                     "--compute-user-prefix", d.compute_prefix, "--host", "a", "--host", "b",
                     "--password", d.password)
    assert out.returncode == 0, out.stderr
    # the rogue may write ingress too, but is not an allowed publisher
    subprocess.run(["rabbitmqctl", "add_user", d.rogue, d.password], check=True,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", d.vhost, d.rogue, "^$",
                    f"^{d.prefix}\\.ingress$", "^$"], check=True, capture_output=True)

    class Bus:
        url = d.url(d.router_user)
        topology = d.topology
        prefix = d.prefix
    router = RunningRouter(Bus, policy=Policy(
        allowed_publishers=frozenset({d.network}), compute_user_prefix=d.compute_prefix))
    try:
        # each compute host declares its own exchange and queue, nothing else
        for host in ("a", "b"):
            with kombu.Connection(d.url(d.compute_prefix + host)) as conn:
                topology.declare(conn.channel(), *d.topology.for_host(host))
        with kombu.Connection(d.url(d.compute_prefix + "a")) as conn:
            with pytest.raises(amqp.exceptions.AccessRefused):
                topology.declare(conn.channel(), *d.topology.for_host("b"))

        # the network user's events flow to the right host
        ok = event("a")
        publish(d.url(d.network), d.topology.ingress_exchange_name,
                "instance.network-vif-plugged", contract.encode(ok), message_id=ok.id)
        [m] = collect(d.url(d.compute_prefix + "a"), d.topology.host_queue_name("a"), 1)
        assert contract.decode(m.body).id == ok.id
        assert m.headers[contract.HEADER_PUBLISHER] == d.network

        # host A cannot read host B's queue
        with pytest.raises(amqp.exceptions.AccessRefused):
            collect(d.url(d.compute_prefix + "a"), d.topology.host_queue_name("b"), 1,
                    timeout=2)
        # host A cannot publish instance events at all
        with pytest.raises(amqp.exceptions.AccessRefused):
            forged = event("b")
            publish(d.url(d.compute_prefix + "a"), d.topology.ingress_exchange_name,
                    "instance.network-vif-plugged", contract.encode(forged))
        # the network user cannot claim to be the router
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            publish(d.url(d.network), d.topology.ingress_exchange_name,
                    "instance.network-vif-plugged", contract.encode(event("a")),
                    user_id=d.router_user)
        # nor publish other routing keys than instance.* (topic permission)
        with pytest.raises(amqp.exceptions.AccessRefused):
            publish(d.url(d.network), d.topology.ingress_exchange_name,
                    "admin.anything", b"{}")

        # an allowed-to-write but unlisted publisher is dead-lettered `forbidden`
        rogue = event("a")
        publish(d.url(d.rogue), d.topology.ingress_exchange_name,
                "instance.network-vif-plugged", contract.encode(rogue), message_id=rogue.id)
        # ... also when it claims, in the header the router uses for its own
        # retries, to speak for the network user
        forged = event("a")
        publish(d.url(d.rogue), d.topology.ingress_exchange_name,
                "instance.network-vif-plugged", contract.encode(forged),
                message_id=forged.id, headers={contract.HEADER_PUBLISHER: d.network})
        dead = collect(d.url(d.router_user), d.topology.dead_letter_queue_name, 2)
        assert [m.headers[contract.HEADER_REASON] for m in dead] == \
            [contract.REASON_FORBIDDEN] * 2
        assert {contract.decode(m.body).id for m in dead} == {rogue.id, forged.id}

        # host A cannot move host B's instances: its lifecycle claims are ignored
        server = str(uuid.uuid4())
        claim = contract.envelope(contract.LifecycleEvent(server, "b", "STARTED", 0, 0, 1),
                                  "agent")
        honest = contract.envelope(contract.LifecycleEvent(server, "a", "STARTED", 0, 0, 2),
                                   "agent")
        for env in (claim, honest):
            publish(d.url(d.compute_prefix + "a"), d.topology.lifecycle_exchange_name, "",
                    contract.encode(env), mandatory=False)
        wait_for(lambda: router.service.placement.hosts_for(server), what="placement")
        assert router.service.placement.hosts_for(server) == ("a",)
        assert router.service.stats["forbidden:lifecycle-event"] == 1
    finally:
        router.stop()


def test_a_password_that_looks_like_an_option_is_applied(secure):
    """rabbitmqctl took a password beginning with '-' for an option (a
    random x509 user's password did in a CI run): `--` ends the options."""
    d = secure
    d.password = "-" + d.password
    out = d.evrouter("permissions", "--apply", "--vhost", d.vhost, "--bus-prefix", d.prefix,
                     "--network-user", d.network, "--router-user", d.router_user,
                     "--compute-user-prefix", d.compute_prefix, "--host", "a",
                     f"--password={d.password}")    # as a shell user writes it
    assert out.returncode == 0, out.stdout + out.stderr
    with kombu.Connection(d.url(d.network)) as conn:
        conn.connect()
        assert conn.connected
