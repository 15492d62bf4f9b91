"""The broker side of the lifecycle agent: a bounded outbox and its publisher.

The publisher's thread owns the broker connection. It publishes the
outbox's head, persistent and confirmed, and removes it only once the
broker confirmed it, so messages leave in order and none is lost to a
broker restart (a message whose confirm was lost is published again after
the reconnect: consumers deduplicate by message id).

The thread also listens on the host's control queue, so that a router
that (re)connects can ask for a snapshot (see compute.agent).

Lifecycle messages go to a fanout exchange and are published without
``mandatory``: with nobody bound a broadcast has nobody to reach, and a
return would only make us retry into the void.
"""

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from amqp.exceptions import ConsumerCancelled
from kombu import Consumer, Exchange

from router.bus import connection as bus_connection
from router.bus import consuming, inbound, publishing, topology
from router.bus.backoff import Backoff, reconnect_schedule

LOG = logging.getLogger(__name__)

# Seconds between asking the broker whether this agent's control queue is
# still consumed and bound (router/bus/consuming.py): one passive declare
# and one bind per agent, 2,000 agents about 70 operations a second.
CONTROL_CHECK = 60.0


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
        # Woken with every put and at close: the publisher waits on it and
        # on the broker's socket at once (connection.wait_readable).
        self.waker = bus_connection.Waker()

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
        self.waker.wake()
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
        self.waker.wake()

    @property
    def closed(self):
        return self._closed


class TopologyMissing(Exception):
    """A central exchange this agent publishes to or listens on is missing."""


