"""The operators' pictures: deploy/grafana/evrouter-dashboard.json and
deploy/prometheus/ (alert rules, their promtool tests, a scrape config).

Every metric they query is one the router or the agent exposes (asked of
the collectors themselves, not copied from them), and promtool, where it is
installed (.ci/compose unpacks it from Debian's prometheus package), checks
the rules, runs their unit tests and checks the configuration.
"""

import collections
import json
import pathlib
import re
import shutil
import subprocess
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from compute.agent_metrics import AgentCollector
from router.metrics import LatencyHistogram, RouterCollector

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "evrouter-dashboard.json"
METRIC = re.compile(r"\b(evrouter_[a-z_]+)")


def exposed():
    """Every sample name the router's and the agent's /metrics serve."""
    router = type("Router", (), {
        "stats": collections.Counter({"in": 1, "dead_lettered:malformed": 1,
                                      "dropped:malformed": 1,
                                      "forbidden:host-snapshot": 1}),
        "latency": LatencyHistogram(), "placement": {}, "ready": threading.Event(),
        "journal": type("Journal", (), {"stats": collections.Counter()})(),
        "stuck": type("Stuck", (), {
            "seen": 1, "current": lambda self: 1, "stats": {"failures": 1},
            "waits": type("Waits", (), {"refused": 1})()})()})
    agent = type("Agent", (), {"stats": collections.Counter(), "published": 0,
                               "held": 0, "outbox": [], "healthy": True})
    registry = CollectorRegistry()
    registry.register(RouterCollector(router()))
    registry.register(AgentCollector(agent()))
    text = generate_latest(registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs():
    import yaml
    rules = yaml.safe_load((PROMETHEUS / "evrouter-alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def test_the_dashboard_shows_only_metrics_that_exist():
    names = exposed()
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert used <= names, used - names
    # every metric of both services is on the dashboard
    assert {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            for n in names} <= {n.removesuffix("_bucket").removesuffix("_sum")
                                .removesuffix("_count") for n in used}
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_the_alerts_cover_what_operators_asked_for():
    exprs = rule_exprs()
    assert {"EvrouterRouterDown", "EvrouterNoRouter", "EvrouterDeadLetterRate",
            "EvrouterStoppedHeldTooLong", "EvrouterAgentOutboxFilling",
            "EvrouterBrokerUnreachable", "EvrouterStuckWaits"} <= set(exprs)
    used = {m for e in exprs.values() for m in METRIC.findall(e)}
    assert used <= exposed(), used - exposed()


def promtool(*args):
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (.ci/compose installs it)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60,
                          cwd=PROMETHEUS)


@pytest.mark.parametrize("args", [
    ("check", "rules", "evrouter-alerts.yml"),
    ("test", "rules", "evrouter-alerts.test.yml"),
    ("check", "config", "prometheus.yml"),
], ids=["check-rules", "test-rules", "check-config"])
def test_promtool(args):
    done = promtool(*args)
    assert done.returncode == 0, done.stdout + done.stderr
