"""The operations endpoint every evrouter service serves: /metrics, /healthz.

A small threaded HTTP server on its own thread. Services hand it a health
callable and a prometheus registry; it never touches a broker connection.
Extra routes (the router's REST compatibility endpoint) plug in as
``{(method, path): handler(body_bytes) -> (status, json_document)}``.
"""

import json
import logging
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

LOG = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1024 * 1024
# A connection that sends nothing for this long is closed; at most this many
# are served at once (one thread each), more are closed as they come.
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
# However it trickles in, a connection is closed this long after it came:
# a REST event waits at most its confirm timeout (10 s) and 5 s more.
REQUEST_DEADLINE = 30.0


class BoundedThreading(socketserver.ThreadingMixIn):
    """ThreadingMixIn with a bound: at most MAX_CONNECTIONS handler threads.

    socketserver's own takes every connection and keeps a thread for it as
    long as the client keeps the socket open: 300 idle connections to a
    router's ops port held 300 threads. With the handlers' timeout
    (REQUEST_TIMEOUT) a silent client is let go; a full server closes new
    connections at once (logged, at most once a minute) and serves again as
    soon as one is done."""

    daemon_threads = True
    max_connections = MAX_CONNECTIONS
    request_deadline = REQUEST_DEADLINE
    _refused = 0
    _said_at = float("-inf")

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._open = {}             # request socket -> its deadline
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        slots = self._slots
        if not slots.acquire(blocking=False):
            self._refused += 1
            now = time.monotonic()
            if now - self._said_at >= 60:
                self._said_at = now
                LOG.warning("%s: %d connections open, the most it serves; "
                            "refused %d so far", type(self).__name__,
                            self.max_connections, self._refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            slots.release()
            raise

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open[request] = time.monotonic() + self.request_deadline
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)
            self._slots.release()

    def service_actions(self):
        """Each turn of serve_forever (every half second): a connection past
        its deadline is shut, so its handler's read ends. REQUEST_TIMEOUT
        bounds each read only: a client sending a byte every few seconds
        held its slot (and, with every slot, /healthz) for ever."""
        super().service_actions()
        now = time.monotonic()
        with self._open_lock:
            late = [r for r, deadline in self._open.items() if deadline <= now]
        for request in late:
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        """A client gone or cut off is one DEBUG line, not a traceback on
        stderr (socketserver's default)."""
        if isinstance(sys.exc_info()[1], OSError):
            LOG.debug("%s: connection from %s ended: %s", type(self).__name__,
                      client_address, sys.exc_info()[1])
            return
        LOG.exception("%s: error serving %s", type(self).__name__, client_address)


def request_length(value, limit):
    """A request's Content-Length header to a byte count within `limit`, or
    the status that refuses it: (length, None) or (None, status)."""
    if value is None or value == "":
        return 0, None
    if not (type(value) is str and value.isascii() and value.isdigit()):
        return None, 400        # int() would take "+5", " 5 ", "1_000"
    length = int(value)
    return (length, None) if length <= limit else (None, 413)


def parse_listen(value):
    """'host:port' or '[v6]:port' -> (host, port); '' -> None (disabled).
    ValueError for anything a socket could not bind (a port past 65535 was
    an OverflowError at start)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"listen address must be host:port (port 0 to 65535), "
                         f"not {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def display_address(address):
    """'host:port' of a bound server's address, '[v6]:port' for IPv6."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_family(host):
    """The socket family a server listening on `host` needs (IPv6: a ':')."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(listen, collector, health, routes=None):
    """Start the endpoint on 'host:port' with one collector; None if listen is ''.

    Raises ValueError (bad address) or OSError (port taken) for the entry
    point to report.
    """
    address = parse_listen(listen)
    if address is None:
        return None
    registry = CollectorRegistry()
    registry.register(collector)
    return OpsServer(address, registry, health, routes).start()


class OpsServer:
    def __init__(self, listen, registry, health, routes=None, *,
                 request_timeout=REQUEST_TIMEOUT, max_connections=MAX_CONNECTIONS,
                 request_deadline=REQUEST_DEADLINE):
        self._registry = registry
        self._health = health
        self._routes = dict(routes or {})
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout

            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

            def log_message(self, fmt, *args):
                LOG.debug("ops http: " + fmt, *args)

        family = address_family(listen[0])

        class Server(BoundedThreading, HTTPServer):
            pass
        Server.address_family = family
        Server.max_connections = max_connections
        Server.request_deadline = request_deadline
        self.httpd = Server(listen, Handler)
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="ops-http", daemon=True)

    def start(self):
        self._thread.start()
        LOG.info("ops endpoint on http://%s (/metrics, /healthz)",
                 display_address(self.address))
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, req, method):
        path = req.path.split("?", 1)[0]
        if method == "GET" and path == "/metrics":
            return self._send(req, 200, generate_latest(self._registry),
                              CONTENT_TYPE_LATEST)
        if method == "GET" and path == "/healthz":
            healthy, detail = self._health()
            return self._send_json(req, 200 if healthy else 503,
                                   {"healthy": healthy, "detail": detail})
        handler = self._routes.get((method, path))
        if handler is None:
            return self._send_json(req, 404, {"error": f"no route {method} {path}"})
        length, refused = request_length(req.headers.get("Content-Length"),
                                         MAX_REQUEST_BYTES)
        if refused is not None:
            return self._send_json(req, refused, {
                "error": "request body too large" if refused == 413
                else "Content-Length must be a byte count"})
        # handler(body, request headers) -> (status, document) or
        # (status, document, [(header, value), ...])
        try:
            status, document, *extra = handler(req.rfile.read(length), req.headers)
        except OSError:
            raise               # the client's socket: handle_error says it
        except Exception:       # a bug: an answer still, as RestApp gives one
            LOG.exception("ops http: %s %s failed", method, path)
            return self._send_json(req, 500, {"error": "internal error"})
        self._send_json(req, status, document, extra[0] if extra else ())

    def _send_json(self, req, status, document, headers=()):
        self._send(req, status, json.dumps(document).encode(), "application/json",
                   headers)

    @staticmethod
    def _send(req, status, body, content_type, headers=()):
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(body)
