"""`evrouter demo`, as the README tells a newcomer to run it."""

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("url", [None, "rabbit://guest:guest@127.0.0.1:5672/"],
                         ids=["memory", "rabbitmq"])
def test_demo_tells_the_whole_story(url):
    cmd = [sys.executable, "-m", "router.cli", "demo", "--instances", "4"]
    if url:
        cmd += ["--transport-url", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
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
    assert "Traceback" not in out.stderr
