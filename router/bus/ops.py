"""The operations endpoint every evrouter service serves: /metrics, /healthz.

A small threaded HTTP server on its own thread. Services hand it a health
callable and a prometheus registry; it never touches a broker connection.
Extra routes (the router's REST compatibility endpoint) plug in as
``{(method, path): handler(body_bytes) -> (status, json_document)}``.
"""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

LOG = logging.getLogger(__name__)
MAX_REQUEST_BYTES = 1024 * 1024


def parse_listen(value):
    """'host:port' -> (host, port); '' -> None (disabled)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port, not {value!r}")
    return host or "0.0.0.0", int(port)


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
    def __init__(self, listen, registry, health, routes=None):
        self._registry = registry
        self._health = health
        self._routes = dict(routes or {})
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

            def log_message(self, fmt, *args):
                LOG.debug("ops http: " + fmt, *args)

        self.httpd = ThreadingHTTPServer(listen, Handler)
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        name="ops-http", daemon=True)

    def start(self):
        self._thread.start()
        LOG.info("ops endpoint on http://%s:%d (/metrics, /healthz)", *self.address)
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
        length = int(req.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:
            return self._send_json(req, 413, {"error": "request body too large"})
        # handler(body, request headers) -> (status, document) or
        # (status, document, [(header, value), ...])
        status, document, *extra = handler(req.rfile.read(length), req.headers)
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
