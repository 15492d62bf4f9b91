"""Every option of every command, with dashes or underscores (issue 11,
item 12): `--bus-queue-type` works as `--bus-queue_type` always did."""

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

from router import cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVROUTER = os.path.join(os.path.dirname(sys.executable), "evrouter")
SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"


def evrouter(*args):
    return subprocess.run([EVROUTER, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_issue_s_spelling_through_the_console_script():
    for spelling in ("--bus-queue-type", "--bus-queue_type", "--bus_queue_type"):
        run = evrouter("topology", spelling, "quorum", "--bus-delivery-limit",
                       "3", "--transport_url", "memory://", "--bus_prefix=sp")
        assert run.returncode == 0, run.stderr
        assert "sp.dead-letter  quorum" in run.stdout
        assert "x-delivery-limit=3" in run.stdout


def test_a_value_is_still_checked_after_the_flag_is_respelled():
    run = evrouter("topology", "--bus-queue-type", "bogus")
    assert run.returncode != 0
    assert "value: bogus" in run.stdout + run.stderr


def test_publish_options_with_dashes_reach_its_own_checks():
    # Parsing succeeds, so the command's own input check speaks (exit 2,
    # naming --host) instead of argparse refusing the flags.
    run = evrouter("publish", "network-vif-plugged", "--server", SERVER,
                   "--tag", "p", "--host", "bad host",
                   "--network-confirm-timeout", "1", "--network_retry_for=0",
                   "--log-date_format", "%H", "--config_file", os.devnull)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("evrouter: --host:"), run.stderr


def test_an_unknown_option_is_still_refused():
    run = evrouter("topology", "--bus-queue-kind", "quorum")
    assert run.returncode == 2
    assert "--bus-queue-kind" in run.stderr


# A group with an underscore in its name, and oslo.log's own options,
# parsed for real (in a child: parse() sets up logging for the process).
_ADAPTER_PARSE = textwrap.dedent("""
    from network import adapter_cmd, options
    from router import cli
    from router.service_entry import parse
    argv = ["--network-adapter-notification-transport-url", "rabbit://n//",
            "--network_adapter_pool", "pool-x", "--network-spool-path=/tmp/s",
            "--network-adapter-topics", "a,b", "--bus-nossl",
            "--log-file", "/dev/null", "--use_json"]
    with cli.either_spelling():
        conf = parse(argv, "t", "t",
                     [("network", options.publisher_opts),
                      ("network_adapter", adapter_cmd.adapter_opts)])
    a = conf.network_adapter
    print(a.notification_transport_url, a.pool, conf.network.spool_path,
          ",".join(a.topics), conf.bus.ssl, conf.log_file, conf.use_json)
""")


def test_every_spelling_parses_to_the_same_values():
    run = subprocess.run([sys.executable, "-c", _ADAPTER_PARSE], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["rabbit://n//", "pool-x", "/tmp/s", "a,b",
                                  "False", "/dev/null", "True"]


def help_flags(command):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", out.getvalue()))


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_flag_of_every_command_in_both_spellings(command):
    flags = help_flags(command)
    assert "--config-file" in flags and "--transport-url" in flags
    def same(flag):
        return flag.replace("_", "-")

    for flag in flags:
        for other in ("--" + flag[2:].replace("_", "-"),
                      "--" + flag[2:].replace("-", "_")):
            # Some are registered in both spellings (oslo.log's --log_config
            # and --log-config): then each stands.
            got, value = cli.as_registered([other, "v"], flags)
            assert got in flags and same(got) == same(flag) and value == "v"
            assert cli.as_registered([other + "=v"], flags) == [got + "=v"]


def test_what_is_left_alone():
    flags = {"--bus-queue_type", "--a-b", "--a_b", "-d"}
    assert cli.as_registered(
        ["--bus-queue-type", "quorum", "--a-b", "--a_b", "--A-B", "-d",
         "pos_it-ional", "--", "--bus-queue-type"], flags) == [
        "--bus-queue_type", "quorum", "--a-b", "--a_b", "--A-B", "-d",
        "pos_it-ional", "--", "--bus-queue-type"]
