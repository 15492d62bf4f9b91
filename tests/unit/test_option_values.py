"""Options checked when a service starts, not found per event. Every float
option of every evrouter service and command refuses nan and inf:
oslo.config's Float takes "nan" past any min and max (each comparison with
it is false), and a delay of nan then quietly switches its feature off
(`delay > 0` is false) while the service starts as if configured. And the
producer option holds what the contract takes as free text."""

import contextlib
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from oslo_config import types

from router import options

REPO = pathlib.Path(__file__).resolve().parents[2]
EVROUTER = os.path.join(os.path.dirname(sys.executable), "evrouter")


def test_no_float_option_is_declared_without_the_finite_type():
    # The class, not the one option a review tried: a cfg.FloatOpt (or a
    # bare types.Float) anywhere in the services would take nan again.
    offenders = [str(p.relative_to(REPO)) for top in ("router", "compute", "network")
                 for p in (REPO / top).rglob("*.py")
                 if "cfg.FloatOpt(" in p.read_text() or "types.Float(" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "1e10"])
def test_the_finite_type_refuses_what_is_not_a_number(value):
    with pytest.raises(ValueError):
        options.FiniteFloat(min=0)(value)


def test_the_finite_type_is_still_oslos_float():
    t = options.FiniteFloat(min=0.1, max=60)
    assert isinstance(t, types.Float) and t("2.5") == 2.5
    with pytest.raises(ValueError):
        t("0")
    assert not math.isnan(options.FloatOpt("x", default=1.0).type("1"))


@pytest.mark.parametrize("name, argv", [
    ("stopped_delay", ["agent", "--host", "cmp-1", "--agent-stopped_delay", "nan"]),
    ("snapshot_interval", ["agent", "--host", "cmp-1", "--agent-snapshot_interval", "inf"]),
    ("no_host_timeout", ["router", "--router-no_host_timeout", "nan"]),
    ("timeout", ["publish", "network-vif-plugged", "--timeout", "nan"]),
])
def test_a_service_given_nan_refuses_to_start(name, argv):
    run = subprocess.run([EVROUTER, *argv, "--transport-url", "memory://"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    # as every value oslo.config refuses: one line, before anything starts
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])
    assert run.stderr == (f"argument --{name}: Invalid FiniteFloat(min=0, max=1e+09) "
                          f"value: {argv[-1]}\n")


