"""Issue 20 on real TLS nodes: no host speaks for another, and every TLS
mistake is one line that names the option, the file, the broker and why.

`deployment` is a vhost on the main TLS node (x509 hosts a and b, CN
mapping; router and network users with passwords). `strict` is a vhost on
the x509 node (tests/tls/conftest.py): fail_if_no_peer_cert = true, users
named by their certificate's subjectAltName, nobody has a password.
"""

import socket
import ssl
import subprocess
import threading
import uuid

import amqp
import pytest

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from router.bus import connection, contract, topology
from router.bus.publishing import BlockingPublisher
from router.bus.transport import BrokerCertificateRefused, BrokerTLSError
from router.metrics import RouterCollector
from router.routing import Policy
from tests.conftest import RunningRouter, wait_for
from tests.tls.nodes import TLSDeployment
from tests.tls.test_tls import TEST_DOMAIN, Process, free_port, get

pytestmark = [pytest.mark.tls, pytest.mark.timeout(180)]


def connected(d, user):
    conn = connection.connection(d.url(user), ssl_opts=d.tls(user))
    connection.connect_once(conn)
    return conn


def publish(d, user, exchange, env, *, user_id):
    """One message from `user`'s certificate or password, claiming user_id
    (None: no user_id property at all)."""
    with connected(d, user) as conn:
        BlockingPublisher(conn, user_id=user_id).publish(
            exchange, topology.instance_routing_key(env.payload.name)
            if env.kind == contract.INSTANCE_EVENT else "",
            contract.encode(env), message_id=env.id,
            mandatory=env.kind == contract.INSTANCE_EVENT)


def declare(d, user, exchanges_queues):
    with connected(d, user) as conn:
        topology.declare(conn.channel(), *exchanges_queues)


class _Bus:
    def __init__(self, d, user):
        self.url, self.topology = d.url(user), d.topology


def start_host_consumer(d, host):
    events = InstanceEvents()
    consumer = HostConsumer(HostConsumerSettings(
        host=host, transport_url=d.url(d.compute(host)), topology=d.topology,
        ssl=d.tls(d.compute(host))), events.deliver)
    thread = consumer.start()
    assert consumer.ready.wait(20), consumer.health()
    return events, consumer, thread


def test_host_b_cannot_move_host_as_instances_with_any_user_id(deployment):
    """b's certificate claims host a on the lifecycle fanout (an event that
    undefines a's instance, a snapshot that empties a, an announcement) and
    on the control fanout, with no user_id, with a's, with b's. The broker
    refuses a's (user_id is validated) and every control message (only the
    router may write there); the router ignores and counts the rest. a's
    placement stands and a's waiter is still woken for its own instance."""
    d = deployment
    declare(d, d.router_user, d.topology.central())
    declare(d, d.compute("a"), d.topology.for_host("a"))
    router = RunningRouter(_Bus(d, d.router_user), ssl=d.tls(d.router_user),
                           policy=Policy(allowed_publishers=frozenset({d.network}),
                                         compute_user_prefix=d.compute_prefix))
    events, consumer, thread = start_host_consumer(d, "a")
    try:
        server = str(uuid.uuid4())
        publish(d, d.compute("a"), d.topology.lifecycle_exchange_name,
                contract.envelope(contract.LifecycleEvent(
                    server, "a", "STARTED", 2, 0, 1), "agent a"),
                user_id=d.compute("a"))
        placement = router.service.placement
        wait_for(lambda: placement.hosts_for(server) == ("a",), what="a's placement")

        claims = {
            contract.LIFECYCLE_EVENT: contract.LifecycleEvent(
                server, "a", "UNDEFINED", 5, 0, 10**6),
            contract.HOST_SNAPSHOT: contract.HostSnapshot("a", 10**6, ()),
            contract.HOST_ANNOUNCE: contract.HostAnnounce("a", 10**6)}
        for claim in claims.values():
            for user_id in (None, d.compute("b"), d.compute("a")):
                env = contract.envelope(claim, "agent a")
                if user_id == d.compute("a"):
                    with pytest.raises(amqp.exceptions.PreconditionFailed):
                        publish(d, d.compute("b"), d.topology.lifecycle_exchange_name,
                                env, user_id=user_id)
                else:
                    publish(d, d.compute("b"), d.topology.lifecycle_exchange_name,
                            env, user_id=user_id)
            # control: only the router user writes the control fanout
            for user_id in (None, d.compute("b"), d.compute("a")):
                with pytest.raises((amqp.exceptions.AccessRefused,
                                    amqp.exceptions.PreconditionFailed)):
                    publish(d, d.compute("b"), d.topology.control_exchange_name,
                            contract.envelope(contract.ResyncRequest("r"), "router"),
                            user_id=user_id)

        stats = router.service.stats
        wait_for(lambda: all(stats[f"forbidden:{kind}"] == 2 for kind in claims),
                 what="every claim of b for a refused and counted")
        assert placement.hosts_for(server) == ("a",)
        forbidden = {s.labels["kind"]: s.value
                     for family in RouterCollector(router.service).collect()
                     if family.name == "evrouter_forbidden" for s in family.samples}
        assert forbidden == {kind: 2 for kind in claims}

        # a's waiter is still woken for its own instance (no host hint)
        port = str(uuid.uuid4())
        with events.wait_for_instance_event(server, [(contract.VIF_PLUGGED, port)],
                                            timeout=20):
            publish(d, d.network, d.topology.ingress_exchange_name,
                    contract.envelope(contract.InstanceEvent(
                        contract.VIF_PLUGGED, server, port), "neutron"),
                    user_id=d.network)
        # an instance event without a user_id is forbidden, even from the
        # network user (it proves nobody sent it)
        anonymous = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, str(uuid.uuid4()), host="a"), "neutron")
        publish(d, d.network, d.topology.ingress_exchange_name, anonymous, user_id=None)
        wait_for(lambda: stats["dead_lettered:forbidden"] == 1,
                 what="the anonymous instance event dead-lettered forbidden")
    finally:
        consumer.stop()
        thread.join(15)
        router.stop()


