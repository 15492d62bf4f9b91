"""The router's operations endpoint, scraped over real HTTP."""

import json
import signal
import socket
import urllib.error
import urllib.request
import uuid

from router.bus import contract
from tests.conftest import wait_for
from tests.functional.test_router import publish_env, publish_raw
from tests.functional.test_router_process import consumers, start_router, stop


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return None, ""


def metric(text, name):
    """The value of one sample (name with its labels) in exposition text."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return None


def test_metrics_and_health_follow_what_the_router_does(bus):
    bus.declare_central()
    bus.declare_host("cmp-m")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_router(bus, "r-ops", ops_listen=f"127.0.0.1:{port}")
    try:
        wait_for(lambda: consumers(bus) == 1, what="router consuming")
        status, body = get(base + "/healthz")
        assert status == 200 and json.loads(body)["healthy"] is True
        publish_env(bus, contract.envelope(contract.InstanceEvent(
            "network-vif-plugged", str(uuid.uuid4()), "p", host="cmp-m"), "t"))
        publish_raw(bus, b"{nope", message_id="bad")

        def scraped():
            _, text = get(base + "/metrics")
            done = (metric(text, "evrouter_router_events_out_total") == 1
                    and metric(text, 'evrouter_router_dead_lettered_total'
                                     '{reason="malformed"}') == 1
                    and metric(text, "evrouter_router_routing_latency_seconds_count") == 2)
            return text if done else None
        text = wait_for(scraped, what="metrics to count one routed, one dead-lettered")
        assert metric(text, "evrouter_router_events_in_total") == 2
        assert metric(text, "evrouter_router_routing_latency_seconds_count") == 2
        assert metric(text, "evrouter_router_connected") == 1
        assert get(base + "/nothing")[0] == 404
    finally:
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0, out


def test_health_is_unhealthy_without_a_broker():
    port = free_port()
    import subprocess
    import sys
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "router", "--transport-url",
         "rabbit://guest:guest@127.0.0.1:1/", "--router-ops_listen",
         f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        status, body = wait_for(lambda: (lambda r: r if r[0] else None)(
            get(f"http://127.0.0.1:{port}/healthz")), what="ops endpoint up")
        assert status == 503
        detail = json.loads(body)["detail"]
        assert "not connected" in detail or "cannot connect" in detail, detail
    finally:
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0, out
    assert "could not connect" in out and "reconnect attempt" in out, \
        "the retries are logged"
