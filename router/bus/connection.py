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

import contextlib
import errno
import itertools
import logging
import math
import select
import socket
import urllib.parse

import kombu

from router.bus import transport as buffered

# The TLS settings live in router/bus/tls.py; these names stay importable
# from here, where services have always found them.
from router.bus.tls import (  # noqa: F401
    CERT_LOGIN_FROM,
    LOGIN_EXTERNAL,
    LOGIN_PASSWORD,
    SAN_TYPES,
    SSL_SETTINGS_KEY,
    TLS,
    certificate_user,
    ssl_options,
    tls_for,
)

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

    ssl_opts: a TLS (from ssl_options), or False; see tls_for. Never a
    silent fallback to plain TCP.
    """
    url = kombu_url(transport_url)
    tls = tls_for(transport_url, ssl_opts)
    options = {"confirm_publish": False}
    if url.startswith("memory://"):
        # kombu's in-process transport sleeps polling_interval (1 s) whenever
        # a poll finds nothing: far too slow for waiters in a demo.
        options["polling_interval"] = 0.002
    elif dead_peer_timeout:
        options["socket_settings"] = keepalive_settings(dead_peer_timeout)
    return kombu.Connection(url, heartbeat=heartbeat,
                            ssl=tls.kombu_ssl() if tls else False,
                            login_method=tls.login_method if tls else None,
                            transport_options=options,
                            failover_strategy=HostRotation())


def connect_once(conn):
    """Connect now, to any host of the URL, or raise the broker's error now.

    One attempt per host, without kombu's hidden waits (its connect()
    retries once after 2 s; its ensure_connection(max_retries=0) gives up
    before it ever switches host): the caller's loop owns backoff (see
    router.bus.backoff).
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


def connect_error(conn, exc):
    """Why connecting failed, in one line naming the broker (and, for a
    refused login, the user): for commands that give up at once."""
    where = display(conn)
    if getattr(exc, "reply_code", None) == 403:
        try:
            who = user_of(conn)
        except ValueError:
            who = None
        how = "its certificate" if conn.login_method == "EXTERNAL" else "its password"
        return (f"the broker at {where} refused the login of {who or 'this user'} "
                f"(by {how}): {getattr(exc, 'reply_text', exc)}")
    return f"cannot reach the broker at {where}: {exc or type(exc).__name__}"


def drain(conn, timeout, burst=256):
    """Wait up to `timeout` for broker events, then take what else is there.

    One drain_events() handles one delivery or confirm; taking the rest of
    what already arrived (mostly from the read buffer, no system call) lets
    the caller settle and acknowledge a batch at once instead of one by one.
    Returns False when the wait timed out with nothing to handle.
    """
    # py-amqp's own drain_events: kombu's two layers above it add nothing
    # for an AMQP connection (the memory transport's is kombu's).
    drain_events = conn.drain_events if is_memory(conn) else conn.connection.drain_events
    try:
        drain_events(timeout=timeout)
    except socket.timeout:
        return False
    for _ in range(burst):
        try:
            drain_events(timeout=0)
        except socket.timeout:
            break
    return True


class Waker:
    """Ends a loop's wait for the broker from another thread or a signal
    handler (stop()), so an idle loop may wait for as long as nothing is
    due instead of waking every fraction of a second to look at a flag:
    on 2,000 idle compute hosts those wake-ups are the whole cost."""

    def __init__(self):
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self):
        return self._r.fileno()

    def wake(self):
        try:
            self._w.send(b"\0")
        except OSError:         # its buffer is full: it is awake already
            pass

    def clear(self):
        try:
            while self._r.recv(4096):
                pass
        except OSError:         # nothing (more) to read
            pass


@contextlib.contextmanager
def corked(conn):
    """Frames written inside go to the broker together, on leaving (or
    before any read that waits on the socket): one system call for a batch
    of publishes instead of one each (transport.Corkable). The memory
    transport has nothing to cork."""
    transport = None if is_memory(conn) else getattr(
        conn.connection, "transport", None)
    if not isinstance(transport, buffered.Corkable):
        yield
        return
    transport.cork()
    try:
        yield
    except BaseException:
        try:
            transport.uncork()
        except Exception:   # noqa: S110 (the error being raised says more)
            pass
        raise
    transport.uncork()


def flush(channel):
    """Send what a corked transport holds for `channel`'s connection, now:
    for a caller whose next step relies on its frames having left."""
    transport = getattr(getattr(channel, "connection", None), "transport", None)
    if isinstance(transport, buffered.Corkable):
        transport.flush()


def wait_readable(conn, timeout, waker):
    """Block until the broker sent something, `waker` was woken, or
    `timeout` passed; True when there is something to read from the broker
    (then drain() it). For the buffered transports (transport.py) only."""
    transport = conn.connection.transport
    if transport.has_unread():
        return True
    sock = transport.sock
    readable = wait_fds((sock.fileno(), waker.fileno()), timeout)
    if waker.fileno() in readable:
        waker.clear()
    return sock.fileno() in readable


def wait_fds(fds, timeout):
    """Block until one of `fds` (file descriptor numbers) is readable or
    `timeout` seconds passed; the readable ones (an empty set: timed out).
    Any timeout is taken: negative or NaN waits not at all, one past poll's
    range (24.8 days, an agent's idle wait for a long snapshot_interval)
    waits that long and then says nothing was readable. A descriptor that
    is not open raises OSError (EBADF), on either path.

    poll(), not select(): select() refuses any descriptor at or above
    FD_SETSIZE (1,024), and nova-compute or an agent process with that many
    files or sockets open would have its consumer fail on every wait. Under
    eventlet's monkey-patching select.poll is gone and select.select is the
    green one, which has no such limit: it is used then. (A signal does not
    end the wait early on either path: Python resumes it, PEP 475.)"""
    seconds = min(timeout, _LONGEST_WAIT) if timeout > 0 else 0.0  # NaN: 0
    poll = getattr(select, "poll", None)
    if poll is None:
        readable, _, _ = select.select(fds, [], [], seconds)
        return set(readable)
    poller = poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    events = poller.poll(math.ceil(seconds * 1000))
    if any(event & select.POLLNVAL for _, event in events):
        raise OSError(errno.EBADF, "wait_fds: a descriptor is not open")
    return {fd for fd, _ in events}


# poll() takes at most 2**31 - 1 milliseconds
_LONGEST_WAIT = (2 ** 31 - 1) / 1000


def heartbeat_every(conn):
    """Seconds between heartbeat checks of an established connection.

    py-amqp sends its heartbeat only from a check and notices traffic only
    at checks, so a check every quarter of the negotiated heartbeat keeps
    the longest silence under the broker's limit of two missed heartbeats.
    Without heartbeats, 30 s (nothing is due; the bound is for safety)."""
    heartbeat = getattr(conn.connection, "heartbeat", 0) or 0
    return heartbeat / 4 if heartbeat else 30.0


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
    tls = conn.ssl.get(SSL_SETTINGS_KEY) if isinstance(conn.ssl, dict) else None
    if conn.login_method == "EXTERNAL" and tls:
        return tls.certificate_user()
    return conn.userid


def close_quietly(channel, errors):
    """Close a channel the broker may have closed already (a cancelled
    consumer leaves it open, holding nothing); `errors` (the connection's
    connection and channel errors) are what closing it may raise."""
    if getattr(channel, "is_open", False):
        try:
            channel.close()
        except errors:
            pass
