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
    assert conn.ssl == {connection.SSL_SETTINGS_KEY: connection.TLS()}
    assert conn.transport_cls == transport.SCHEME
    assert connection.display(conn).startswith("amqps://u:**@h:5671")


def test_ssl_options_become_a_verified_context():
    tls = connection.ssl_options(True, "/ca.pem", "/c.pem", "/k.pem")
    conn = connection.connection("rabbit://u:p@h:5671/", ssl_opts=tls)
    assert conn.ssl == {"ca_certs": "/ca.pem", "certfile": "/c.pem", "keyfile": "/k.pem",
                        connection.SSL_SETTINGS_KEY: tls}
    assert conn.login_method is None
    ctx = transport.tls_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    # what could weaken it is ignored
    weak = transport.tls_context(cert_reqs=ssl.CERT_NONE, ssl_version=ssl.PROTOCOL_TLS)
    assert weak.verify_mode == ssl.CERT_REQUIRED and weak.check_hostname


def test_external_login_needs_tls_and_a_certificate():
    with pytest.raises(ValueError, match="ssl = true"):
        connection.tls_for("rabbit://h/", connection.ssl_options(
            False, None, "/c.pem", login=connection.LOGIN_EXTERNAL))
    with pytest.raises(ValueError, match="ssl_cert_file"):
        connection.ssl_options(True, "/ca.pem", login=connection.LOGIN_EXTERNAL)
    tls = connection.ssl_options(True, "/ca.pem", "/c.pem", "/k.pem",
                                 connection.LOGIN_EXTERNAL)
    conn = connection.connection("rabbit://h:5671/", ssl_opts=tls)
    assert conn.login_method == "EXTERNAL"
    assert "@" not in connection.display(conn)


def test_bus_options_read_ssl_login(tmp_path):
    cert = _certificate(tmp_path, "c", "/CN=evrouter-compute-a")
    key = cert[:-len(".pem")] + ".key"
    conf = parse(["--bus-ssl", "--bus-ssl_ca_file", cert, "--bus-ssl_cert_file",
                  cert, "--bus-ssl_key_file", key, "--bus-ssl_login",
                  "external"], "t", "t")
    tls = options.ssl_from(conf)
    assert tls.login_method == "EXTERNAL" and tls.cert_file == cert
    assert tls.certificate_user() == "evrouter-compute-a"
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
    assert 'rabbitmqctl -n t@localhost add_user -- evrouter-compute-a ' \
           '"$(openssl rand -hex 24)"' in out
    assert "rabbitmqctl -n t@localhost clear_password -- evrouter-compute-a" in out


# --- issue 20: options that were silently ignored or said nothing ------------

def test_amqps_uses_the_tls_options_even_without_ssl_true():
    """[bus] ssl_ca_file with an amqps:// URL and no `ssl = true` was
    dropped: the connection then trusted the system's CAs instead."""
    tls = connection.ssl_options(False, "/ca.pem", "/c.pem", "/k.pem",
                                 connection.LOGIN_EXTERNAL)
    conn = connection.connection("amqps://h:5671/", ssl_opts=tls)
    assert conn.ssl["ca_certs"] == "/ca.pem" and conn.ssl["certfile"] == "/c.pem"
    assert conn.login_method == "EXTERNAL"


def test_tls_options_on_a_plain_url_are_refused_in_one_line():
    tls = connection.ssl_options(False, "/etc/ca.pem")
    with pytest.raises(ValueError) as caught:
        connection.connection("rabbit://u:p@h:5672/", ssl_opts=tls)
    message = str(caught.value)
    assert "[bus] ssl_ca_file set but TLS is off" in message
    assert "[bus] ssl = true" in message and "amqps://" in message
    # nothing set, TLS off: plain TCP, as before
    assert connection.ssl_options(False) is False
    # and the Nova/Neutron group is named as such
    tls = connection.ssl_options(False, "/etc/ca.pem", group="evrouter")
    with pytest.raises(ValueError, match=r"\[evrouter\] ssl = true"):
        connection.tls_for("rabbit://h/", tls)


def test_a_missing_or_unreadable_file_names_the_option_and_the_file(tmp_path):
    missing = str(tmp_path / "nope.pem")
    for args, option in (((missing,), "[bus] ssl_ca_file"),
                         ((None, missing, None), "[bus] ssl_cert_file")):
        tls = connection.ssl_options(True, *args)
        with pytest.raises(ValueError) as caught:
            tls.check_files()
        assert str(caught.value) == f"{option} = {missing}: No such file or directory"
    # at connect time too (a file removed while a service runs): an
    # OSError, so services keep retrying, saying which file
    with pytest.raises(transport.BrokerTLSError) as caught:
        transport.tls_context(**connection.ssl_options(True, missing).kombu_ssl())
    assert str(caught.value) == \
        f"TLS: [bus] ssl_ca_file = {missing}: No such file or directory"
    assert isinstance(caught.value, OSError)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(transport.BrokerTLSError, match=r"\[bus\] ssl_cert_file = .*garbage"):
        transport.tls_context(certfile=str(garbage))


def test_an_entry_point_stops_with_one_line_for_a_bad_tls_setting(tmp_path, capsys):
    missing = str(tmp_path / "ca.pem")
    with pytest.raises(SystemExit) as stopped:
        parse(["--bus-ssl", "--bus-ssl_ca_file", missing], "t", "t")
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evrouter: [bus] ssl_ca_file = {missing}: No such file or directory"


def _certificate(tmp_path, name, subject, san=None):
    import subprocess
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", subject]
    if san:
        args += ["-addext", f"subjectAltName = {san}"]
    subprocess.run(args, check=True, capture_output=True)
    return str(cert)


def test_the_user_of_a_certificate_is_read_as_the_broker_maps_it(tmp_path):
    """RabbitMQ maps the CN, or with ssl_cert_login_from =
    subject_alternative_name the n-th SAN of a type; evrouter must name the
    same user, or every user_id it sets is refused (406)."""
    cert = _certificate(tmp_path, "san", "/O=evrouter",
                        "DNS:evrouter-compute-a, DNS:second, email:x@example.org")
    assert connection.certificate_user(cert, "subject_alternative_name") == \
        "evrouter-compute-a"
    assert connection.certificate_user(cert, "subject_alternative_name", "dns", 1) == \
        "second"
    assert connection.certificate_user(cert, "subject_alternative_name", "email") == \
        "x@example.org"
    with pytest.raises(ValueError, match="no common name.*subject_alternative_name"):
        connection.certificate_user(cert)
    with pytest.raises(ValueError, match="no subjectAltName uri number 0"):
        connection.certificate_user(cert, "subject_alternative_name", "uri")
    conf = parse(["--bus-ssl", "--bus-ssl_cert_file", cert, "--bus-ssl_login", "external",
                  "--bus-ssl_cert_login_from", "subject_alternative_name"], "t", "t")
    tls = options.ssl_from(conf)
    conn = connection.connection("rabbit://h:5671/", ssl_opts=tls)
    assert connection.user_of(conn) == "evrouter-compute-a"
    assert connection.user_of(conn.clone()) == "evrouter-compute-a"
