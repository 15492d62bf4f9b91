"""Shared test fixtures: a unique slice of the real broker per test."""

import json
import os
import socket
import subprocess
import uuid

import kombu
import pytest

from router.bus import topology
from tests.isolation import logging_restored, no_thread_left_behind  # noqa: F401 (autouse)

BROKER_URL = os.environ.get("EVROUTER_TEST_URL",
                            "amqp://guest:guest@127.0.0.1:5672//")


def broker_reachable(url=BROKER_URL):
    host_port = url.split("@", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    try:
        socket.create_connection((host, int(port or 5672)), timeout=2).close()
        return True
    except OSError:
        return False


def reading_connection(url):
    """A connection for the tests to read what the services wrote, on the
    services' transport (router.bus.transport): kombu's own would decompress
    a body by its `compression` header, and raise on the poison cases that
    test exactly that (tests/functional/poison.py)."""
    from router.bus import connection as bus_connection
    return bus_connection.connection(url, heartbeat=0)


class Bus:
    """A Topology under a unique prefix, declared on the real broker.

    Everything it declares, and every name passed to `own`, is deleted at
    teardown, so tests can run in parallel and again.
    """

    def __init__(self, url, queue_type="classic", **topology_args):
        self.url = url
        self.topology = topology.Topology(
            prefix=f"evt-{uuid.uuid4().hex[:10]}", queue_type=queue_type,
            **topology_args)
        self.conn = reading_connection(url)
        self.conn.connect()
        self._exchanges = set()
        self._queues = set()

    @property
    def prefix(self):
        return self.topology.prefix

    def channel(self):
        return self.conn.channel()

    def declare_central(self):
        exchanges, queues = self.topology.central()
        self._declare(exchanges, queues)

    def declare_host(self, host):
        self._declare(*self.topology.for_host(host))

    def _declare(self, exchanges, queues):
        ch = self.conn.default_channel
        topology.declare(ch, exchanges, queues)
        self._exchanges.update(e.name for e in exchanges)
        self._queues.update(q.name for q in queues)

    def own(self, *, exchanges=(), queues=()):
        self._exchanges.update(exchanges)
        self._queues.update(queues)

    def cleanup(self):
        exchanges, queues = self.topology.central()
        self._exchanges.update(e.name for e in exchanges)
        self._queues.update(q.name for q in queues)
        with kombu.Connection(self.url) as conn:
            for name in self._queues:
                ch = conn.channel()
                try:
                    ch.queue_delete(name)
                except conn.channel_errors:
                    pass
            for name in self._exchanges:
                ch = conn.channel()
                try:
                    ch.exchange_delete(name)
                except conn.channel_errors:
                    pass
        self.conn.release()


@pytest.fixture
def bus():
    if not broker_reachable():
        pytest.fail(f"RabbitMQ is not reachable at {BROKER_URL}; "
                    f"start it with `rabbitmq-server -detached`")
    b = Bus(BROKER_URL)
    try:
        yield b
    finally:
        b.cleanup()


def single_user_policy(url=BROKER_URL, **policy):
    """The router policy of a broker where every service is one user (the
    tests' guest): that user speaks for every host's lifecycle."""
    from router.routing import Policy
    user = kombu.Connection(url).userid
    return Policy(lifecycle_trusted_users=frozenset({user}), **policy)


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, timeout=60,
                   capture_output=True)


# A policy under which a queue refuses every publish (nack).
REJECT_ALL = {"max-length": 0, "overflow": "reject-publish"}


@pytest.fixture
def policy(bus):
    """Set a policy on this test's queues only; cleared at teardown."""
    names = []

    def set_policy(queue_name, definition):
        name = f"{bus.prefix}-{len(names)}"
        rabbitmqctl("set_policy", "--apply-to", "queues", "--priority", "100",
                    name, f"^{queue_name.replace('.', '[.]')}$",
                    json.dumps(definition))
        names.append(name)
        return name

    yield set_policy
    for name in names:
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", name],
                       timeout=60, capture_output=True)


