"""Every service over TLS, compute hosts with x509 identities (real node).

The node is tls1@localhost (tests/tls/conftest.py): its certificate is
signed by a throwaway CA and names localhost and 127.0.0.1. The router and
the network side log in with passwords over TLS; compute hosts a and b
with their client certificates (EXTERNAL, CN = their broker user), with
no password anywhere on them.
"""

import json
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import amqp
import kombu
import pytest

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import connection, contract
from router.bus.publishing import BlockingPublisher
from router.bus.transport import BrokerCertificateRefused
from tests.conftest import wait_for

pytestmark = [pytest.mark.tls, pytest.mark.timeout(150)]

# libvirt's test:///default driver always has this one running domain
TEST_DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """An evrouter service as its own process; output kept for greps."""

    def __init__(self, tmp_path, name, *args):
        self.log = tmp_path / f"{name}.log"
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "router.cli", *args],
                                     stdout=self._file, stderr=subprocess.STDOUT)

    def output(self):
        return self.log.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._file.close()
        return self.proc.returncode


def get(port, path):
    """(status, body) of the ops endpoint."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return None, ""


def start_router(d, tmp_path, *, ca=None, name="router"):
    port = free_port()
    proc = Process(tmp_path, name, "router", "--transport-url", d.url(d.router_user),
                   *d.node.flags(ca=ca), "--bus-prefix", d.prefix,
                   "--router-ops_listen", f"127.0.0.1:{port}",
                   "--router-allowed_publishers", d.network,
                   "--router-compute_user_prefix", d.compute_prefix,
                   "--router-name", name)
    return proc, port


def secret_fragments(d):
    """What must never be printed: the password and every private key line."""
    fragments = [d.password]
    for key in Path(d.node.certs).glob("*.key"):
        fragments += [line for line in key.read_text().splitlines()
                      if len(line) > 16 and "PRIVATE KEY" not in line]
    return fragments


def assert_no_secrets(d, texts):
    fragments = secret_fragments(d)
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        for fragment in fragments:
            assert fragment not in text, f"a secret appears in {where}"


def test_one_event_end_to_end_with_every_service_on_tls(deployment, tmp_path, caplog):
    d = deployment
    printed = {}
    printed["permissions --apply"] = d.applied.stdout + d.applied.stderr
    # x509 hosts have no password at all
    users = d.node.ctl("list_users", "--formatter", "json").stdout
    assert d.compute("a") in users
    for user in (d.compute("a"), d.compute("b")):
        done = subprocess.run(["rabbitmqctl", "-q", "-n", d.node.node,
                               "authenticate_user", user, ""], capture_output=True)
        assert done.returncode != 0

    # The central topology as the router user (password over TLS); host a's
    # part as host a, by certificate.
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", d.url(d.router_user), *d.node.flags())
    printed["topology (router)"] = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout + out.stderr
    assert "declared on amqps://" in out.stdout
    for host in ("a", "b"):
        out = d.evrouter("topology", "--declare", "--host", host,
                         "--bus-prefix", d.prefix, "--transport-url", d.url(),
                         *d.node.flags(d.compute(host), external=True))
        printed[f"topology (host {host})"] = out.stdout + out.stderr
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{d.topology.host_queue_name(host)}: declared" in out.stdout

    router, router_port = start_router(d, tmp_path)
    agent_port = free_port()
    agent = Process(tmp_path, "agent", "agent", "--libvirt-uri", "test:///default",
                    "--host", "a", "--transport-url", d.url(),
                    *d.node.flags(d.compute("a"), external=True),
                    "--bus-prefix", d.prefix, "--agent-stopped_delay", "0.5",
                    "--agent-ops_listen", f"127.0.0.1:{agent_port}",
                    "--agent-resync_from", d.router_user)
    events = InstanceEvents()
    consumer = HostConsumer(HostConsumerSettings(
        host="a", transport_url=d.url(), topology=d.topology,
        ssl=d.node.x509(d.compute("a"))), events.deliver)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        assert consumer.ready.wait(20), consumer.health()
        wait_for(lambda: get(router_port, "/healthz")[0] == 200, 30,
                 what="router healthy over TLS")
        wait_for(lambda: get(agent_port, "/healthz")[0] == 200, 30,
                 what="agent healthy over TLS")

        # The agent (host a, by certificate) tells the router where the test
        # driver's domain runs; an event without a host hint, published by
        # `evrouter publish` over TLS, reaches host a's waiter.
        port_id = str(uuid.uuid4())
        with events.wait_for_instance_event(
                TEST_DOMAIN, [(contract.VIF_PLUGGED, port_id)], timeout=30):
            out = d.evrouter("publish", contract.VIF_PLUGGED, "--server", TEST_DOMAIN,
                             "--tag", port_id, "--transport-url", d.url(d.network),
                             *d.node.flags(), "--bus-prefix", d.prefix)
            printed["publish"] = out.stdout + out.stderr
            assert out.returncode == 0, out.stdout + out.stderr

        # Host b's certificate may not speak for host a...
        forged = str(uuid.uuid4())
        with connection.connection(d.url(), ssl_opts=d.node.x509(d.compute("b"))) as conn:
            connection.connect_once(conn)
            assert connection.user_of(conn) == d.compute("b")
            env = contract.envelope(contract.LifecycleEvent(
                forged, "a", "STARTED", 2, 0, 1), "forger")
            BlockingPublisher(conn, user_id=connection.user_of(conn)).publish(
                d.topology.lifecycle_exchange_name, "", contract.encode(env),
                mandatory=False)
        wait_for(lambda: "may not speak for host a" in router.output()
                 and d.compute("b") in router.output(), 15,
                 what="the router ignoring b's claim for host a")
        # ...nor claim to be host a's user (the broker checks user_id)...
        with connection.connection(d.url(), ssl_opts=d.node.x509(d.compute("b"))) as conn:
            connection.connect_once(conn)
            with pytest.raises(amqp.exceptions.PreconditionFailed):
                BlockingPublisher(conn, user_id=d.compute("a")).publish(
                    d.topology.lifecycle_exchange_name, "", contract.encode(env),
                    mandatory=False)
        # ...nor read host a's queues.
        for queue in (d.topology.host_queue_name("a"),
                      d.topology.agent_control_queue_name("a", "0" * 32)):
            with connection.connection(
                    d.url(), ssl_opts=d.node.x509(d.compute("b"))) as conn:
                connection.connect_once(conn)
                with pytest.raises(amqp.exceptions.AccessRefused):
                    conn.channel().basic_get(queue)
        # A certificate with no broker user behind it logs in as nobody.
        with connection.connection(d.url(), ssl_opts=d.node.x509("evt-nobody")) as conn:
            with pytest.raises(amqp.exceptions.AccessRefused):
                connection.connect_once(conn)

        printed["router /metrics"] = get(router_port, "/metrics")[1]
        printed["agent /metrics"] = get(agent_port, "/metrics")[1]
        printed["router /healthz"] = get(router_port, "/healthz")[1]
        assert "evrouter_router_events_out" in printed["router /metrics"]
    finally:
        consumer.stop()
        thread.join(15)
        assert router.stop() == 0
        assert agent.stop() == 0
    printed["router log"] = router.output()
    printed["agent log"] = agent.output()
    printed["in-process logs"] = caplog.text
    for command in ("router", "agent", "publish", "topology", "permissions",
                    "network-adapter"):
        out = d.evrouter(command, "--help", *d.node.flags(d.compute("a")),
                         "--transport-url", d.url(d.network))
        printed[f"{command} --help"] = out.stdout + out.stderr
        assert out.returncode == 0, out.stderr
    assert "consuming" in printed["router log"]
    assert_no_secrets(d, printed)
    (tmp_path / "printed.json").write_text(json.dumps(printed))


def test_a_wrong_ca_is_refused_with_a_clear_message(deployment, tmp_path):
    d = deployment
    with connection.connection(d.url(d.router_user),
                               ssl_opts=d.node.tls(ca=d.node.other_ca)) as conn:
        with pytest.raises(BrokerCertificateRefused) as caught:
            connection.connect_once(conn)
    message = str(caught.value)
    assert f"certificate of broker localhost:{d.node.port} was refused" in message
    assert "self-signed certificate in certificate chain" in message
    assert "ssl_ca_file" in message

    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", d.url(d.router_user),
                     *d.node.flags(ca=d.node.other_ca))
    assert out.returncode == 1
    assert f"certificate of broker localhost:{d.node.port} was refused" in out.stderr
    assert d.password not in out.stdout + out.stderr

    # A service keeps trying, says why in its log, and is not healthy.
    router, port = start_router(d, tmp_path, ca=d.node.other_ca)
    try:
        wait_for(lambda: "was refused" in router.output(), 20,
                 what="the router's log saying why it cannot connect")
        status, body = get(port, "/healthz")
        assert status == 503, body
    finally:
        router.stop()
    assert d.password not in router.output()


def _name_not_in_certificate():
    """A name of this machine that resolves to 127.0.0.1 but that the
    server's certificate does not name (it names localhost and 127.0.0.1)."""
    for name in (socket.gethostname(), "localhost.localdomain"):
        try:
            if name != "localhost" and socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    return None


