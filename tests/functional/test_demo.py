"""`evrouter demo`, as the README tells a newcomer to run it."""

import json
import re
import subprocess
import sys

import kombu
import pytest

from router import journal

RABBITMQ = "rabbit://guest:guest@127.0.0.1:5672/"
HOPS = ["published", "routed", "delivered", "matched"]


def demo(*args):
    cmd = [sys.executable, "-m", "router.cli", "demo", "--instances", "4", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout


@pytest.mark.parametrize("url", [None, RABBITMQ], ids=["memory", "rabbitmq"])
def test_demo_tells_the_whole_story(url):
    text = demo(*(["--transport-url", url] if url else []))
    for step in range(1, 6):
        assert f"step {step}/5" in text
    # four boots, each woken by its own network-vif-plugged, then resumed
    assert len(re.findall(r"vm-\d resumed: network-vif-plugged received", text)) == 4
    assert "STOPPED events on the fanout during the reboot: 0" in text
    assert "placement of vm-1 during the migration: cmp-a, cmp-b" in text
    assert "placement of vm-1 after the migration: cmp-b" in text
    assert "network-changed for vm-1 reached its new host" in text
    rows = re.findall(r"^  network-\S+\s+\S{8}\s+cmp-[ab]\s+([\d.]+)$", text, re.M)
    assert len(rows) == 5, text
    if url is None:
        assert "the journal: off on memory://" in text
        return
    # Over RabbitMQ every part writes the journal: vm-1's two events, each
    # from the network side to its waiter (the second to its new host).
    trace = re.findall(r"^  \S+ \S+  (\S+)\s+(\S+) .* msg \S+  (\S+) \S+  (.*)$",
                       text, re.M)
    assert [(hop, svc, event) for hop, svc, event, _ in trace] == [
        ("published", "publisher:demo-network", "network-vif-plugged"),
        ("routed", "router:demo-router", "network-vif-plugged"),
        ("delivered", "host:cmp-a", "network-vif-plugged"),
        ("matched", "host:cmp-a", "network-vif-plugged"),
        ("published", "publisher:demo-network", "network-changed"),
        ("routed", "router:demo-router", "network-changed"),
        ("delivered", "host:cmp-b", "network-changed"),
        ("matched", "host:cmp-b", "network-changed")], text
    assert [detail for hop, _, _, detail in trace if hop == "matched"] == [
        "woken", "woken"]
    assert re.search(r"^  # 8 hop\(s\) for ", text, re.M), text


def test_a_kept_demo_journal_is_read_by_evrouter_trace():
    """--keep-journal: `evrouter trace` (a process of its own, after the
    demo ended and deleted the rest) shows every hop of vm-1's port."""
    text = demo("--transport-url", RABBITMQ, "--keep-journal")
    prefix = re.search(r"topology prefix (demo-[0-9a-f]{8})", text)[1]
    name = journal.stream_name(prefix)
    try:
        assert f"kept {name} (stream and exchange)" in text
        port = re.search(r"vm-1 created paused, VIF (port-[0-9a-f]{8}) plugged",
                         text)[1]
        done = subprocess.run(
            [sys.executable, "-m", "router.cli", "trace", port, "--json",
             "--since", "10m", "--transport-url", RABBITMQ, "--bus-prefix", prefix],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        hops = [json.loads(line) for line in done.stdout.splitlines()]
        assert [h["hop"] for h in hops] == HOPS * 2, hops
        assert {h["port"] for h in hops} == {port}
        assert [h["node"] for h in hops] and all(h["user"] == "guest" for h in hops)
        # the rest of the demo's topology is gone
        with kombu.Connection(RABBITMQ.replace("rabbit://", "amqp://")) as conn:
            with pytest.raises(conn.channel_errors):
                conn.channel().queue_declare(f"{prefix}.router", passive=True)
    finally:
        with kombu.Connection(RABBITMQ.replace("rabbit://", "amqp://")) as conn:
            conn.channel().queue_delete(name)
            conn.channel().exchange_delete(name)
