"""The TLS RabbitMQ nodes of tests/tls/rabbitmq-tls.sh and deployments on them.

Used by the `tls` tests' fixtures (tests/tls/conftest.py) and by test
classes that cannot use fixtures (the OpenStack suites: shared_node and
routed_tls_bus).
"""

import atexit
import os
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path

from router.bus import connection, topology

SCRIPT = Path(__file__).with_name("rabbitmq-tls.sh")
# The node's name and ports: EVROUTER_TLS_NODE, EVROUTER_TLS_PORT,
# EVROUTER_TLS_PLAIN_PORT, EVROUTER_TLS_DIST_PORT and EVROUTER_TLS_DIR move
# it (a second checkout's run beside this one).
NODE = os.environ.get("EVROUTER_TLS_NODE", "tls1@localhost")
TLS_PORT = int(os.environ.get("EVROUTER_TLS_PORT", 5695))
PLAIN_PORT = int(os.environ.get("EVROUTER_TLS_PLAIN_PORT", 5694))
DIST_PORT = int(os.environ.get("EVROUTER_TLS_DIST_PORT", 25694))
TLS_DIR = os.environ.get("EVROUTER_TLS_DIR", "/tmp/evrouter-tls")
# The strict node (x509_node): every client shows a certificate, users are
# named by its subjectAltName. EVROUTER_X509_* move it.
X509_NODE = os.environ.get("EVROUTER_X509_NODE", "tls-x509@localhost")
X509_PORT = int(os.environ.get("EVROUTER_X509_PORT", 5723))
X509_PLAIN_PORT = int(os.environ.get("EVROUTER_X509_PLAIN_PORT", 5722))
X509_DIST_PORT = int(os.environ.get("EVROUTER_X509_DIST_PORT", 25722))
X509_DIR = os.environ.get("EVROUTER_X509_DIR", "/tmp/evrouter-tls-x509")