def test_a_wrong_name_is_refused_with_a_clear_message(deployment):
    d = deployment
    name = _name_not_in_certificate()
    if name is None:
        pytest.skip("no other name of this machine resolves to 127.0.0.1")
    url = d.node.url(d.router_user, d.password, d.vhost, host=name)
    with connection.connection(url, ssl_opts=d.node.tls()) as conn:
        with pytest.raises(BrokerCertificateRefused) as caught:
            connection.connect_once(conn)
    assert f"Hostname mismatch, certificate is not valid for '{name}'" in \
        str(caught.value)
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", url, *d.node.flags())
    assert out.returncode == 1
    assert "Hostname mismatch" in out.stderr and d.password not in out.stderr


def test_tls_never_falls_back_to_plain_tcp(tls_node):
    # TLS asked for (amqps://, or [bus] ssl) against the plain listener:
    # the handshake fails, nothing is sent in clear.
    plain = tls_node.plain_port
    for url, tls in ((f"amqps://guest:guest@127.0.0.1:{plain}/", False),
                     (f"rabbit://guest:guest@127.0.0.1:{plain}/", tls_node.tls())):
        with connection.connection(url, ssl_opts=tls) as conn:
            with pytest.raises(OSError):
                connection.connect_once(conn)
            assert not conn.connected
    # amqps:// alone means TLS, with the system's CAs: our CA is not there.
    with connection.connection(f"amqps://guest:guest@localhost:{tls_node.port}/") as conn:
        with pytest.raises(BrokerCertificateRefused):
            connection.connect_once(conn)


