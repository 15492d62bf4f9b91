"""Broker connections: transport URLs, failover and the reconnect policy.

Transport URLs are written the OpenStack way (``rabbit://user:pass@host:5672/vhost``,
several hosts separated by commas) or as kombu URLs; ``memory://`` selects
kombu's in-process transport.

With several hosts (the nodes of a RabbitMQ cluster) every connect attempt
tries each host once, beginning with the one after the host the previous
session used: a service that lost its node goes to the next one at once,
instead of knocking first on the door that just closed. A dead peer is
noticed by the kernel within DEAD_PEER_TIMEOUT (TCP keepalive and
TCP_USER_TIMEOUT, see keepalive_settings), not after two AMQP heartbeats.
"""

import dataclasses
import itertools
import logging
import socket
import ssl
import urllib.parse

import kombu
import tenacity

from router.bus import transport as buffered

LOG = logging.getLogger(__name__)

DEFAULT_URL = "rabbit://guest:guest@127.0.0.1:5672/"


def kombu_url(transport_url):
    """An OpenStack transport URL as a kombu URL (';' separates failover hosts).

    AMQP, with or without TLS, goes through evrouter's transport (scheme
    evamqp): TLS is a connection option there (see connection()), so
    amqps:// becomes evamqp:// plus ssl. memory:// is kombu's own.
    """
    parsed = urllib.parse.urlsplit(transport_url)
    scheme = parsed.scheme
    if scheme == "memory":
        # kombu warns about every memory:// connection that names no host
        return "memory://localhost/"
    if scheme == buffered.SCHEME:
        return transport_url
    if scheme in ("amqp", "pyamqp", "amqps"):
        return ";".join(buffered.SCHEME + u[len(u.split("://")[0]):]
                        for u in transport_url.split(";"))
    if scheme != "rabbit":
        raise ValueError(f"unsupported transport URL scheme {scheme!r} "
                         f"(use rabbit://, amqp://, amqps:// or memory://)")
    path = parsed.path or "/"
    query = f"?{parsed.query}" if parsed.query else ""
    hosts = [h for h in parsed.netloc.split(",") if h]
    if not hosts:
        raise ValueError(f"transport URL {transport_url!r} names no host")
    return ";".join(f"{buffered.SCHEME}://{h}{path}{query}" for h in hosts)


def wants_tls(transport_url):
    """Whether the URL itself asks for TLS (amqps://)."""
    return urllib.parse.urlsplit(transport_url).scheme == "amqps"


def display(conn):
    """The broker URL for people: password masked, our internal scheme hidden."""
    uri = conn.as_uri()
    if conn.login_method == "EXTERNAL" and "@" in uri:
        # kombu shows its default guest user; the certificate says who
        scheme, rest = uri.split("://", 1)
        uri = f"{scheme}://{rest.split('@', 1)[1]}"
    if uri.startswith(buffered.SCHEME + "://"):
        uri = ("amqps" if conn.ssl else "amqp") + uri[len(buffered.SCHEME):]
    return uri


def _safe(url):
    """One failover URL for a log line: scheme, host and port only."""
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.hostname}:{parsed.port}" if parsed.hostname else url


LOGIN_PASSWORD = "password"
LOGIN_EXTERNAL = "external"


@dataclasses.dataclass(frozen=True)
class TLS:
    """How a service speaks TLS to the broker, and how it logs in.

    login "external": the SASL EXTERNAL mechanism; the broker maps the
    client certificate (its CN, with RabbitMQ's rabbitmq_auth_mechanism_ssl
    and ssl_cert_login_from = common_name) to the broker user, and the
    transport URL needs no password. Holds file paths only, never their
    contents.
    """

    ca_file: str = None
    cert_file: str = None
    key_file: str = None
    login: str = LOGIN_PASSWORD

    def __post_init__(self):
        if self.login not in (LOGIN_PASSWORD, LOGIN_EXTERNAL):
            raise ValueError(f"unknown TLS login {self.login!r}")
        if self.login == LOGIN_EXTERNAL and not self.cert_file:
            raise ValueError("[bus] ssl_login = external needs a client "
                             "certificate ([bus] ssl_cert_file)")

    def kombu_ssl(self):
        """kombu's ssl argument, as transport.tls_context takes it."""
        options = {"ca_certs": self.ca_file, "certfile": self.cert_file,
                   "keyfile": self.key_file}
        return {k: v for k, v in options.items() if v}

    @property
    def login_method(self):
        return "EXTERNAL" if self.login == LOGIN_EXTERNAL else None


