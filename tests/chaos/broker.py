"""Hurting the chaos node the way an operator (or a bad day) would.

Through the management HTTP API where it can (milliseconds), rabbitmqctl
for stop_app/start_app only (each call starts an Erlang VM: about a
second). Every call is bounded.
"""

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

ADMIN = ("guest", "guest")
PASSWORD = "chaos"


class Node:
    def __init__(self, name, port, mgmt_port):
        self.name = name
        self.port = port
        self.mgmt = f"http://127.0.0.1:{mgmt_port}/api"
        auth = f"{ADMIN[0]}:{ADMIN[1]}".encode()
        import base64
        self._auth = "Basic " + base64.b64encode(auth).decode()

    def url(self, user=ADMIN[0], password=None):
        password = password or (ADMIN[1] if user == ADMIN[0] else PASSWORD)
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}//"

    def client_url(self, user=ADMIN[0], password=None):
        """A URL naming one node (the test's own clients take no failover
        list); here the only one."""
        return self.url(user, password)

    # --- plumbing ----------------------------------------------------------------
    def mgmt_base(self):
        """The management API to ask (a cluster's: on a node that is up)."""
        return self.mgmt

    def reachable(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def api(self, method, path, body=None, *, ok=(200, 201, 204), timeout=10):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.mgmt_base() + path, data=data,
                                     method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return None
            raise RuntimeError(f"{method} {path}: HTTP {exc.code} "
                               f"{exc.read()[:200]!r}") from None

    def wait_up(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("GET", "/overview", timeout=2)
                if self.reachable():
                    return
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not up within {timeout}s")
            time.sleep(0.2)

    def ctl(self, *args, timeout=60):
        subprocess.run(["rabbitmqctl", "-q", "-n", self.name, *args],
                       check=True, capture_output=True, timeout=timeout)

    # --- users and permissions -----------------------------------------------------
    def add_user(self, user):
        self.api("PUT", f"/users/{q(user)}", {"password": PASSWORD, "tags": ""})
        self.grant(user)

    def delete_user(self, user):
        self.api("DELETE", f"/users/{q(user)}", ok=(404,))

    def grant(self, user, pattern=".*", write=None):
        self.api("PUT", f"/permissions/%2F/{q(user)}",
                 {"configure": pattern, "write": pattern if write is None
                  else write, "read": pattern})

    def revoke(self, user):
        self.api("DELETE", f"/permissions/%2F/{q(user)}", ok=(404,))

    def close_connections(self, user):
        """rabbitmqctl close_connection on every connection of `user`
        (the broker's connection tracking, not the lagging stats)."""
        self.api("DELETE", f"/connections/username/{q(user)}", ok=(404,))

    # --- policies --------------------------------------------------------------------
    def set_policy(self, name, queue_name, definition):
        self.api("PUT", f"/policies/%2F/{q(name)}", {
            "pattern": "^" + queue_name.replace(".", "[.]") + "$",
            "definition": definition, "apply-to": "queues", "priority": 100})

    def clear_policy(self, name):
        self.api("DELETE", f"/policies/%2F/{q(name)}", ok=(404,))

    def policies(self):
        return [p["name"] for p in self.api("GET", "/policies/%2F") or []]

    # --- the whole node ------------------------------------------------------------------
    def stop_app(self):
        self.ctl("stop_app")

    def start_app(self):
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60", timeout=90)
        self.wait_up(60)


def q(name):
    return urllib.parse.quote(name, safe="")
