"""Broker connections: transport URLs and the reconnect policy.

Transport URLs are written the OpenStack way (``rabbit://user:pass@host:5672/vhost``,
several hosts separated by commas) or as kombu URLs; ``memory://`` selects
kombu's in-process transport.
"""

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

    Plain AMQP goes through evrouter's buffered transport (scheme evamqp);
    amqps:// (TLS) and memory:// are kombu's own.
    """
    parsed = urllib.parse.urlsplit(transport_url)
    scheme = parsed.scheme
    if scheme == "memory":
        # kombu warns about every memory:// connection that names no host
        return "memory://localhost/"
    if scheme in ("amqps", buffered.SCHEME):
        return transport_url
    if scheme in ("amqp", "pyamqp"):
        return ";".join(buffered.SCHEME + u[len(u.split("://")[0]):]
                        for u in transport_url.split(";"))
    if scheme != "rabbit":
        raise ValueError(f"unsupported transport URL scheme {scheme!r} "
                         f"(use rabbit://, amqp:// or memory://)")
    path = parsed.path or "/"
    query = f"?{parsed.query}" if parsed.query else ""
    hosts = [h for h in parsed.netloc.split(",") if h]
    if not hosts:
        raise ValueError(f"transport URL {transport_url!r} names no host")
    return ";".join(f"{buffered.SCHEME}://{h}{path}{query}" for h in hosts)


def display(conn):
    """The broker URL for people: password masked, our internal scheme hidden."""
    uri = conn.as_uri()
    if uri.startswith(buffered.SCHEME + "://"):
        uri = "amqp" + uri[len(buffered.SCHEME):]
    return uri


def ssl_options(enabled, ca_file=None, cert_file=None, key_file=None):
    """kombu's ssl argument from the [bus] TLS options."""
    if not enabled:
        return False
    options = {"cert_reqs": ssl.CERT_REQUIRED}
    if ca_file:
        options["ca_certs"] = ca_file
    if cert_file:
        options["certfile"] = cert_file
    if key_file:
        options["keyfile"] = key_file
    return options


def connection(transport_url, *, heartbeat=30, ssl_opts=False):
    url = kombu_url(transport_url)
    options = {"confirm_publish": False}
    if url.startswith("memory://"):
        # kombu's in-process transport sleeps polling_interval (1 s) whenever
        # a poll finds nothing: far too slow for waiters in a demo.
        options["polling_interval"] = 0.002
    return kombu.Connection(url, heartbeat=heartbeat, ssl=ssl_opts,
                            transport_options=options)


def connect_once(conn):
    """Connect now or raise the broker's error now.

    kombu's connect() retries once after a hidden 2 s wait; the caller's
    tenacity loop owns backoff, so one quick attempt is what it wants.
    """
    conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
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
    """The broker user this connection logs in as (its validated user_id)."""
    return None if is_memory(conn) else conn.userid


def reconnecting(stop_event, what, *, max_wait=30.0, errors=(Exception,)):
    """A tenacity loop: retry `what` with jittered backoff until stopped.

    Sleeping waits on `stop_event`, so a SIGTERM during backoff ends the
    wait at once, and the loop then ends quietly: a requested stop is not
    an error, whatever the broker was doing.
    """
    def log_retry(state):
        LOG.warning("%s: broker connection failed (%s), retrying in %.1fs", what,
                    state.outcome.exception(), state.next_action.sleep)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(errors),
        wait=(tenacity.wait_exponential(multiplier=0.2, max=max_wait)
              + tenacity.wait_random(0, 0.2)),
        stop=lambda state: stop_event.is_set(),
        sleep=stop_event.wait,
        before_sleep=log_retry,
        retry_error_callback=lambda state: None,
    )
