"""TLS settings of a service: what to verify, how to log in, who that makes us.

Pure apart from reading certificate files: the transport (router/bus/
transport.py) builds the TLS context from these, connection.py decides
whether a URL gets them. Every error names the option as written
(``[bus] ssl_ca_file``, or ``[evrouter] ...`` in nova.conf and neutron.conf)
and the file.
"""

import dataclasses
import ssl
import urllib.parse

# The key of kombu's ssl dict under which connection.py passes these
# settings along to the transport (not a TLS option: for error messages and
# user names; it survives kombu's clone() with the dict).
SSL_SETTINGS_KEY = "evrouter_tls"

LOGIN_PASSWORD = "password"
LOGIN_EXTERNAL = "external"
# How the broker names the user of a client certificate: RabbitMQ's
# ssl_cert_login_from, and for a subjectAltName its ssl_cert_login_san_type
# and ssl_cert_login_san_index. The stdlib decodes these SAN types as text
# (RabbitMQ's ip and other_name are not read here).
CERT_LOGIN_FROM = ("common_name", "subject_alternative_name")
SAN_TYPES = {"dns": "DNS", "email": "email", "uri": "URI"}


@dataclasses.dataclass(frozen=True)
class TLS:
    """How a service speaks TLS to the broker, and how it logs in.

    login "external": the SASL EXTERNAL mechanism; the broker maps the
    client certificate to the broker user (rabbitmq_auth_mechanism_ssl:
    its CN, or with ssl_cert_login_from = subject_alternative_name the
    san_index-th subjectAltName of san_type), and the transport URL needs
    no password. cert_login_from/san_type/san_index say the same as the
    broker's settings so the service knows its own user (the user_id it
    puts on what it publishes). Holds file paths only, never their
    contents. enabled: TLS was asked for in so many words ([bus] ssl); the
    options also apply to an amqps:// URL without it. group: where the
    options were written, for error messages ("bus", or "evrouter" in
    nova.conf and neutron.conf).
    """

    ca_file: str = None
    cert_file: str = None
    key_file: str = None
    login: str = LOGIN_PASSWORD
    enabled: bool = True
    cert_login_from: str = "common_name"
    san_type: str = "dns"
    san_index: int = 0
    group: str = "bus"

    def __post_init__(self):
        if self.login not in (LOGIN_PASSWORD, LOGIN_EXTERNAL):
            raise ValueError(f"[{self.group}] ssl_login: unknown value {self.login!r}")
        if self.login == LOGIN_EXTERNAL and not self.cert_file:
            raise ValueError(f"[{self.group}] ssl_login = external needs a client "
                             f"certificate ([{self.group}] ssl_cert_file)")
        if self.cert_login_from not in CERT_LOGIN_FROM:
            raise ValueError(f"[{self.group}] ssl_cert_login_from: unknown value "
                             f"{self.cert_login_from!r}")
        if self.san_type not in SAN_TYPES:
            raise ValueError(f"[{self.group}] ssl_cert_login_san_type: "
                             f"{self.san_type!r} is not one of {', '.join(SAN_TYPES)}")

    def option(self, name):
        return f"[{self.group}] {name}"

    def files(self):
        """(option, path) of every file these settings name."""
        return [(self.option(name), path) for name, path in (
            ("ssl_ca_file", self.ca_file), ("ssl_cert_file", self.cert_file),
            ("ssl_key_file", self.key_file)) if path]

    def check_files(self):
        """Raise ValueError naming the option and the file if one cannot be
        read; for entry points, so a typo is one line at start-up."""
        for option, path in self.files():
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"{option} = {path}: "
                                 f"{exc.strerror or exc}") from None

    def kombu_ssl(self):
        """kombu's ssl argument, as transport.tls_context takes it."""
        options = {"ca_certs": self.ca_file, "certfile": self.cert_file,
                   "keyfile": self.key_file}
        options = {k: v for k, v in options.items() if v}
        # Not a TLS option: these settings themselves, which survive
        # kombu's clone() with the dict, for tls_context's error messages
        # and user_of's certificate mapping.
        options[SSL_SETTINGS_KEY] = self
        return options

    @property
    def login_method(self):
        return "EXTERNAL" if self.login == LOGIN_EXTERNAL else None

    def certificate_user(self):
        """The broker user EXTERNAL logs in as (None: password login)."""
        if self.login != LOGIN_EXTERNAL:
            return None
        return certificate_user(self.cert_file, self.cert_login_from,
                                self.san_type, self.san_index,
                                option=self.option("ssl_cert_file"))


def ssl_options(enabled, ca_file=None, cert_file=None, key_file=None,
                login=LOGIN_PASSWORD, *, cert_login_from="common_name",
                san_type="dns", san_index=0, group="bus"):
    """TLS options as a TLS, or False when none is set and TLS is off.

    With TLS off ([bus] ssl = false) but options set, the TLS is kept,
    disabled: an amqps:// URL still uses every one of them, and a plain
    URL with them is refused by tls_for (never silently ignored).
    """
    given = ca_file or cert_file or key_file or login != LOGIN_PASSWORD
    if not enabled and not given:
        return False
    return TLS(ca_file or None, cert_file or None, key_file or None, login,
               bool(enabled), cert_login_from, san_type, int(san_index), group)


def tls_for(transport_url, tls):
    """The TLS a connection to transport_url uses, or False for plain TCP.

    An amqps:// URL means TLS whatever the options say (then the system's
    CAs unless a TLS names one); TLS options given for a plain URL without
    ssl = true are a mistake said in one line, not ignored.
    """
    if urllib.parse.urlsplit(transport_url).scheme == "memory":
        return False
    if tls and not isinstance(tls, TLS):
        tls = TLS()         # ssl=True, or a dict from older callers
    if urllib.parse.urlsplit(transport_url).scheme == "amqps":
        return tls or TLS()
    if not tls:
        return False
    if not tls.enabled:
        set_ = ", ".join(option for option, _ in tls.files()) or tls.option("ssl_login")
        raise ValueError(f"{set_} set but TLS is off: set {tls.option('ssl')} = true "
                         f"or use an amqps:// URL")
    return tls


