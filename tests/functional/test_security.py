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

    def apply_permissions(self):
        """`evrouter permissions --apply` for hosts a and b, as an operator
        runs it."""
        out = self.evrouter(
            "permissions", "--apply", "--vhost", self.vhost, "--bus-prefix",
            self.prefix, "--network-user", self.network, "--router-user",
            self.router_user, "--compute-user-prefix", self.compute_prefix,
            "--host", "a", "--host", "b", "--password", self.password)
        assert out.returncode == 0, out.stderr

    def start_router(self):
        """The router as the router user, believing the network user only."""
        class Bus:
            url = self.url(self.router_user)
            topology = self.topology
            prefix = self.prefix
        return RunningRouter(Bus, policy=Policy(
            allowed_publishers=frozenset({self.network}),
            compute_user_prefix=self.compute_prefix))

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
    d.apply_permissions()
    # the rogue may write ingress too, but is not an allowed publisher
    subprocess.run(["rabbitmqctl", "add_user", d.rogue, d.password], check=True,
                   capture_output=True)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", d.vhost, d.rogue, "^$",
                    f"^{d.prefix}\\.ingress$", "^$"], check=True, capture_output=True)

    router = d.start_router()
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


def test_a_compromised_host_cannot_take_another_hosts_copies(secure):
    """Every host's copies go through one exchange, <prefix>.hosts, keyed
    by host name. Under the planned permissions (applied with rabbitmqctl,
    as an operator does) host a's user may bind its own queue there with
    its own name and nothing else: not b's name, not a wildcard, not from
    an exchange of its own; it may not publish there, nor delete or
    re-declare it. The router's copies for b reach b alone."""
    d = secure
    d.apply_permissions()
    with kombu.Connection(d.url(d.router_user)) as conn:
        topology.declare(conn.channel(), *d.topology.central())
    for host in ("a", "b"):
        with kombu.Connection(d.url(d.compute_prefix + host)) as conn:
            assert topology.declare(conn.channel(), *d.topology.for_host(host)) == []
    hosts_exchange = d.topology.hosts_exchange_name
    own_queue = d.topology.host_queue_name("a")
    with kombu.Connection(d.url(d.compute_prefix + "a")) as conn:
        attempts = {f"bind key {key!r}": (lambda ch, key=key: ch.queue_bind(
            own_queue, hosts_exchange, key)) for key in ("b", "#", "*", "a.#", "#.b")}
        attempts.update({
            "bind its own exchange with key 'b'": lambda ch: ch.exchange_bind(
                d.topology.host_exchange_name("a"), hosts_exchange, "b"),
            "publish to it": lambda ch: BlockingPublisher(
                conn, user_id=conn.userid).publish(hosts_exchange, "b", b"{}"),
            "delete it": lambda ch: ch.exchange_delete(hosts_exchange),
            "declare it as a fanout": lambda ch: ch.exchange_declare(
                hosts_exchange, "fanout", durable=True),
        })
        allowed = []
        for what, attempt in attempts.items():
            try:
                attempt(conn.channel())
            except (amqp.exceptions.AccessRefused,
                    amqp.exceptions.PreconditionFailed):
                continue
            allowed.append(what)
        assert allowed == [], f"host a's user could {allowed}"

    router = d.start_router()
    try:
        env = event("b")
        publish(d.url(d.network), d.topology.ingress_exchange_name,
                "instance.network-vif-plugged", contract.encode(env), message_id=env.id)
        [m] = collect(d.url(d.compute_prefix + "b"), d.topology.host_queue_name("b"), 1)
        assert contract.decode(m.body).id == env.id
        assert not collect(d.url(d.compute_prefix + "a"), own_queue, 1, timeout=1)
    finally:
        router.stop()
