"""`evrouter publish` argument checking (no broker needed)."""

import pytest

from network import publish_cmd
from router import cli

SERVER = "8d5f3a1e-4c2b-4f6a-9e7d-1a2b3c4d5e6f"


@pytest.mark.parametrize("argv, message", [
    ([], "NAME is required"),
    (["network-vif-plugged", "--tag", "p"], "--server is required"),
    (["network-vif-plugged", "--server", SERVER], "--tag is required"),
    (["network-vif-pluged", "--server", SERVER, "--tag", "p"],
     "NAME: unknown value 'network-vif-pluged'"),
    (["network-vif-plugged", "--server", "not-a-uuid", "--tag", "p"],
     "--server: 'not-a-uuid' does not match"),
    (["network-vif-plugged", "--server", SERVER, "--tag", "p",
      "--status", "done"], "--status: unknown value 'done'"),
    (["network-vif-plugged", "--server", SERVER, "--tag", "p",
      "--host", "bad host"], "--host: 'bad host' does not match"),
    (["network-vif-plugged", "--server", SERVER, "--tag", "p",
      "--message-id", "not an id"], "--message-id: 'not an id' does not match"),
])
def test_bad_input_exits_2_naming_the_field(argv, message, capsys):
    assert cli.main(["publish", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evrouter: " + message), err
    assert len(err.strip().splitlines()) == 1


def test_the_commands_are_listed():
    usage = cli.usage()
    assert "publish" in usage and "network-adapter" in usage


def test_a_good_event(capsys):
    from oslo_config import cfg
    conf = cfg.ConfigOpts()
    conf.register_cli_opts(publish_cmd.cli_opts)
    conf(["volume-extended", "--server", SERVER, "--tag", "vol-1",
          "--status", "failed", "--host", "compute-1"])
    event = publish_cmd.event_from(conf)
    assert (event.name, event.server_uuid, event.tag, event.status,
            event.host) == ("volume-extended", SERVER, "vol-1", "failed",
                            "compute-1")