@pytest.mark.parametrize("producer", ["", "p" * 256, "net\nforged", "\x1b[31m"])
def test_a_producer_the_contract_would_refuse_is_refused_at_start(producer):
    # Checked once, by the option, not found per event: an adapter with an
    # empty producer requeued every notification for ever.
    run = subprocess.run([EVROUTER, "publish", "network-vif-plugged", "--server",
                          "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f", "--tag", "p",
                          "--network-producer", producer, "--transport-url", "memory://"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr[-2000:]
    assert run.stderr.startswith("argument --producer: Invalid String"), run.stderr


@contextlib.contextmanager
def _started(argv, until, *, stderr_apart=False):
    """`evrouter argv` running, its output read up to the line holding
    `until` (within 30 s): yields (process, what it said so far); killed
    at the end if still there."""
    proc = subprocess.Popen([EVROUTER, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT,
                            text=True)
    stream = proc.stderr if stderr_apart else proc.stdout
    try:
        said, deadline = "", time.monotonic() + 30
        while until not in said and time.monotonic() < deadline:
            line = stream.readline()
            if not line:
                break
            said += line
        assert until in said, said
        yield proc, said
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _evrouter(*argv, env=None):
    return subprocess.run([EVROUTER, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


# What a service could not use reached it as a traceback, or started it into
# a restart loop (a review found each): refused at start, one line, exit 2.
@pytest.mark.parametrize("argv, env, says", [
    (["router", "--transport-url", "rabbit://guest:guest@127.0.0.1:notaport/"], None,
     "transport URL: Port could not be cast"),
    (["router", "--transport-url", "rabbit://h:99999/"], None, "transport URL: Port out"),
    (["trace", "123", "--transport-url", "notaurl"], None, "transport URL: unsupported"),
    (["stuck", "--transport-url", "http://x/"], None, "transport URL: unsupported"),
    (["router", "--config-file", "/nonexistent.conf"], None,
     "configuration: Failed to find some config files"),
    (["router", "--config-dir", "/nonexistent"], None, "configuration: "),
    (["router", "--transport-url", "memory://"], {"OS_ROUTER__PREFETCH": "abc"},
     "configuration: Value for option prefetch"),
    (["topology", "--bus-prefix", "amq.x"], None, "bus prefix 'amq.x': RabbitMQ keeps"),
    (["permissions", "--bus-prefix", ""], None, "not a valid bus prefix: ''"),
    (["topology", "--bus-prefix", "p" * 250], None, "not a valid bus prefix"),
    (["network-adapter", "--transport-url", "memory://", "--network-spool_path",
      "/etc/passwd/x"], None, "[network] spool_path: "),
])
def test_what_a_service_cannot_use_is_refused_at_start_in_one_line(argv, env, says):
    run = _evrouter(*argv, env=env)
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr
    assert f"evrouter: {says}" in run.stderr, run.stderr[-3000:]


def test_a_malformed_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[bus\nprefix = x\n")
    run = _evrouter("router", "--config-file", str(bad))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "evrouter: configuration: Failed to parse" in run.stderr


@pytest.mark.parametrize("argv, says", [
    (["router", "--router-prefetch", "70000"], "argument --prefetch: Invalid Integer"),
    (["router", "--router-name", "r" * 101], "argument --name: Invalid String"),
    (["topology", "--journal-max_age", "garbage"], "argument --max_age: Invalid String"),
    (["topology", "--journal-max_age=-5h"], "argument --max_age: Invalid String"),
    (["topology", "--journal-max_age", "0s"], "argument --max_age: Invalid String"),
    (["agent", "--host", "h", "--agent-probe_interval", "1e10"],
     "argument --probe_interval: Invalid FiniteFloat"),
])
def test_values_past_what_the_protocol_or_a_timer_carries_are_refused(argv, says):
    # prefetch is an AMQP short, a router's name is in its queue's name
    # (255 bytes), a timer past threading's limit killed the agent's watcher
    run = _evrouter(*argv, "--transport-url", "memory://")
    assert run.returncode == 1 and run.stderr.startswith(says), run.stderr[-2000:]


def test_sighup_is_ignored_and_sigterm_still_stops():
    """Every service sets its signals through service_entry.stop_on_signals;
    SIGHUP's default action killed the router and the agent mid-delivery."""
    with _started(["router", "--transport-url", "memory://", "--router-ops_listen", ""],
                  " consuming ") as (proc, said):
        proc.send_signal(signal.SIGHUP)      # logrotate's habit
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(1.0)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, said + rest
        assert " stopped" in rest, rest


def test_the_network_adapter_stops_on_sigterm_while_its_notification_broker_is_away(
        tmp_path):
    """oslo.messaging retries the notification broker for ever on the main
    thread; SIGTERM was waited out (ten minutes in the review, then SIGKILL)."""
    with _started(["network-adapter", "--transport-url", "memory://",
                   "--network-spool_path", str(tmp_path / "spool"),
                   "--network_adapter-notification_transport_url",
                   "rabbit://guest:guest@127.0.0.1:1/"], "Connection failed") as (proc, said):
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, said + rest
        assert "stopped before its notification broker answered" in rest


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_publish_says_the_events_fate_when_stopped_while_waiting(signum):
    """SIGTERM killed `evrouter publish` with no outcome line; SIGINT gave a
    KeyboardInterrupt traceback, then 30 s in close()."""
    with _started(["publish", "network-vif-plugged", "--server",
                   "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f", "--tag", "p", "--message-id",
                   "m-1", "--transport-url", "amqp://guest:guest@127.0.0.1:1//",
                   "--timeout", "60"], "could not connect", stderr_apart=True) as (proc, said):
        sent = time.monotonic()
        proc.send_signal(getattr(signal, signum))
        out, rest = proc.communicate(timeout=10)
        assert time.monotonic() - sent < 5
        assert proc.returncode == 128 + getattr(signal, signum), said + rest
        assert f"evrouter: stopped by {signum}: event m-1 not confirmed" in rest
        assert "Traceback" not in rest and out == ""


def test_evrouter_without_a_command_is_a_usage_error():
    run = _evrouter()
    assert run.returncode == 2 and run.stderr.startswith("usage: evrouter COMMAND")


def test_a_router_name_is_any_short_printable_ascii():
    # the cluster suite names its routers after scenarios, spaces and all
    from router import main
    [name] = [o for o in main.router_opts if o.name == "name"]
    assert name.type("kill -9 of the services' node-r1") == "kill -9 of the services' node-r1"
    for bad in ("r" * 101, "a\nb", "é", ""):
        with pytest.raises(ValueError):
            name.type(bad)