def certificate_user(cert_file, login_from="common_name", san_type="dns",
                     san_index=0, *, option="[bus] ssl_cert_file"):
    """The broker user a certificate file logs in as with EXTERNAL: its CN,
    or the san_index-th subjectAltName of san_type, as RabbitMQ's
    ssl_cert_login_from says."""
    # The stdlib's only certificate decoder that needs no connection; it
    # has served CPython's own test suite since 2.7.
    try:
        decoded = ssl._ssl._test_decode_cert(cert_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{option} = {cert_file}: cannot read the "
                         f"certificate ({getattr(exc, 'strerror', None) or exc})") from None
    if login_from == "subject_alternative_name":
        wanted = SAN_TYPES[san_type]
        names = [value for kind, value in decoded.get("subjectAltName", ())
                 if kind == wanted]
        if san_index < len(names):
            return names[san_index]
        raise ValueError(f"{option} = {cert_file}: no subjectAltName {san_type} "
                         f"number {san_index} (it has {len(names)}), which "
                         f"ssl_cert_login_from = subject_alternative_name needs")
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise ValueError(f"{option} = {cert_file}: the certificate has no common name "
                     f"(if the broker maps a subjectAltName, set ssl_cert_login_from "
                     f"= subject_alternative_name)")


# --- the client's TLS context and what its failures mean ----------------------

class BrokerCertificateRefused(ssl.SSLCertVerificationError):
    """The broker's certificate did not verify: wrong CA, expired, wrong name.

    Still an OSError, so services keep retrying (an operator may fix the CA
    file or the DNS name); the message says which broker and why.
    """

    def __str__(self):
        # SSLError's own __str__ shows the args tuple
        return str(self.args[0]) if self.args else super().__str__()


class BrokerTLSError(ssl.SSLError):
    """TLS with the broker failed for a reason said in one line: a file of
    ours that cannot be read, a port that does not speak TLS, a client
    certificate the broker refused. An OSError, so services keep retrying."""

    def __str__(self):
        return str(self.args[0]) if self.args else super().__str__()


def option_of(sslopts, name):
    settings = sslopts.get(SSL_SETTINGS_KEY)
    return f"[{getattr(settings, 'group', 'bus')}] {name}"


def tls_context(ca_certs=None, certfile=None, keyfile=None, **others):
    """The client TLS context: TLS 1.2+, CA-verified, host name checked.

    ca_certs absent: the system's trust store. certfile/keyfile: the client
    certificate (x509 identity with the EXTERNAL mechanism). Options py-amqp
    would accept but that could only weaken this (cert_reqs, ssl_version)
    are ignored on purpose. A file that cannot be loaded is a BrokerTLSError
    naming the option and the file.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=ca_certs)
    except (OSError, ValueError) as exc:
        raise BrokerTLSError(f"TLS: {option_of(others, 'ssl_ca_file')} = {ca_certs}: "
                             f"{_why(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ValueError) as exc:
            if keyfile and _unreadable(keyfile):
                option, path = "ssl_key_file", keyfile
            else:
                option, path = "ssl_cert_file", certfile
            raise BrokerTLSError(f"TLS: {option_of(others, option)} = {path}: "
                                 f"{_why(exc)}") from None
    return context


def _unreadable(path):
    try:
        with open(path, "rb"):
            return False
    except OSError:
        return True


def _why(exc):
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or str(exc)).lower().replace("_", " ")
    return exc.strerror or str(exc)


# What a handshake failure means, when its reason says. A TLS client on a
# plain AMQP port reads the broker's "AMQP..." protocol header as a TLS
# record: wrong version number (a record layer failure on some OpenSSLs).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                      "UNKNOWN_PROTOCOL", "PACKET_LENGTH_TOO_LONG"})
# The broker's alerts about our certificate (or the lack of one).
_CLIENT_CERT = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_HANDSHAKE_FAILURE",
    "TLSV1_ALERT_ACCESS_DENIED", "SSLV3_ALERT_CERTIFICATE_REVOKED"})


def explain(exc, host, port, sslopts):
    """A BrokerTLSError saying what an SSLError from the broker means, or
    None when its reason is not one of those above."""
    reason = getattr(exc, "reason", None) or ""
    what = reason.lower().replace("_", " ")
    where = f"broker {host}:{port}"
    if reason in _NOT_TLS:
        return BrokerTLSError(
            f"TLS: {where} did not answer in TLS ({what}): is {port} its plain "
            f"AMQP port? {option_of(sslopts, 'ssl')} = true and amqps:// need its "
            f"TLS port (5671 by default)")
    cert = sslopts.get("certfile")
    mine = (f"the client certificate {cert}" if cert else
            f"a client without a certificate ({option_of(sslopts, 'ssl_cert_file')} "
            f"is not set)")
    if reason in _CLIENT_CERT:
        return BrokerTLSError(f"TLS: {where} refused {mine} ({what}): it accepts "
                              f"client certificates signed by a CA it trusts")
    if isinstance(exc, ssl.SSLEOFError):
        # The alert that said why was lost with the connection (TLS 1.3
        # sends it after our side already finished the handshake).
        return BrokerTLSError(f"TLS: {where} closed the connection in the TLS "
                              f"handshake ({exc.strerror or what or 'EOF'}): it may "
                              f"have refused {mine}")
    return None
