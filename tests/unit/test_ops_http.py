"""The HTTP endpoints (ops: /metrics, /healthz, the REST route; the REST
compatibility server) against clients that hold connections or lie about
their bodies.

A hostile review found 300 idle connections to a router's ops port holding
300 threads, for as long as the client kept them, and a Content-Length of
-1 read until the client stopped sending (196 MB streamed: the router's
memory grew 31 -> 220 MB); 'abc' raised a traceback per request.
"""

import socket
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from router import rest
from router.bus import ops

pytestmark = pytest.mark.timeout(60)


def _ops(**kwargs):
    return ops.OpsServer(("127.0.0.1", 0), CollectorRegistry(),
                         lambda: (True, "ok"),
                         {("POST", "/x"): lambda body, headers: (200, {"n": len(body)})},
                         **kwargs).start()


def _get(port, path="/healthz", timeout=5):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        return _read_all(s)


def _read_all(s):
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def _closed_by_server(s, within):
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def _threads():
    """socketserver's handler threads (named after process_request_thread)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


@pytest.mark.parametrize("server", ["ops", "rest"])
def test_idle_connections_are_bounded_and_let_go(server, monkeypatch):
    if server == "ops":
        srv = _ops(request_timeout=0.5, max_connections=4)
        port, stop = srv.address[1], srv.stop
    else:
        monkeypatch.setattr(ops.BoundedThreading, "max_connections", 4)
        monkeypatch.setattr(rest._QuietHandler, "timeout", 0.5)
        srv = rest.serve("127.0.0.1", 0, rest.RestApp(lambda *a, **k: (200, {})),
                         authenticated=False)
        port = srv.server_address[1]

        def stop():
            srv.shutdown()
            srv.server_close()
    before = _threads()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert _threads() - before <= 4
        # full: the next connection is closed at once, no thread for it
        extra = socket.create_connection(("127.0.0.1", port))
        assert _closed_by_server(extra, 2)
        extra.close()
        assert _threads() - before <= 4
        # the silent ones are let go after the timeout
        assert all(_closed_by_server(s, 3) for s in idle)
        deadline = time.monotonic() + 5
        while _threads() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _threads() <= before
        if server == "ops":
            assert b"200 OK" in _get(port)
    finally:
        for s in idle:
            s.close()
        stop()


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1e3", b""])
def test_a_content_length_that_is_not_a_byte_count_is_refused(length):
    srv = _ops(request_timeout=2)
    try:
        with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=5) as s:
            header = b"Content-Length: " + length + b"\r\n" if length else b""
            s.sendall(b"POST /x HTTP/1.0\r\n" + header + b"\r\n")
            started = time.monotonic()
            reply = _read_all(s)
            assert time.monotonic() - started < 2
        status = reply.split(b"\r\n", 1)[0]
        if length == b"":
            assert b" 200 " in status            # no body: an empty one
        else:
            assert b" 400 " in status, reply
    finally:
        srv.stop()


def test_request_length_reads_only_byte_counts():
    assert ops.request_length(None, 10) == (0, None)
    assert ops.request_length("10", 10) == (10, None)
    assert ops.request_length("11", 10) == (None, 413)
    for bad in ("-1", "abc", "1.5", " ", "0x10", "+5", " 5 ", "1_0", "\u0665"):
        assert ops.request_length(bad, 10) == (None, 400), bad


def test_a_client_that_trickles_bytes_is_cut_off_at_the_deadline():
    """The read timeout bounds each read only: two clients sending a byte
    every 0.3 s held both slots (and /healthz) for as long as they liked."""
    srv = _ops(request_timeout=0.5, max_connections=2, request_deadline=1.5)
    stop = threading.Event()
    cut = []

    def trickle():
        s = socket.create_connection(("127.0.0.1", srv.address[1]))
        try:
            s.sendall(b"GET /healthz HTTP/1.0\r\nX-Slow: ")
            while not stop.is_set():
                s.sendall(b"a")
                time.sleep(0.3)
        except OSError:
            cut.append(time.monotonic())
        finally:
            s.close()
    started = time.monotonic()
    clients = [threading.Thread(target=trickle) for _ in range(2)]
    for c in clients:
        c.start()
    try:
        deadline = time.monotonic() + 10
        while len(cut) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cut) == 2, "the tricklers were never cut off"
        assert all(t - started < 5 for t in cut)
        assert b"200 OK" in _get(srv.address[1])
    finally:
        stop.set()
        for c in clients:
            c.join(5)
        srv.stop()


def test_a_route_that_raises_is_answered_500_not_a_dropped_connection(caplog):
    def broken(body, headers):
        raise TypeError("unhashable type: 'list'")
    srv = ops.OpsServer(("127.0.0.1", 0), CollectorRegistry(), lambda: (True, "ok"),
                        {("POST", "/x"): broken}).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.address[1]), timeout=5) as s:
            s.sendall(b"POST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
            reply = _read_all(s)
        assert reply.split(b"\r\n", 1)[0].endswith(b" 500 Internal Server Error"), reply
        assert reply.endswith(b'{"error": "internal error"}')
        assert "POST /x failed" in caplog.text
        assert _get(srv.address[1]).split(b"\r\n", 1)[0].endswith(b"200 OK")
    finally:
        srv.stop()


def test_ipv6_listen_addresses_serve_and_bad_ports_are_refused():
    # '[::1]:port' failed with "Name or service not known" (ops) and "Address
    # family for hostname not supported" (REST); port 99999 an OverflowError
    assert ops.parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("127.0.0.1:99999", "h:-1", "h:", "h:٣"):
        with pytest.raises(ValueError, match="port 0 to 65535"):
            ops.parse_listen(bad)
    srv = ops.OpsServer(ops.parse_listen("[::1]:0"), CollectorRegistry(),
                        lambda: (True, "ok")).start()
    try:
        with socket.create_connection(("::1", srv.address[1]), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert _read_all(s).split(b"\r\n", 1)[0].endswith(b"200 OK")
    finally:
        srv.stop()
    server = rest.serve("::1", 0, rest.RestApp(lambda body, **kw: (200, {})),
                        authenticated=False)
    try:
        with socket.create_connection(("::1", server.server_address[1]), timeout=5) as s:
            s.sendall(b"POST /v2.1/os-server-external-events HTTP/1.0\r\n"
                      b"Content-Length: 2\r\n\r\n{}")
            assert b" 200 " in _read_all(s).split(b"\r\n", 1)[0]
    finally:
        server.shutdown()
        server.server_close()
