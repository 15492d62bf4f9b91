"""The host consumer on the real broker: poison, connection loss, outages,
acknowledging only what the registry recorded.
"""

import json
import socket
import subprocess
import threading

import pytest

from compute import events
from router.bus import contract
from router.bus.contract import VIF_PLUGGED
from tests.functional.waiter_harness import (
    HostEvents,
    get_dead_letter,
    new_uuid,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

PLUG = (VIF_PLUGGED, "port-1")


def _header(message, name):
    value = message.headers.get(name)
    return value.decode() if isinstance(value, bytes) else value


def _assert_all_acknowledged(host):
    # Stopping closes the connection, which puts anything unacknowledged
    # back to ready: an empty queue afterwards means every message was
    # acknowledged (or rejected), not merely delivered.
    host.stop()
    assert host.queue_depth() == 0


def _to_host(publisher, host, env):
    publisher.to_host(host.host, contract.encode(env), message_id=env.id)


def test_malformed_messages_are_dead_lettered_and_the_next_flows(
        bus, host, publisher):
    server = new_uuid()
    lifecycle = contract.envelope(contract.LifecycleEvent(
        server, host.host, "STARTED", 2, 0, 1), "test")
    wrong_schema = json.dumps({"version": "1.0", "id": "bad-1"}).encode()
    with host.registry.wait_for_instance_event(server, [PLUG], 20):
        publisher.to_host(host.host, b"\xff not json {", message_id="junk-1")
        publisher.to_host(host.host, wrong_schema, message_id="bad-1")
        _to_host(publisher, host, lifecycle)
        _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1"))
    seen = []
    for _ in range(3):
        message = get_dead_letter(bus)
        seen.append((message.properties.get("message_id"),
                     _header(message, contract.HEADER_REASON),
                     _header(message, "x-evrouter-host")))
        assert _header(message, contract.HEADER_DETAIL)
    assert seen == [("junk-1", contract.REASON_MALFORMED, host.host),
                    ("bad-1", contract.REASON_INVALID, host.host),
                    (lifecycle.id, contract.REASON_INVALID, host.host)]
    wait_until(lambda: host.consumer.stats["dead_lettered"] == 3, 5)
    assert host.consumer.stats["delivered"] == 1
    _assert_all_acknowledged(host)


def test_too_large_body_is_dead_lettered(bus, publisher):
    bus.declare_central()
    host = HostEvents(bus, max_body_bytes=1024)
    try:
        publisher.to_host(host.host, b"{" + b" " * 2000 + b"}",
                          message_id="huge-1")
        message = get_dead_letter(bus)
        assert _header(message, contract.HEADER_REASON) == \
            contract.REASON_TOO_LARGE
        wait_until(lambda: host.consumer.stats["dead_lettered"] == 1, 5)
        _assert_all_acknowledged(host)
    finally:
        host.stop()


def test_without_a_dead_letter_queue_poison_is_rejected_not_looped(
        bus, publisher):
    # No central topology: no dead-letter exchange.
    host = HostEvents(bus, dead_letter_patience=1.0)
    try:
        server = new_uuid()
        with host.registry.wait_for_instance_event(server, [PLUG], 20):
            publisher.to_host(host.host, b"junk", message_id="junk-2")
            _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1"))
        # Each copy is tried (the exchange may appear): refused for the
        # patience, then dropped (and acknowledged).
        wait_until(lambda: host.consumer.stats["dropped:malformed"] == 1, 5)
        assert host.consumer.stats["dead_lettered"] == 0
        _assert_all_acknowledged(host)
    finally:
        host.stop()


class _GreenTimeout(BaseException):
    """As eventlet.Timeout: a BaseException the embedding service's code
    can let out of the delivery callback."""


@pytest.mark.parametrize("error", [RuntimeError, _GreenTimeout])
def test_a_failing_registry_dead_letters_the_message_and_consumes_on(bus,
                                                                     publisher,
                                                                     error):
    bus.declare_central()
    calls = []

    def deliver(event, message_id):
        calls.append(message_id)
        if len(calls) == 1:
            raise error("registry bug")
        return host.registry.deliver(event, message_id)

    host = HostEvents(bus, deliver=deliver)
    try:
        server = new_uuid()
        first = host.event(server, VIF_PLUGGED, "port-0")
        with host.registry.wait_for_instance_event(server, [PLUG], 20):
            _to_host(publisher, host, first)
            _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1"))
        message = get_dead_letter(bus)
        assert message.properties.get("message_id") == first.id
        assert contract.dead_letter_reason(message.headers) == contract.REASON_INTERNAL
        assert "registry bug" in _header(message, contract.HEADER_DETAIL)
        assert host.consumer.stats["deliver_errors"] == 1
        wait_until(lambda: host.consumer.stats["delivered"] == 1, 5)
        _assert_all_acknowledged(host)
        assert host.consumer.stats["failures"] == 0     # one message, not the host
    finally:
        host.stop()


def _kill_socket(consumer):
    consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)