def test_an_expired_broker_certificate_is_refused(tls_node, tmp_path):
    """Signed by the trusted CA, names 127.0.0.1, expired in 2020: a bare
    TLS server is enough, the client refuses it in the handshake."""
    certs = Path(tls_node.certs)
    (tmp_path / "index.txt").write_text("")
    (tmp_path / "serial").write_text("1000\n")
    (tmp_path / "ca.cnf").write_text(
        "[ca]\ndefault_ca = d\n[d]\n"
        f"database = {tmp_path}/index.txt\nnew_certs_dir = {tmp_path}\n"
        f"serial = {tmp_path}/serial\ndefault_md = sha256\npolicy = p\n"
        "copy_extensions = copy\n[p]\ncommonName = supplied\n")
    (tmp_path / "ext").write_text("subjectAltName = IP:127.0.0.1\n")
    key, csr, cert = (str(tmp_path / n) for n in ("old.key", "old.csr", "old.pem"))
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "ca", "-batch", "-config", str(tmp_path / "ca.cnf"),
                    "-cert", str(certs / "ca.pem"), "-keyfile", str(certs / "ca.key"),
                    "-in", csr, "-out", cert, "-startdate", "20200101000000Z",
                    "-enddate", "20200102000000Z", "-extfile", str(tmp_path / "ext")],
                   check=True, capture_output=True)

    import ssl
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        try:
            sock, _ = listener.accept()
            with sock:
                try:
                    server_ctx.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    pass
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with connection.connection(f"rabbit://guest:guest@127.0.0.1:{port}/",
                                   ssl_opts=tls_node.tls()) as conn:
            with pytest.raises(BrokerCertificateRefused) as caught:
                connection.connect_once(conn)
        assert "certificate has expired" in str(caught.value)
    finally:
        listener.close()
        thread.join(5)


def test_password_users_and_x509_hosts_side_by_side(deployment):
    """The EXTERNAL identity is the certificate's, not the URL's: a URL
    naming host a's user with b's certificate is still host b."""
    d = deployment
    url = d.node.url(d.compute("a"), "anything", d.vhost)
    with connection.connection(url, ssl_opts=d.node.x509(d.compute("b"))) as conn:
        connection.connect_once(conn)
        assert connection.user_of(conn) == d.compute("b")
        assert connection.display(conn).startswith(f"amqps://localhost:{d.node.port}/")
        assert "anything" not in connection.display(conn)
    # PLAIN with a password still works over TLS for the password users
    with connection.connection(d.url(d.network), ssl_opts=d.node.tls()) as conn:
        connection.connect_once(conn)
        assert connection.user_of(conn) == d.network
        assert conn.connection.transport.sock.version() in ("TLSv1.2", "TLSv1.3")
    # and kombu's own Connection cannot log in as an x509 host by password
    with kombu.Connection(
            f"amqp://{d.compute('a')}:@127.0.0.1:{d.node.plain_port}/{d.vhost}") as conn:
        with pytest.raises(amqp.exceptions.AccessRefused):
            conn.connect()
