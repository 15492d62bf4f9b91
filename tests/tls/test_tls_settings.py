"""TLS settings, URL mapping and x509 permissions: pure, no broker."""

import ssl

import pytest

from router import options
from router.bus import connection, transport
from router.permissions import Deployment, Throwaway, definitions, plan
from router.service_entry import parse


def test_tls_urls_go_through_evrouters_transport():
    assert connection.kombu_url("amqps://u:p@h:5671//") == "evamqp://u:p@h:5671//"
    assert connection.kombu_url("amqps://u:p@h1:5671//;amqps://u:p@h2:5671//") == \
        "evamqp://u:p@h1:5671//;evamqp://u:p@h2:5671//"
    assert connection.wants_tls("amqps://h/") and not connection.wants_tls("rabbit://h/")


def test_amqps_means_tls_even_without_ssl_options():
    conn = connection.connection("amqps://u:p@h:5671/")
    assert conn.ssl is True and conn.transport_cls == transport.SCHEME
    assert connection.display(conn).startswith("amqps://u:**@h:5671")


def test_ssl_options_become_a_verified_context():
    tls = connection.ssl_options(True, "/ca.pem", "/c.pem", "/k.pem")
    conn = connection.connection("rabbit://u:p@h:5671/", ssl_opts=tls)
    assert conn.ssl == {"ca_certs": "/ca.pem", "certfile": "/c.pem", "keyfile": "/k.pem"}
    assert conn.login_method is None
    ctx = transport.tls_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    # what could weaken it is ignored
    weak = transport.tls_context(cert_reqs=ssl.CERT_NONE, ssl_version=ssl.PROTOCOL_TLS)
    assert weak.verify_mode == ssl.CERT_REQUIRED and weak.check_hostname


def test_external_login_needs_tls_and_a_certificate():
    with pytest.raises(ValueError, match="ssl = true"):
        connection.ssl_options(False, login=connection.LOGIN_EXTERNAL)
    with pytest.raises(ValueError, match="ssl_cert_file"):
        connection.ssl_options(True, "/ca.pem", login=connection.LOGIN_EXTERNAL)
    tls = connection.ssl_options(True, "/ca.pem", "/c.pem", "/k.pem",
                                 connection.LOGIN_EXTERNAL)
    conn = connection.connection("rabbit://h:5671/", ssl_opts=tls)
    assert conn.login_method == "EXTERNAL"
    assert "@" not in connection.display(conn)


def test_bus_options_read_ssl_login():
    conf = parse(["--bus-ssl", "--bus-ssl_ca_file", "/ca.pem", "--bus-ssl_cert_file",
                  "/c.pem", "--bus-ssl_key_file", "/k.pem", "--bus-ssl_login",
                  "external"], "t", "t")
    tls = options.ssl_from(conf)
    assert tls.login_method == "EXTERNAL" and tls.cert_file == "/c.pem"
    assert options.ssl_from(parse([], "t", "t")) is False


def test_permissions_plan_x509_hosts_without_passwords():
    d = Deployment(hosts=("a",), x509_hosts=True)
    commands = plan(d, "secret")
    user = d.compute_user("a")
    add = [c for c in commands if c[:2] == ["add_user", user]]
    assert len(add) == 1 and isinstance(add[0][2], Throwaway)
    assert add[0][2] != "secret"
    assert commands.index(add[0]) + 1 == commands.index(["clear_password", user])
    assert ["add_user", d.network_user, "secret"] in commands
    doc = definitions(d, "secret")
    hashes = {u["name"]: u["password_hash"] for u in doc["users"]}
    assert hashes[user] == "" and hashes[d.router_user]


def test_permissions_printout_never_shows_the_throwaway(capsys):
    from router.permissions_cmd import main
    assert main(["--host", "a", "--x509-hosts", "--node", "t@localhost"]) == 0
    out = capsys.readouterr().out
    assert 'rabbitmqctl -n t@localhost add_user evrouter-compute-a ' \
           '"$(openssl rand -hex 24)"' in out
    assert "rabbitmqctl -n t@localhost clear_password evrouter-compute-a" in out