def ssl_options(enabled, ca_file=None, cert_file=None, key_file=None,
                login=LOGIN_PASSWORD):
    """The [bus] TLS options as a TLS (False: plain TCP)."""
    if not enabled:
        if login == LOGIN_EXTERNAL:
            raise ValueError("[bus] ssl_login = external needs [bus] ssl = true")
        return False
    return TLS(ca_file or None, cert_file or None, key_file or None, login)


def certificate_user(cert_file):
    """The CN of a certificate file: the broker user EXTERNAL logs in as."""
    # The stdlib's only certificate decoder that needs no connection; it
    # has served CPython's own test suite since 2.7.
    decoded = ssl._ssl._test_decode_cert(cert_file)
    for rdn in decoded.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise ValueError(f"certificate {cert_file} has no common name")


# Seconds of silence from the broker's TCP stack after which a connection
# is declared dead. A node killed with -9 on a live machine is noticed at
# once anyway (its kernel closes the socket); this covers a machine that
# died, a cable pulled, a partition: no FIN, no RST, nothing to read.
DEAD_PEER_TIMEOUT = 2.0


def keepalive_settings(dead_peer_timeout=DEAD_PEER_TIMEOUT):
    """py-amqp socket_settings that notice a silent peer within the timeout.

    TCP keepalive probes an idle connection every second after one second
    of silence; TCP_USER_TIMEOUT drops a connection whose sent data (or
    probes) stay unacknowledged that long. The kernel answers these for a
    broker busy in a long GC or a disk stall, so unlike AMQP heartbeats
    of a few seconds (which RabbitMQ advises against: false positives),
    they only fire when the peer's machine or network is really gone. The
    AMQP heartbeat stays as the backstop for a broker process that hangs
    while its kernel still answers.
    """
    timeout = max(1, int(dead_peer_timeout))
    wanted = {"TCP_KEEPIDLE": 1, "TCP_KEEPINTVL": 1, "TCP_KEEPCNT": timeout,
              "TCP_USER_TIMEOUT": int(dead_peer_timeout * 1000)}
    # Only what this platform has (macOS has no TCP_KEEPIDLE by that name).
    return {getattr(socket, name): value for name, value in wanted.items()
            if hasattr(socket, name)}


class HostRotation:
    """Which host of a failover list the next connect attempt begins with.

    Given to kombu as the connection's failover strategy, so a connection
    and all its clones (one per session) share it. Each connect attempt
    (connect_once) tries every host once, beginning after the host the
    previous successful attempt used. One service's connections live on
    one thread, so nothing here is locked.
    """

    def __init__(self):
        self._next = None

    def __call__(self, hosts):
        # kombu's own failover (ensure_connection with retries) walks this.
        return itertools.cycle(hosts)

    def order(self, hosts):
        """The hosts in the order this attempt should try them."""
        start = hosts.index(self._next) if self._next in hosts else 0
        return hosts[start:] + hosts[:start]

    def connected(self, hosts, host):
        self._next = hosts[(hosts.index(host) + 1) % len(hosts)]


def connection(transport_url, *, heartbeat=30, ssl_opts=False,
               dead_peer_timeout=DEAD_PEER_TIMEOUT):
    """A kombu Connection (not connected yet) for a transport URL.

    ssl_opts: a TLS (from ssl_options), or False. An amqps:// URL means TLS
    whatever ssl_opts says (then the system's CAs unless a TLS names one):
    never a silent fallback to plain TCP.
    """
    url = kombu_url(transport_url)
    tls = ssl_opts
    if not tls and wants_tls(transport_url):
        tls = TLS()
    elif tls and not isinstance(tls, TLS):
        tls = TLS()         # ssl=True, or a dict from older callers
    if url.startswith("memory://"):
        tls = False
    options = {"confirm_publish": False}
    if url.startswith("memory://"):
        # kombu's in-process transport sleeps polling_interval (1 s) whenever
        # a poll finds nothing: far too slow for waiters in a demo.
        options["polling_interval"] = 0.002
    elif dead_peer_timeout:
        options["socket_settings"] = keepalive_settings(dead_peer_timeout)
    return kombu.Connection(url, heartbeat=heartbeat,
                            ssl=tls.kombu_ssl() or True if tls else False,
                            login_method=tls.login_method if tls else None,
                            transport_options=options,
                            failover_strategy=HostRotation())


