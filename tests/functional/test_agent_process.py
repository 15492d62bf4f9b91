"""The lifecycle agent as a process: `evrouter agent`, and under eventlet."""

import os
import signal
import subprocess
import sys

import pytest

from router.bus import contract
from tests.conftest import wait_for
from tests.functional.test_router_ops import free_port, get, metric

pytestmark = pytest.mark.timeout(60)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# The domain libvirt's test:///default driver starts with, running.
DEFAULT_TEST_DOMAIN = "6695eb01-f6a4-8304-79aa-97f2502e193f"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_agent_announces_and_stops_cleanly_on_sigterm(bus, listener,
                                                          tmp_path):
    health = tmp_path / "health"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "agent",
         "--libvirt-uri", "test:///default", "--host", "compute-cli",
         "--transport-url", bus.url, "--bus-prefix", bus.prefix,
         "--agent-health_file", str(health),
         "--agent-ops_listen", f"127.0.0.1:{port}"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        entry = listener.wait_snapshot(DEFAULT_TEST_DOMAIN)
        assert (entry.host, entry.transition) == ("compute-cli", "STARTED")
        assert listener.envelopes()[0].kind == contract.HOST_SNAPSHOT
        assert entry.seq == 1
        wait_for(lambda: health.exists() and
                 health.read_text().startswith("ok"), what="health file ok")
        status, body = get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200 and "libvirt up, broker up" in body
        _, text = get(f"http://127.0.0.1:{port}/metrics")
        assert metric(text, "evrouter_agent_healthy") == 1
        assert metric(text, "evrouter_agent_published_total") >= 1, \
            "the snapshot confirmed"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "lifecycle agent for host compute-cli stopped" in output, output
    assert health.read_text().startswith("unhealthy: libvirt stopped")


def test_cli_agent_refuses_a_bad_host_name(bus):
    proc = subprocess.run(
        [sys.executable, "-m", "router.cli", "agent", "--host", "no spaces",
         "--libvirt-uri", "test:///default"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "not a valid host name" in proc.stderr


EVENTLET_AGENT = r"""
import eventlet
eventlet.monkey_patch()

import sys
import time

import libvirt

from compute.agent import AgentSettings, LifecycleAgent
from router.bus.topology import Topology
from tests.functional.agent_harness import domain_xml

url, prefix = sys.argv[1:]
agent = LifecycleAgent(AgentSettings(
    host="compute-green", libvirt_uri="test:///default", transport_url=url,
    topology=Topology(prefix=prefix), stopped_delay=0.3, reconnect_max=0.2))

# A green thread that notices when the hub is blocked.
gaps = [0.0]
def ticker():
    last = time.monotonic()
    while True:
        eventlet.sleep(0.01)
        now = time.monotonic()
        gaps[0] = max(gaps[0], now - last)
        last = now
eventlet.spawn(ticker)

def wait(condition, what, timeout=15):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what} ({agent.health})")
        eventlet.sleep(0.01)

runner = eventlet.spawn(agent.run)
wait(lambda: agent.healthy and agent.published >= 1, "the snapshot")
conn = libvirt.open("test:///default")
dom = conn.defineXML(domain_xml("evt-green"))
print(dom.UUIDString(), flush=True)
dom.create()
dom.destroy()
# DEFINED, STARTED and, after its delay, STOPPED
wait(lambda: agent.published >= 4, "three events published")
agent.stop()
runner.wait()
print(f"longest hub stall {gaps[0]:.3f}s", flush=True)
assert gaps[0] < 0.5, gaps[0]
"""


def test_agent_runs_under_eventlet(bus, listener):
    proc = subprocess.run(
        [sys.executable, "-c", EVENTLET_AGENT, bus.url, bus.prefix],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uid = proc.stdout.split()[0]
    listener.wait_transitions(uid, ["DEFINED", "STARTED", "STOPPED"])
    assert listener.wait_snapshot(DEFAULT_TEST_DOMAIN).host == "compute-green"
