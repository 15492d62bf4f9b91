"""Options checked when a service starts, not found per event. Every float
option of every evrouter service and command refuses nan and inf:
oslo.config's Float takes "nan" past any min and max (each comparison with
it is false), and a delay of nan then quietly switches its feature off
(`delay > 0` is false) while the service starts as if configured. And the
producer option holds what the contract takes as free text."""

import math
import os
import pathlib
import subprocess
import sys

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


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
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
    assert run.stderr == (f"argument --{name}: Invalid FiniteFloat(min=0) "
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