class TLSNode:
    """A node of rabbitmq-tls.sh: its CA, certificates, URLs and rabbitmqctl.

    strict: fail_if_no_peer_cert = true, and the broker user of a client
    certificate is its first DNS subjectAltName (client certificates here
    then carry the user name there only, no CN).
    """

    def __init__(self, node=NODE, port=TLS_PORT, plain_port=PLAIN_PORT,
                 dist_port=DIST_PORT, base=TLS_DIR, strict=False):
        self.node, self.port, self.plain_port = node, port, plain_port
        self.strict = strict
        self.env = dict(os.environ, EVROUTER_TLS_NODE=node, EVROUTER_TLS_PORT=str(port),
                        EVROUTER_TLS_PLAIN_PORT=str(plain_port),
                        EVROUTER_TLS_DIST_PORT=str(dist_port), EVROUTER_TLS_DIR=base,
                        EVROUTER_TLS_STRICT="1" if strict else "0")
        self.dir = Path(base)
        self.certs = self.dir / "certs"
        self.ca = str(self.certs / "ca.pem")
        self.other_ca = str(self.certs / "other-ca.pem")
        self.kept = True

    def script(self, *args, timeout=180):
        return subprocess.run(["bash", str(SCRIPT), *map(str, args)], check=True,
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def start(self):
        """Start the node unless it runs; a node this started is thrown
        away whole (users, vhosts, keys) by stop()."""
        running = "down" not in self.script("status").stdout
        t0 = time.monotonic()
        self.script("start")
        print(f"\ntls node {self.node}: ready in {time.monotonic() - t0:.1f}s "
              f"({'already running' if running else 'started'})")
        self.kept = running or bool(os.environ.get("EVROUTER_TLS_KEEP"))
        return self

    def stop(self):
        if not self.kept:
            self.script("stop", timeout=120)

    def client(self, name):
        """(certificate, key) paths of a client certificate naming user
        `name` the way this node maps certificates to users."""
        cert, key = self.certs / f"{name}.pem", self.certs / f"{name}.key"
        if not cert.exists():
            self.script("client-san" if self.strict else "client", name)
        return str(cert), str(key)

    def ctl(self, *args):
        return self.script("ctl", *args, timeout=60)

    def url(self, user=None, password=None, vhost="", host="localhost", port=None):
        auth = f"{user}:{password}@" if user else ""
        return f"rabbit://{auth}{host}:{port or self.port}/{vhost}"

    def login_from(self):
        return "subject_alternative_name" if self.strict else "common_name"

    def tls(self, cert_name=None, *, ca=None, login=connection.LOGIN_PASSWORD, group="bus"):
        cert, key = self.client(cert_name) if cert_name else (None, None)
        return connection.ssl_options(True, ca or self.ca, cert, key, login,
                                      cert_login_from=self.login_from(), group=group)

    def x509(self, user):
        """TLS settings of a service that logs in with its certificate."""
        return self.tls(user, login=connection.LOGIN_EXTERNAL)

    def flags(self, cert_name=None, *, ca=None, external=False):
        """The same as `evrouter` command-line flags."""
        out = ["--bus-ssl", "--bus-ssl_ca_file", ca or self.ca]
        if cert_name:
            cert, key = self.client(cert_name)
            out += ["--bus-ssl_cert_file", cert, "--bus-ssl_key_file", key]
        if external:
            out += ["--bus-ssl_login", "external",
                    "--bus-ssl_cert_login_from", self.login_from()]
        return out


class TLSDeployment:
    """A least-privilege deployment on a TLS node, in a vhost of its own.

    Compute hosts a and b are x509 hosts (EXTERNAL, their certificate names
    their user). The network and router users log in with passwords over
    TLS, or with certificates too when x509_services (no password at all).
    """

    def __init__(self, node, *, x509_services=False):
        tag = uuid.uuid4().hex[:8]
        self.node = node
        self.x509_services = x509_services
        self.vhost = f"evt-tls-{tag}"
        self.password = f"pw-{uuid.uuid4().hex}"
        self.network = f"evt-{tag}-net"
        self.router_user = f"evt-{tag}-router"
        self.compute_prefix = f"evt-{tag}-cmp-"
        self.topology = topology.Topology(prefix=f"evt-{tag}")
        self.prefix = self.topology.prefix
        self.users = [self.network, self.router_user, self.compute("a"),
                      self.compute("b")]

    def compute(self, host):
        return self.compute_prefix + host

    def url(self, user=None):
        """Password users: their URL; x509 users: no user, no password."""
        if user in (self.network, self.router_user) and not self.x509_services:
            return self.node.url(user, self.password, self.vhost)
        return self.node.url(vhost=self.vhost)

    def tls(self, user):
        """The TLS settings `user` connects with: its certificate if it has
        no password, else the CA only."""
        if user in (self.network, self.router_user) and not self.x509_services:
            return self.node.tls()
        return self.node.x509(user)

    def flags(self, user):
        if user in (self.network, self.router_user) and not self.x509_services:
            return self.node.flags()
        return self.node.flags(user, external=True)

    def evrouter(self, *args, timeout=120):
        return subprocess.run([sys.executable, "-m", "router.cli", *args],
                              capture_output=True, text=True, timeout=timeout)

    def apply(self, *hosts):
        """`evrouter permissions --apply` on the node: x509 hosts, the
        network and router users with the password."""
        args = ["permissions", "--apply", "--node", self.node.node, "--vhost",
                self.vhost, "--bus-prefix", self.prefix, "--network-user", self.network,
                "--router-user", self.router_user,
                "--compute-user-prefix", self.compute_prefix, "--x509-hosts",
                "--password", self.password]
        if self.x509_services:
            args.append("--x509-services")
        for host in hosts:
            args += ["--host", host]
        return self.evrouter(*args)

    def cleanup(self):
        subprocess.run(["rabbitmqctl", "-q", "-n", self.node.node, "delete_vhost",
                        self.vhost], capture_output=True)
        for user in self.users:
            subprocess.run(["rabbitmqctl", "-q", "-n", self.node.node, "delete_user",
                            user], capture_output=True)




_shared = {}


def shared_node():
    """The main TLS node for this process: started if it is not running,
    and then stopped when the process exits."""
    if "node" not in _shared:
        node = _shared["node"] = TLSNode().start()
        atexit.register(node.stop)
    return _shared["node"]


def routed_tls_bus(hosts, add_cleanup):
    """tests.conftest.routed_bus on the TLS node, for test classes.

    One least-privilege deployment per process and set of hosts (creating
    users costs a dozen rabbitmqctl calls), every user by certificate: the
    hosts, the router, the network user. Returns (bus, router, deployment):
    the router runs in-process as the router user over TLS; bus.url is guest
    on the node's plain port, for the test's own plumbing (publishing,
    counting, collecting), with that deployment's topology. What earlier
    tests left in the queues is purged.
    """
    import unittest

    from router.routing import Policy
    from tests.conftest import Bus, RunningRouter

    if os.environ.get("EVROUTER_TLS") == "0":
        raise unittest.SkipTest("EVROUTER_TLS=0")
    key = tuple(hosts)
    if key not in _shared:
        node = shared_node()
        d = TLSDeployment(node, x509_services=True)
        applied = d.apply(*hosts)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        atexit.register(d.cleanup)
        node.ctl("set_permissions", "-p", d.vhost, "guest", ".*", ".*", ".*")
        _shared[key] = d
    d = _shared[key]
    bus = Bus(f"amqp://guest:guest@127.0.0.1:{d.node.plain_port}/{d.vhost}")
    bus.topology = d.topology
    add_cleanup(bus.conn.release)
    bus.declare_central()
    for host in hosts:
        bus.declare_host(host)
    channel = bus.channel()
    for queue in (d.topology.router_queue_name, d.topology.dead_letter_queue_name,
                  *(d.topology.host_queue_name(h) for h in hosts)):
        channel.queue_purge(queue)
    router = RunningRouter(types.SimpleNamespace(url=d.url(d.router_user),
                                                 topology=d.topology),
                           ssl=d.tls(d.router_user),
                           policy=Policy(compute_user_prefix=d.compute_prefix))
    add_cleanup(router.stop)
    return bus, router, d
