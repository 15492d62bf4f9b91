"""A TLS-enabled RabbitMQ node beside the main broker, for the `tls` tests.

The session fixture `tls_node` starts tls1@localhost (AMQPS on
127.0.0.1:5695, plain 5694 for nothing but set-up, distribution 25694) with
tests/tls/rabbitmq-tls.sh, which makes a throwaway CA and certificates with
openssl (about 10 s), and stops it (removing every key) at the end of the
session if it started it. The main broker on 5672 is never touched.

These tests run in the main pytest run: the node starts in about 10 s and
the tests take seconds. EVROUTER_TLS=0 skips them (no RabbitMQ, no openssl,
or no time); EVROUTER_TLS_KEEP=1 leaves the node running for the next run.
"""

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from router.bus import connection, topology

SCRIPT = Path(__file__).with_name("rabbitmq-tls.sh")
NODE = "tls1@localhost"
TLS_PORT = 5695
PLAIN_PORT = 5694


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EVROUTER_TLS") != "0":
        return
    skip = pytest.mark.skip(reason="EVROUTER_TLS=0")
    for item in items:
        if item.get_closest_marker("tls"):
            item.add_marker(skip)


def script(*args, timeout=180):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], check=True,
                          capture_output=True, text=True, timeout=timeout)


class TLSNode:
    """The running node: its CA, certificates, URLs and rabbitmqctl."""

    def __init__(self):
        self.dir = Path(script("dir").stdout.strip())
        self.certs = self.dir / "certs"
        self.ca = str(self.certs / "ca.pem")
        self.other_ca = str(self.certs / "other-ca.pem")

    def client(self, name):
        """(certificate, key) paths of a client certificate with CN name."""
        cert, key = self.certs / f"{name}.pem", self.certs / f"{name}.key"
        if not cert.exists():
            script("client", name)
        return str(cert), str(key)

    def ctl(self, *args):
        return script("ctl", *args, timeout=60)

    @staticmethod
    def url(user=None, password=None, vhost="", host="localhost", port=TLS_PORT):
        auth = f"{user}:{password}@" if user else ""
        return f"rabbit://{auth}{host}:{port}/{vhost}"

    def tls(self, cert_name=None, *, ca=None, login=connection.LOGIN_PASSWORD):
        cert, key = self.client(cert_name) if cert_name else (None, None)
        return connection.ssl_options(True, ca or self.ca, cert, key, login)

    def x509(self, user):
        """TLS settings of a host that logs in with its certificate."""
        return self.tls(user, login=connection.LOGIN_EXTERNAL)

    def flags(self, cert_name=None, *, ca=None, external=False):
        """The same as `evrouter` command-line flags."""
        out = ["--bus-ssl", "--bus-ssl_ca_file", ca or self.ca]
        if cert_name:
            cert, key = self.client(cert_name)
            out += ["--bus-ssl_cert_file", cert, "--bus-ssl_key_file", key]
        if external:
            out += ["--bus-ssl_login", "external"]
        return out


@pytest.fixture(scope="session")
def tls_node():
    for tool in ("rabbitmq-server", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    running = "down" not in script("status").stdout
    t0 = time.monotonic()
    script("start")
    print(f"\ntls node: ready in {time.monotonic() - t0:.1f}s "
          f"({'already running' if running else 'started'})")
    node = TLSNode()
    # A node this session started is thrown away whole (users, vhosts,
    # keys) at its end: nothing to clean up test by test.
    node.kept = running or bool(os.environ.get("EVROUTER_TLS_KEEP"))
    try:
        yield node
    finally:
        if not node.kept:
            script("stop", timeout=120)


class TLSDeployment:
    """A least-privilege deployment on the TLS node, in a vhost of its own.

    The network and router users log in with passwords over TLS; compute
    hosts a and b are x509 hosts (EXTERNAL, certificate CN = their user).
    """

    def __init__(self, node):
        tag = uuid.uuid4().hex[:8]
        self.node = node
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
        if user in (self.network, self.router_user):
            return self.node.url(user, self.password, self.vhost)
        return self.node.url(vhost=self.vhost)

    def evrouter(self, *args, timeout=120):
        return subprocess.run([sys.executable, "-m", "router.cli", *args],
                              capture_output=True, text=True, timeout=timeout)

    def apply(self, *hosts):
        """`evrouter permissions --apply` on the node: x509 hosts, the
        network and router users with the password."""
        args = ["permissions", "--apply", "--node", NODE, "--vhost", self.vhost,
                "--bus-prefix", self.prefix, "--network-user", self.network,
                "--router-user", self.router_user,
                "--compute-user-prefix", self.compute_prefix, "--x509-hosts",
                "--password", self.password]
        for host in hosts:
            args += ["--host", host]
        return self.evrouter(*args)

    def cleanup(self):
        subprocess.run(["rabbitmqctl", "-q", "-n", NODE, "delete_vhost", self.vhost],
                       capture_output=True)
        for user in self.users:
            subprocess.run(["rabbitmqctl", "-q", "-n", NODE, "delete_user", user],
                           capture_output=True)


@pytest.fixture(scope="module")
def deployment(tls_node):
    """One deployment per module (rabbitmqctl takes a second a call), with
    x509 hosts a and b; `applied` is what `evrouter permissions` printed."""
    d = TLSDeployment(tls_node)
    d.applied = d.apply("a", "b")
    assert d.applied.returncode == 0, d.applied.stdout + d.applied.stderr
    try:
        yield d
    finally:
        if tls_node.kept:
            d.cleanup()
