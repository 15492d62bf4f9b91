"""A TCP proxy in front of the real broker that a test can cut (no tests).

While `refusing`, every new connection is closed at once (what a broker
that is down looks like to a client); `cut()` also drops every connection
in progress. Only loopback, only for the test's own duration.
"""

import socket
import threading


class BrokerProxy:
    def __init__(self, target=("127.0.0.1", 5672)):
        self.target = target
        self.refusing = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, user="guest", password="guest"):
        return f"rabbit://{user}:{password}@127.0.0.1:{self.port}/"

    def cut(self):
        """Drop every connection now (and keep refusing if `refusing`)."""
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self._closed = True
        self._listener.close()
        self.cut()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.add((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst),
                                 daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