def connect_once(conn):
    """Connect now, to any host of the URL, or raise the broker's error now.

    One attempt per host, without kombu's hidden waits (its connect()
    retries once after 2 s; its ensure_connection(max_retries=0) gives up
    before it ever switches host): the caller's tenacity loop owns backoff.
    The host list is the connection's failover list; the buffered
    transport survives a switch because every host's URL names its scheme.
    """
    hosts = list(conn.alt)
    if len(hosts) < 2 or conn.connected:
        conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
    else:
        rotation = conn.failover_strategy
        if not isinstance(rotation, HostRotation):
            rotation = HostRotation()
        order = rotation.order(hosts)
        for i, host in enumerate(order):
            conn.switch(host)
            try:
                conn.ensure_connection(max_retries=0,
                                       reraise_as_library_errors=False)
            except conn.connection_errors + (OSError,) as exc:
                if i == len(order) - 1:
                    raise
                LOG.warning("broker %s: %s; trying %s", display(conn),
                            exc or type(exc).__name__, _safe(order[i + 1]))
                continue
            rotation.connected(hosts, host)
            break
    if not is_memory(conn):
        # py-amqp polls the socket (select + read, drain_events(timeout=0))
        # before every publish while connection.blocked is negotiated: a
        # third of the router's CPU, and the re-entrancy behind "never
        # publish from a delivery callback". Our loops drain constantly, so
        # blocked/unblocked frames are still read, just not per publish.
        capabilities = conn.connection.client_properties.get("capabilities")
        if capabilities:
            capabilities["connection.blocked"] = False
    return conn


def drain(conn, timeout, burst=256):
    """Wait up to `timeout` for broker events, then take what else is there.

    One drain_events() handles one delivery or confirm; taking the rest of
    what already arrived (mostly from the read buffer, no system call) lets
    the caller settle and acknowledge a batch at once instead of one by one.
    Returns False when the wait timed out with nothing to handle.
    """
    try:
        conn.drain_events(timeout=timeout)
    except socket.timeout:
        return False
    for _ in range(burst):
        try:
            conn.drain_events(timeout=0)
        except socket.timeout:
            break
    return True


def take(items):
    """Empty a list that broker callbacks append to, returning its contents.

    The callbacks hold that very list object: it is emptied in place, never
    replaced (replacing it silently detaches them).
    """
    batch = items[:]
    items.clear()
    return batch


def is_memory(conn):
    return conn.transport.driver_type == "memory"


def user_of(conn):
    """The broker user this connection logs in as (its validated user_id).

    With EXTERNAL that is the client certificate's CN, whatever the URL says.
    """
    if is_memory(conn):
        return None
    if conn.login_method == "EXTERNAL" and isinstance(conn.ssl, dict):
        return certificate_user(conn.ssl["certfile"])
    return conn.userid


def reconnecting(stop_event, what, *, max_wait=30.0, errors=(Exception,),
                 on_error=None):
    """A tenacity loop: retry `what` with jittered backoff until stopped.

    Sleeping waits on `stop_event`, so a SIGTERM during backoff ends the
    wait at once, and the loop then ends quietly: a requested stop is not
    an error, whatever the broker was doing. ``on_error(exc)`` hears each
    failed attempt (for a health check to say why).
    """
    def log_retry(state):
        exc = state.outcome.exception()
        LOG.warning("%s: broker connection failed (%s), retrying in %.1fs", what,
                    exc, state.next_action.sleep)
        if on_error is not None:
            on_error(exc)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors),
        wait=(tenacity.wait_exponential(multiplier=0.2, max=max_wait)
              + tenacity.wait_random(0, 0.2)),
        stop=lambda state: stop_event.is_set(),
        sleep=stop_event.wait,
        before_sleep=log_retry,
        retry_error_callback=lambda state: None,
    )
