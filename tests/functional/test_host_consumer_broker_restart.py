"""RabbitMQ restarts under a waiting compute host: the consumer reconnects,
the wait in progress keeps its deadline, nothing published is lost.

Disruptive: restarts the broker's app, so it runs last (tests/conftest.py).
"""

import subprocess
import threading
import time

import pytest

from router.bus import contract
from router.bus.contract import VIF_PLUGGED
from tests.conftest import broker_reachable
from tests.functional.waiter_harness import (
    HostEvents,
    Publisher,
    new_uuid,
    wait_until,
)

pytestmark = [pytest.mark.disruptive, pytest.mark.timeout(240)]


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,
                   timeout=120)


def test_waiter_survives_a_broker_restart(bus):
    host = HostEvents(bus)
    server = new_uuid()
    expected = [(VIF_PLUGGED, tag) for tag in ("before", "outage", "after")]
    outcome = []

    def wait():
        started = time.monotonic()
        try:
            with host.registry.wait_for_instance_event(server, expected, 120):
                pass
            outcome.append(("completed", time.monotonic() - started))
        except Exception as exc:
            outcome.append((exc, time.monotonic() - started))

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        wait_until(lambda: host.registry.pending == 3, 10)
        publisher = Publisher(bus)
        env = host.event(server, VIF_PLUGGED, "before")
        publisher.to_host(host.host, contract.encode(env), message_id=env.id)
        wait_until(lambda: host.registry.stats["delivered"] == 1, 10)
        publisher.close()
        bus.conn.release()
        rabbitmqctl("stop_app")
        try:
            wait_until(lambda: not host.consumer.ready.is_set(), 30,
                       "the consumer noticing the broker is gone")
        finally:
            rabbitmqctl("start_app")
        wait_until(broker_reachable, 60, "the broker back")
        # Published as soon as the broker is back, likely while the consumer
        # is still in its backoff: the durable queue keeps it.
        publisher = Publisher(bus)
        env = host.event(server, VIF_PLUGGED, "outage")
        publisher.to_host(host.host, contract.encode(env), message_id=env.id)
        wait_until(host.consumer.ready.is_set, 60, "the consumer reconnected")
        env = host.event(server, VIF_PLUGGED, "after")
        publisher.to_host(host.host, contract.encode(env), message_id=env.id)
        waiter.join(60)
        publisher.close()
        assert outcome and outcome[0][0] == "completed", outcome
        assert outcome[0][1] < 120
        assert host.registry.stats["delivered"] == 3
        assert host.consumer.stats["reconnects"] >= 1
    finally:
        host.stop()
        waiter.join(5)