class LifecyclePublisher:
    """Publishes an Outbox to the lifecycle fanout exchange, reconnecting.

    ``on_state(up, detail)`` is called from this thread when the broker
    connection comes up (detail: "first" or "again") or goes down.

    With ``control_host`` set it also listens on that host's control queue
    (resync requests from the routers) and hands each message over as
    ``on_control(body, properties)``, undecoded: deciding what
    it means is the dispatcher's job.

    The central exchanges belong to the central topology (`evrouter
    topology --declare`, run as the router user): this side only checks
    them passively, because a compute host's broker user may not configure
    them (router/permissions.py).
    """

    def __init__(self, outbox, topology_, on_state, *, transport_url,
                 heartbeat=30, ssl=False, confirm_timeout=10.0,
                 reconnect_max=30.0, reconnect=None, control_host=None,
                 on_control=None):
        self.outbox = outbox
        self.published = 0
        self._topology = topology_
        self._on_state = on_state
        self._url = transport_url
        self._heartbeat = heartbeat
        self._ssl = ssl
        self._confirm_timeout = confirm_timeout
        # reconnect: a Schedule; reconnect_max alone keeps the default
        # schedule with that cap.
        self.backoff = Backoff(reconnect or reconnect_schedule(reconnect_max))
        self._up_since = None
        self._control_host = control_host
        self._on_control = on_control
        self._control = []          # deliveries, appended by the callback
        self.control_queue = None   # this session's control queue, if any
        self._control_watch = None
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
        self.outbox.waker.wake()
        self._thread.join(timeout=self._confirm_timeout + 5)
        return len(self.outbox) == 0

    def _run(self):
        conn = bus_connection.connection(self._url, heartbeat=self._heartbeat,
                                         ssl_opts=self._ssl)
        errors = (conn.connection_errors + conn.channel_errors
                  + (publishing.PublishError, OSError, TopologyMissing))
        while not self._abandon.is_set():
            self._up_since = None
            try:
                self._session(conn.clone(), errors)
                return                      # outbox closed and empty
            except errors as exc:
                cause = exc
            if not self.backoff.wait(self._abandon, "lifecycle publisher",
                                     cause, self._up_since, conn):
                return

    def _session(self, conn, errors):
        try:
            bus_connection.connect_once(conn)
            self._require(conn, self._topology.lifecycle_exchange_name)
            control = self._listen(conn)
            publisher = publishing.BlockingPublisher(
                conn, user_id=bus_connection.user_of(conn))
            self._sessions += 1
            self._connected = True
            self._up_since = time.monotonic()
            self._on_state(True, "first" if self._sessions == 1 else "again")
            self._publish_until_closed(conn, publisher, control)
        except errors as exc:
            self._on_state(False, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._connected = False
            self._control.clear()
            self._control_watch = None
            conn.release()

    def _exists(self, conn, exchange):
        # A failed passive declare closes its channel: use a throwaway one.
        channel = conn.channel()
        try:
            channel.exchange_declare(exchange, "fanout", passive=True)
        except conn.channel_errors:
            return False
        channel.close()
        return True

    def _require(self, conn, exchange):
        if bus_connection.is_memory(conn):
            # kombu's memory transport has no passive declares; nothing
            # there is privileged anyway.
            topology.declare(conn.channel(), [Exchange(exchange, "fanout",
                                                       durable=True)], [])
        elif not self._exists(conn, exchange):
            raise TopologyMissing(
                f"exchange {exchange} does not exist: declare the central "
                f"topology first (`evrouter topology --declare`, as the "
                f"router user)")

    def _listen(self, conn):
        """Consume this host's control queue; None if not wanted/possible."""
        if self._control_host is None:
            return None
        name = self._topology.control_exchange_name
        if bus_connection.is_memory(conn):
            self._require(conn, name)
        elif not self._exists(conn, name):
            LOG.error("exchange %s does not exist (central topology of an "
                      "older evrouter?): this agent answers no resync "
                      "requests until it reconnects; run `evrouter topology "
                      "--declare`", name)
            return None
        # A queue of this session's own (see Topology.agent_control_queue).
        queue = self._topology.agent_control_queue(self._control_host,
                                                   uuid.uuid4().hex)
        self.control_queue = queue.name
        consumer = Consumer(conn.channel(), [queue], no_ack=True,
                            on_message=self._control.append, accept=None)
        consumer.consume()
        if not bus_connection.is_memory(conn):
            # Asked about (and bound again) now and then: the control
            # fanout deleted and declared again leaves it unbound, and a
            # router's resync requests would never reach this agent.
            self._control_watch = consuming.QueueWatch(conn, queue,
                                                       CONTROL_CHECK)
        return consumer

    def _check_control(self, conn, control, now):
        if self._control_watch is None:
            return control
        try:
            self._control_watch.check(now)
            return control
        except ConsumerCancelled as exc:
            LOG.warning("control queue %s lost (%s); listening again",
                        self.control_queue, exc)
            self._control_watch.close()
            self._control_watch = None
            return self._listen(conn)

    def _hand_over_control(self):
        for message in bus_connection.take(self._control):
            # Undecoded: the whole AMQP message is the receiver's to judge
            # (inbound.decode_message), body and properties alike.
            self._on_control(message.body, inbound.properties_of(message))

    def _publish_until_closed(self, conn, publisher, control):
        exchange = self._topology.lifecycle_exchange_name
        memory = bus_connection.is_memory(conn)
        next_heartbeat = 0.0
        while not self._abandon.is_set():
            if self._control:
                self._hand_over_control()
            message = self.outbox.head(timeout=0 if not memory else
                                       0.25 if control is None else 0.05)
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
                if control is not None:
                    bus_connection.drain(conn, 0.01)
                continue
            # Idle: wait for the broker (a dead broker is noticed now, its
            # heartbeats count, resync requests come in) and for the outbox
            # at once, until our next heartbeat is due: nothing polls, so an
            # idle agent costs no measurable CPU (issue 22).
            if bus_connection.wait_readable(
                    conn, next_heartbeat - time.monotonic(), self.outbox.waker):
                bus_connection.drain(conn, 1.0)
            now = time.monotonic()
            if now >= next_heartbeat:
                conn.heartbeat_check()
                next_heartbeat = now + bus_connection.heartbeat_every(conn)
                control = self._check_control(conn, control, now)