class RunningRouter:
    """A RouterService on its own thread, against a Bus's topology; without
    a policy, the single-user one of the bus's URL."""

    def __init__(self, bus, **settings):
        import threading

        from router.service import RouterService, RouterSettings
        if "policy" not in settings:
            settings["policy"] = single_user_policy(bus.url)
        self.service = RouterService(RouterSettings(
            transport_url=bus.url, topology=bus.topology, **settings))
        self.thread = threading.Thread(target=self.service.run, daemon=True,
                                       name="router")
        self.thread.start()
        if not self.service.ready.wait(15):
            raise RuntimeError("router did not start consuming within 15s")

    def stop(self, timeout=20):
        self.service.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "router did not stop"


def routed_bus(hosts, add_cleanup):
    """A Bus of the test's own with the central topology, these hosts'
    entities and a running router; add_cleanup (unittest's addCleanup)
    takes both down again. For test classes that cannot use fixtures."""
    bus = Bus(BROKER_URL)
    add_cleanup(bus.cleanup)
    bus.declare_central()
    for host in hosts:
        bus.declare_host(host)
    router = RunningRouter(bus)
    add_cleanup(router.stop)
    return bus, router


@pytest.fixture
def router(bus):
    """The router service running in-process on the test's bus."""
    bus.declare_central()
    r = RunningRouter(bus)
    try:
        yield r
    finally:
        r.stop()


def collect(url, queue_name, count, timeout=15.0, *, ack=True, until=None):
    """Consume up to `count` messages from a queue, waiting at most `timeout`.

    Returns kombu Messages, each acked as it arrives unless ack=False (then
    they go back to the queue when this returns); fewer than `count` means
    the deadline passed first. `until(got)`, if given, ends the wait instead
    of the count.
    """
    import time

    got = []
    done = until or (lambda got: len(got) >= count)

    def take(message):
        got.append(message)
        if ack:
            message.ack()

    with reading_connection(url) as conn:
        ch = conn.channel()
        queue = kombu.Queue(queue_name, no_declare=True)
        consumer = kombu.Consumer(ch, [queue], on_message=take, accept=None)
        consumer.qos(prefetch_count=200 if ack else max(1, min(count, 65535)))
        with consumer:
            deadline = time.monotonic() + timeout
            while not done(got):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    conn.drain_events(timeout=min(remaining, 0.5))
                except socket.timeout:
                    pass
    return got


def collect_ids(url, queue_name, ids, timeout=15.0):
    """Consume until a message with each of `ids` (AMQP message_id) came,
    at most `timeout`. Returns every message taken, duplicates included:
    after a channel or connection fault a copy may legitimately arrive
    twice (at-least-once), so counting copies cannot tell when all came."""
    want = set(ids)
    return collect(url, queue_name, None, timeout, until=lambda got: want
                   <= {m.properties.get("message_id") for m in got})


def queue_depth(url, queue_name):
    with kombu.Connection(url) as conn:
        return conn.channel().queue_declare(queue_name, passive=True).message_count


def wait_for(predicate, timeout=15.0, interval=0.02, what="condition"):
    """Poll a condition until true; fail with `what` after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def skip_stage_unless_asked(config, items, marker, env_var, reason):
    """A CI stage's tests run only when `-m` names the stage's marker, or
    env_var=1; in the main run they show as skipped with the way to run them."""
    if (marker in (config.getoption("markexpr") or "")
            or os.environ.get(env_var) == "1"):
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(marker):
            item.add_marker(skip)


def pytest_collection_modifyitems(config, items):
    # Tests that restart RabbitMQ or libvirtd go last, so they cannot break
    # tests that share the broker.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


# --- fault-scenario counts, printed at the end of the run ---------------------

FAULT_REPORT = []


def report_fault(scenario, **counts):
    """Record a fault scenario's counts for the summary (and print them)."""
    line = f"{scenario}: " + " ".join(f"{k}={v}" for k, v in counts.items())
    FAULT_REPORT.append(line)
    print("\nFAULT " + line)


def pytest_terminal_summary(terminalreporter):
    if FAULT_REPORT:
        terminalreporter.section("fault injection: counts per scenario")
        for line in FAULT_REPORT:
            terminalreporter.write_line(line)
