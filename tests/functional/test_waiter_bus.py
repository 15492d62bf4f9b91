"""Waiters fed by the bus: publisher → ingress → router → host exchange →
HostConsumer → registry → waiting thread, on the real broker.
"""

import threading
import time

import pytest

from compute import waiting
from router.bus.contract import FAILED, NETWORK_CHANGED, VIF_PLUGGED
from tests.functional.waiter_harness import (
    HostEvents,
    new_uuid,
    publish_with_kombu,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def host(bus, router):
    h = HostEvents(bus)
    try:
        yield h
    finally:
        h.stop()


def test_waiter_woken_by_a_plain_kombu_publish_through_the_router(host, bus,
                                                                  router):
    server = new_uuid()
    env = host.event(server, VIF_PLUGGED, "port-1")
    started = time.monotonic()
    with host.registry.wait_for_instance_event(
            server, [(VIF_PLUGGED, "port-1")], deadline=20) as w:
        publish_with_kombu(bus, env)
    assert time.monotonic() - started < 10
    assert host.registry.stats["delivered"] == 1
    # The router counts a copy when the broker confirms it, maybe after
    # the waiter already woke.
    wait_until(lambda: router.service.stats["out"] == 1, 5, "the confirm")
    assert w.expected == [(VIF_PLUGGED, "port-1")]
    wait_until(lambda: host.consumer.stats["delivered"] == 1, 5, "the ack")
    host.stop()     # anything unacknowledged would be back in the queue
    assert host.queue_depth() == 0


def test_early_event_satisfies_a_later_prepare(host, publisher):
    server = new_uuid()
    publisher.to_ingress(host.event(server, NETWORK_CHANGED))
    wait_until(lambda: host.registry.held == 1, 10, "the event held")
    started = time.monotonic()
    # A deadline far shorter than any bus round trip: only the held event
    # can satisfy this.
    with host.registry.wait_for_instance_event(server, [NETWORK_CHANGED], 0.05):
        pass
    assert time.monotonic() - started < 1
    assert host.registry.stats["early_used"] == 1


def test_duplicate_message_wakes_once_and_is_not_held(host, publisher):
    server = new_uuid()
    env = host.event(server, VIF_PLUGGED, "port-1")
    with host.registry.wait_for_instance_event(
            server, [(VIF_PLUGGED, "port-1")], deadline=20):
        publisher.to_ingress(env)
        publisher.to_ingress(env)       # same envelope, same message id
    wait_until(lambda: host.consumer.stats["duplicate"] == 1, 10,
               "the second copy processed")
    assert host.registry.stats["delivered"] == 1
    assert host.registry.held == 0
    # Had the copy been held, this prepare would be satisfied at once.
    with pytest.raises(waiting.InstanceEventTimeout, match="still missing"):
        with host.registry.wait_for_instance_event(
                server, [(VIF_PLUGGED, "port-1")], deadline=0.2):
            pass


def test_failed_status_goes_to_the_callback_once(host, publisher):
    server = new_uuid()
    calls = []
    failed = host.event(server, VIF_PLUGGED, "port-1", status=FAILED)
    with host.registry.wait_for_instance_event(
            server, [(VIF_PLUGGED, "port-1"), (VIF_PLUGGED, "port-2")],
            deadline=20,
            error_callback=lambda name, inst: calls.append(name) or True):
        publisher.to_ingress(failed)
        publisher.to_ingress(failed)    # a redelivery must not call it again
        publisher.to_ingress(host.event(server, VIF_PLUGGED, "port-2"))
    wait_until(lambda: host.consumer.stats["duplicate"] == 1, 10)
    assert calls == [(VIF_PLUGGED, "port-1")]


def test_failed_status_without_callback_raises(host, publisher):
    server = new_uuid()
    with pytest.raises(waiting.InstanceEventFailed, match="port-1.*failed"):
        with host.registry.wait_for_instance_event(
                server, [(VIF_PLUGGED, "port-1")], deadline=20):
            publisher.to_ingress(host.event(server, VIF_PLUGGED, "port-1",
                                            status=FAILED))


def test_failed_status_callback_false_stops_waiting(host, publisher):
    server = new_uuid()
    started = time.monotonic()
    with host.registry.wait_for_instance_event(
            server, [(VIF_PLUGGED, "port-1"), (VIF_PLUGGED, "never")],
            deadline=30, error_callback=lambda name, inst: False):
        publisher.to_ingress(host.event(server, VIF_PLUGGED, "port-1",
                                        status=FAILED))
    assert time.monotonic() - started < 10


def test_timeout_reports_received_missing_and_early(host, publisher):
    server = new_uuid()
    publisher.to_ingress(host.event(server, NETWORK_CHANGED))
    wait_until(lambda: host.registry.held == 1, 10)
    expected = [(VIF_PLUGGED, "port-1"), (VIF_PLUGGED, "port-2"),
                (NETWORK_CHANGED, None)]
    with pytest.raises(waiting.InstanceEventTimeout) as err:
        with host.registry.wait_for_instance_event(server, expected,
                                                   deadline=0.5):
            publisher.to_ingress(host.event(server, VIF_PLUGGED, "port-1"))
            # However slow the bus, port-1 is in before the deadline starts.
            wait_until(lambda: host.registry.stats["delivered"] == 1, 10)
    states = {(n, t): s for n, t, s in err.value.states}
    assert states[(VIF_PLUGGED, "port-1")].startswith("received after ")
    assert states[(VIF_PLUGGED, "port-2")] == "still missing"
    assert states[(NETWORK_CHANGED, None)] == "received early (completed)"
    assert host.registry.pending == 0


def test_shutdown_cancels_every_waiter_and_leaves_later_events_queued(
        host, publisher):
    servers = [new_uuid() for _ in range(5)]
    outcomes = []

    def wait(server):
        try:
            with host.registry.wait_for_instance_event(
                    server, [(VIF_PLUGGED, "port-1")], deadline=30):
                pass
        except waiting.InstanceEventFailed as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=wait, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    wait_until(lambda: host.registry.pending == 5, 10)
    host.registry.cancel_all()
    for t in threads:
        t.join(5)
    assert len(outcomes) == 5
    assert all("shutting down" in str(exc) for exc in outcomes)
    # An event arriving now belongs to the next process: it stays queued
    # and the consumer stops rather than spin on it.
    publisher.to_ingress(host.event(servers[0], VIF_PLUGGED, "port-1"))
    host.thread.join(15)
    assert not host.thread.is_alive()
    wait_until(lambda: host.queue_depth() == 1, 10, "the event requeued")
