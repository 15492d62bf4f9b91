"""The broker side of the lifecycle agent: a bounded outbox and its publisher.

The publisher's thread owns the broker connection. It publishes the
outbox's head, persistent and confirmed, and removes it only once the
broker confirmed it, so messages leave in order and none is lost to a
broker restart (a message whose confirm was lost is published again after
the reconnect: consumers deduplicate by message id).

Lifecycle messages go to a fanout exchange and are published without
``mandatory``: with nobody bound a broadcast has nobody to reach, and a
return would only make us retry into the void.
"""

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass

from router.bus import connection as bus_connection
from router.bus import publishing, topology

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    id: str
    body: bytes
    label: str          # for log lines: "STARTED 6695eb01-... seq 7"


class Outbox:
    """Messages waiting for the broker, oldest first, at most `limit`.

    When full, the oldest message is dropped: the snapshot published after
    every broker reconnect tells consumers the current state anyway.
    """

    def __init__(self, limit):
        self.limit = limit
        self.dropped = 0
        self._items = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self):
        return len(self._items)

    def put(self, message):
        """Append; returns the message dropped to make room, or None."""
        with self._cond:
            dropped = None
            if len(self._items) >= self.limit:
                dropped = self._items.popleft()
                self.dropped += 1
            self._items.append(message)
            self._cond.notify()
            return dropped

    def head(self, timeout):
        """The oldest message (left in place), or None after `timeout`."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items[0] if self._items else None

    def remove(self, message):
        """Remove `message` if it is still the head (it may have been dropped)."""
        with self._cond:
            if self._items and self._items[0] is message:
                self._items.popleft()

    def close(self):
        """No more messages will come: the publisher stops once empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self):
        return self._closed


class LifecyclePublisher:
    """Publishes an Outbox to the lifecycle fanout exchange, reconnecting.

    ``on_state(up, detail)`` is called from this thread when the broker
    connection comes up (detail: "first" or "again") or goes down.
    """

    def __init__(self, outbox, topology_, on_state, *, transport_url,
                 heartbeat=30, ssl=False, confirm_timeout=10.0,
                 reconnect_max=30.0):
        self.outbox = outbox
        self.published = 0
        self._topology = topology_
        self._on_state = on_state
        self._url = transport_url
        self._heartbeat = heartbeat
        self._ssl = ssl
        self._confirm_timeout = confirm_timeout
        self._reconnect_max = reconnect_max
        self._abandon = threading.Event()
        self._sessions = 0
        self._connected = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="lifecycle-publisher")

    def start(self):
        self._thread.start()

    def finish(self, timeout):
        """Publish what is left, for at most `timeout`; True if all went."""
        self.outbox.close()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            if not self.outbox and not self._connected:
                break           # nothing left, and no broker to say goodbye to
            self._thread.join(0.05)
        self._abandon.set()
        self._thread.join(timeout=self._confirm_timeout + 5)
        return len(self.outbox) == 0

    def _run(self):
        conn = bus_connection.connection(self._url, heartbeat=self._heartbeat,
                                         ssl_opts=self._ssl)
        errors = (conn.connection_errors + conn.channel_errors
                  + (publishing.PublishError, OSError))
        try:
            for attempt in bus_connection.reconnecting(
                    self._abandon, "lifecycle publisher", errors=errors,
                    max_wait=self._reconnect_max):
                with attempt:
                    self._session(conn.clone(), errors)
        except errors as exc:
            LOG.error("lifecycle publisher gave up with %d message(s) "
                      "unpublished: %s", len(self.outbox), exc)

    def _session(self, conn, errors):
        try:
            bus_connection.connect_once(conn)
            topology.declare(conn.channel(),
                             [self._topology.lifecycle_exchange()], [])
            publisher = publishing.BlockingPublisher(
                conn, user_id=bus_connection.user_of(conn))
            self._sessions += 1
            self._connected = True
            self._on_state(True, "first" if self._sessions == 1 else "again")
            self._publish_until_closed(conn, publisher)
        except errors as exc:
            self._on_state(False, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._connected = False
            conn.release()

    def _publish_until_closed(self, conn, publisher):
        exchange = self._topology.lifecycle_exchange_name
        memory = bus_connection.is_memory(conn)
        next_heartbeat = 0.0
        while not self._abandon.is_set():
            message = self.outbox.head(timeout=0.25)
            if message is not None:
                publisher.publish(exchange, "", message.body,
                                  message_id=message.id, mandatory=False,
                                  timeout=self._confirm_timeout)
                self.outbox.remove(message)
                self.published += 1
                LOG.debug("published %s", message.label)
                continue
            if self.outbox.closed:
                return
            if memory:
                continue
            # Idle: read the socket so a dead broker is noticed now and the
            # broker's heartbeats count, and send ours when due.
            try:
                conn.drain_events(timeout=0.01)
            except socket.timeout:
                pass
            now = time.monotonic()
            if now >= next_heartbeat:
                conn.heartbeat_check()
                next_heartbeat = now + 1.0