def test_connection_loss_reconnects_and_the_wait_keeps_its_deadline(
        host, publisher):
    server = new_uuid()
    old = host.consumer.connection
    with host.registry.wait_for_instance_event(server, [PLUG], 20):
        _kill_socket(host.consumer)
        # Published while the consumer is reconnecting: the durable queue
        # keeps it.
        _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1"))
    assert host.consumer.stats["reconnects"] >= 1
    assert host.consumer.connection is not old
    assert host.registry.stats["delivered"] == 1


def _broker_connection_name(conn):
    # RabbitMQ names a connection after the client and server addresses.
    local = conn.connection.sock.getsockname()
    remote = conn.connection.sock.getpeername()
    return f"{local[0]}:{local[1]} -> {remote[0]}:{remote[1]}"


def _close_on_the_broker(conn):
    """Close exactly this connection from the broker's side."""
    name = _broker_connection_name(conn)
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "name", "--quiet",
         "--no-table-headers"], check=True, capture_output=True, text=True,
        timeout=30).stdout
    pids = [line.split("\t", 1)[0] for line in listed.splitlines()
            if line.split("\t", 1)[-1] == name]
    assert len(pids) == 1, f"connection {name!r} not listed by the broker"
    subprocess.run(["rabbitmqctl", "close_connection", pids[0],
                    "evrouter functional test"], check=True,
                   capture_output=True, timeout=30)


def test_broker_closing_the_connection_is_survived(host, publisher):
    server = new_uuid()
    old = host.consumer.connection
    with host.registry.wait_for_instance_event(server, [PLUG], 30):
        # connection-forced, as in a broker restart, for this consumer only.
        _close_on_the_broker(old)
        _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1"))
    assert host.consumer.stats["reconnects"] >= 1
    assert host.consumer.connection is not old


def test_events_published_while_no_consumer_runs_are_not_lost(
        bus, router, publisher):
    host = HostEvents(bus)
    server = new_uuid()
    expected = [(VIF_PLUGGED, f"port-{i}") for i in range(3)]
    waited = []

    def wait():
        with host.registry.wait_for_instance_event(server, expected, 30):
            pass
        waited.append(True)

    try:
        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_until(lambda: host.registry.pending == 3, 10)
        host.stop()
        for _, tag in expected:
            publisher.to_ingress(host.event(server, VIF_PLUGGED, tag))
        wait_until(lambda: host.queue_depth() == 3, 10, "events queued")
        assert waited == []
        host.start()        # a new consumer on the same durable queue
        waiter.join(20)
        assert waited == [True]
        assert host.registry.stats["delivered"] == 3
    finally:
        host.stop()


def test_recorded_but_unacknowledged_event_comes_back_as_a_duplicate(
        bus, publisher):
    """The connection dies between recording an event and acking it."""
    outcomes = []

    def deliver(event, message_id):
        outcome = host.registry.deliver(event, message_id)
        outcomes.append(outcome)
        if len(outcomes) == 1:
            _kill_socket(host.consumer)     # the ack after this cannot go out
        return outcome

    host = HostEvents(bus, deliver=deliver)
    try:
        server = new_uuid()
        wakes = []
        with host.registry.wait_for_instance_event(
                server, [PLUG], 20,
                error_callback=lambda n, i: wakes.append(n)):
            _to_host(publisher, host, host.event(server, VIF_PLUGGED, "port-1",
                                                 status=contract.FAILED))
        wait_until(lambda: outcomes == [events.DELIVERED, events.DUPLICATE],
                   15, "the redelivery")
        assert wakes == [PLUG]
        assert host.consumer.stats["reconnects"] >= 1
        wait_until(lambda: host.consumer.stats["duplicate"] == 1, 5)
        assert host.registry.held == 0
    finally:
        host.stop()
    assert host.queue_depth() == 0