def test_a_refused_login_is_one_line_not_a_traceback(deployment):
    d = deployment
    for url, flags, who in (
            (d.node.url(d.router_user, "wrong-password", d.vhost), d.node.flags(),
             f"{d.router_user} (by its password)"),
            (d.url(), d.node.flags("evt-nobody", external=True),
             "evt-nobody (by its certificate)")):
        out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                         "--transport-url", url, *flags)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stdout + out.stderr
        assert "CRITICAL" not in out.stdout + out.stderr
        [line] = out.stderr.strip().splitlines()
        assert line.startswith("evrouter: the broker at amqps://") and \
            f"localhost:{d.node.port}/{d.vhost} refused the login of {who}: " \
            "ACCESS_REFUSED" in line, line
        assert "wrong-password" not in out.stderr


def test_tls_options_without_ssl_true_apply_to_an_amqps_url(deployment):
    d = deployment
    url = d.url(d.router_user).replace("rabbit://", "amqps://")
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", url, "--bus-ssl_ca_file", d.node.ca)
    assert out.returncode == 0, out.stdout + out.stderr
    # the same options on a plain URL: said, not ignored
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", d.url(d.router_user),
                     "--bus-ssl_ca_file", d.node.ca)
    assert out.returncode == 2
    assert out.stderr == ("evrouter: [bus] ssl_ca_file set but TLS is off: set "
                          "[bus] ssl = true or use an amqps:// URL\n")


def test_a_missing_file_or_a_plain_port_is_one_line(deployment, tmp_path):
    d = deployment
    missing = str(tmp_path / "ca.pem")
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", d.url(d.router_user), "--bus-ssl",
                     "--bus-ssl_ca_file", missing)
    assert (out.returncode, out.stderr) == (
        2, f"evrouter: [bus] ssl_ca_file = {missing}: No such file or directory\n")

    plain = d.node.url(d.router_user, d.password, d.vhost, port=d.node.plain_port)
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", plain, *d.node.flags())
    assert out.returncode == 1
    [line] = out.stderr.strip().splitlines()
    assert f"broker localhost:{d.node.plain_port} did not answer in TLS (wrong version " \
        f"number): is {d.node.plain_port} its plain AMQP port? [bus] ssl = true and " \
        f"amqps:// need its TLS port" in line, line
    # a service keeps retrying: the error is an OSError
    with connection.connection(plain, ssl_opts=d.node.tls()) as conn:
        with pytest.raises(BrokerTLSError):
            connection.connect_once(conn)


def test_a_certificate_naming_localhost_only_is_checked_against_localhost(tls_node,
                                                                           tmp_path):
    """kombu connects to 127.0.0.1 when the URL says localhost; the name
    checked (and sent as SNI) must stay localhost."""
    certs = tls_node.certs
    key, csr, cert = (str(tmp_path / n) for n in ("s.key", "s.csr", "s.pem"))
    (tmp_path / "ext").write_text("subjectAltName = DNS:localhost\n")
    subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", str(certs / "ca.pem"),
                    "-CAkey", str(certs / "ca.key"), "-CAcreateserial", "-days", "1",
                    "-extfile", str(tmp_path / "ext"), "-out", cert],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        try:
            sock, _ = listener.accept()
            with sock, server_ctx.wrap_socket(sock, server_side=True):
                pass        # handshake done; no AMQP here
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with connection.connection(f"rabbit://guest:guest@localhost:{port}/",
                                   ssl_opts=tls_node.tls()) as conn:
            with pytest.raises(OSError) as caught:
                connection.connect_once(conn)
        assert not isinstance(caught.value, BrokerCertificateRefused), caught.value
        assert names == ["localhost"]
    finally:
        listener.close()
        thread.join(5)


