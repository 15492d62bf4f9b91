"""RabbitMQ restarts under a running router: it reconnects, nothing is lost."""

import subprocess
import uuid

import pytest

from router.bus import contract
from tests.conftest import RunningRouter, broker_reachable, collect, wait_for
from tests.functional.test_router import publish_env

pytestmark = pytest.mark.disruptive


def rabbitmqctl(*args):
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,
                   timeout=120)


def test_router_reconnects_after_a_broker_restart(bus):
    bus.declare_central()
    bus.declare_host("cmp-r")
    r = RunningRouter(bus)
    try:
        before = contract.envelope(contract.InstanceEvent(
            "network-vif-plugged", str(uuid.uuid4()), "p1", host="cmp-r"), "t")
        publish_env(bus, before)
        assert len(collect(bus.url, bus.topology.host_queue_name("cmp-r"), 1)) == 1
        bus.conn.release()
        rabbitmqctl("stop_app")
        try:
            wait_for(lambda: not r.service.ready.is_set(), timeout=30,
                     what="router noticing the broker is gone")
        finally:
            rabbitmqctl("start_app")
        wait_for(broker_reachable, timeout=60, what="broker back")
        wait_for(r.service.ready.is_set, timeout=60, what="router reconnected")
        after = [contract.envelope(contract.InstanceEvent(
            "network-vif-plugged", str(uuid.uuid4()), f"p{i}", host="cmp-r"), "t")
            for i in range(50)]
        for env in after:
            publish_env(bus, env)
        got = collect(bus.url, bus.topology.host_queue_name("cmp-r"), 50, timeout=30)
        assert {contract.decode(m.body).id for m in got} == {e.id for e in after}
        assert r.thread.is_alive()
    finally:
        r.stop()
