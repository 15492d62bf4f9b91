"""The sample configuration is generated from the code and every option has help."""

import pathlib
import subprocess
import sys

import pytest

from compute import agent_main
from network import adapter_cmd
from router import main as router_main
from router import options

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAMESPACES = [options.list_opts, router_main.list_opts, agent_main.list_opts,
              adapter_cmd.list_opts]


@pytest.mark.parametrize("list_opts", NAMESPACES, ids=lambda f: f.__module__)
def test_every_option_has_help(list_opts):
    for group, opts in list_opts():
        for opt in opts:
            assert opt.help and len(opt.help) > 15, f"[{group}] {opt.name} has no help"


def test_sample_config_matches_the_code(tmp_path):
    out = tmp_path / "evrouter.conf.sample"
    done = subprocess.run(
        [sys.executable, "-m", "oslo_config.generator", "--config-file",
         str(ROOT / "deploy" / "config-generator.conf"), "--output-file", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    committed = (ROOT / "deploy" / "evrouter.conf.sample").read_text()
    assert out.read_text() == committed, (
        "deploy/evrouter.conf.sample is stale: run oslo-config-generator "
        "--config-file deploy/config-generator.conf")