# --- every service by certificate, users named by subjectAltName -------------

@pytest.fixture(scope="module")
def strict(x509_node):
    d = TLSDeployment(x509_node, x509_services=True)
    d.applied = d.apply("a", "b")
    assert d.applied.returncode == 0, d.applied.stdout + d.applied.stderr
    try:
        yield d
    finally:
        if x509_node.kept:
            d.cleanup()


def test_every_service_logs_in_by_certificate_with_no_password_anywhere(strict, tmp_path):
    d = strict
    for user in d.users:            # no password at all
        done = subprocess.run(["rabbitmqctl", "-q", "-n", d.node.node,
                               "authenticate_user", user, ""], capture_output=True)
        assert done.returncode != 0
    out = d.evrouter("topology", "--declare", "--bus-prefix", d.prefix,
                     "--transport-url", d.url(d.router_user), *d.flags(d.router_user))
    assert out.returncode == 0, out.stdout + out.stderr
    declare(d, d.compute("a"), d.topology.for_host("a"))
    agent = Process(tmp_path, "agent", "agent", "--libvirt-uri", "test:///default",
                    "--host", "a", "--transport-url", d.url(d.compute("a")),
                    *d.flags(d.compute("a")), "--bus-prefix", d.prefix,
                    "--agent-ops_listen", "", "--agent-resync_from", d.router_user)
    router = consumer = None
    try:
        # The agent's control queue exists before the router asks for snapshots.
        wait_for(lambda: "broker connected" in agent.output(), 30,
                 what="the agent connected")
        ops = free_port()
        router = Process(tmp_path, "router", "router", "--transport-url",
                         d.url(d.router_user), *d.flags(d.router_user), "--bus-prefix",
                         d.prefix, "--router-ops_listen", f"127.0.0.1:{ops}",
                         "--router-allowed_publishers", d.network,
                         "--router-compute_user_prefix", d.compute_prefix)
        events, consumer, thread = start_host_consumer(d, "a")
        wait_for(lambda: get(ops, "/healthz")[0] == 200, 30, what="router healthy")
        # The agent answered the router's resync request: the router's
        # user_id (its certificate's SAN) is the one the broker validated.
        wait_for(lambda: "resync requested by router" in agent.output(), 30,
                 what="the agent answering the router")
        port = str(uuid.uuid4())
        with events.wait_for_instance_event(TEST_DOMAIN, [(contract.VIF_PLUGGED, port)],
                                            timeout=30):
            out = d.evrouter("publish", contract.VIF_PLUGGED, "--server", TEST_DOMAIN,
                             "--tag", port, "--transport-url", d.url(d.network),
                             *d.flags(d.network), "--bus-prefix", d.prefix)
            assert out.returncode == 0, out.stdout + out.stderr
        metrics = get(ops, "/metrics")[1]
        assert "evrouter_forbidden_total" not in metrics.replace(
            "# HELP evrouter_forbidden_total", "").replace(
            "# TYPE evrouter_forbidden_total", "")
    finally:
        if consumer is not None:
            consumer.stop()
            thread.join(15)
        if router is not None:
            assert router.stop() == 0, router.output()
        assert agent.stop() == 0, agent.output()


def test_the_strict_broker_refuses_what_has_no_certificate_or_only_a_cn(strict):
    d = strict
    # no certificate: the TLS listener refuses the client, said in one line
    with connection.connection(d.node.url("guest", "guest", d.vhost),
                               ssl_opts=d.node.tls()) as conn:
        with pytest.raises(BrokerTLSError) as caught:
            connection.connect_once(conn)
    assert f"broker localhost:{d.node.port} " in str(caught.value)
    assert "a client without a certificate ([bus] ssl_cert_file is not set)" in \
        str(caught.value)
    # a CN-only certificate names nobody where users come from the SAN
    cn_only = d.node.certs / "cn-only"
    d.node.script("client", "cn-only")      # CN cn-only, no subjectAltName
    with pytest.raises(ValueError, match="no subjectAltName dns number 0"):
        connection.certificate_user(f"{cn_only}.pem", "subject_alternative_name")
    tls = connection.ssl_options(True, d.node.ca, f"{cn_only}.pem", f"{cn_only}.key",
                                 connection.LOGIN_EXTERNAL)
    with connection.connection(d.url(), ssl_opts=tls) as conn:
        with pytest.raises(amqp.exceptions.AccessRefused):
            connection.connect_once(conn)
