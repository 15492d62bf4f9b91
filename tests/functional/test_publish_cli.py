"""`evrouter publish` as a process, against the real broker."""

import os
import subprocess
import sys
import time
import uuid

from router.bus import contract
from tests.conftest import BROKER_URL
from tests.functional.test_network_publisher import host_events

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "compute-cli"


def evrouter(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_publish_reaches_the_host_and_prints_the_message_id(bus, router):
    bus.declare_host(HOST)
    server = str(uuid.uuid4())
    done = evrouter("publish", "network-vif-plugged", "--server", server,
                    "--tag", "port-9", "--host", HOST,
                    "--transport-url", BROKER_URL, "--bus-prefix", bus.prefix)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("published ")
    message_id = done.stdout.split()[1].rstrip(":")
    [(message, env)] = host_events(bus, 1, HOST)
    assert env.id == message_id
    assert env.payload == contract.InstanceEvent(
        "network-vif-plugged", server, "port-9", "completed", HOST)
    assert message.headers[contract.HEADER_PUBLISHER] == "guest"


def test_a_retry_with_the_same_message_id_is_a_duplicate(bus, router):
    """A script retrying after an unclear outcome reuses the id; the
    waiter then sees the second copy as what it is."""
    bus.declare_host(HOST)
    server = str(uuid.uuid4())
    message_id = uuid.uuid5(uuid.NAMESPACE_URL, f"my-tool/{server}/1").hex
    for _ in range(2):
        done = evrouter("publish", "network-vif-plugged", "--server", server,
                        "--tag", "port-9", "--host", HOST,
                        "--message-id", message_id,
                        "--transport-url", BROKER_URL, "--bus-prefix",
                        bus.prefix)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"published {message_id}:")
    assert [env.id for _, env in host_events(bus, 2, HOST)] == [message_id] * 2


def test_unreachable_broker_exits_1_and_says_so():
    started = time.monotonic()
    done = evrouter("publish", "network-vif-plugged", "--server",
                    str(uuid.uuid4()), "--tag", "p", "--timeout", "0.5",
                    "--transport-url", "rabbit://guest:guest@127.0.0.1:1/")
    assert done.returncode == 1
    assert "evrouter: not published: not confirmed by amqp://guest:**@127.0.0.1:1//" \
        in done.stderr, done.stderr
    assert "Connection refused" in done.stderr
    assert time.monotonic() - started < 15


def test_not_confirmed_exits_1(bus):
    # The broker is up but nothing of the deployment exists under this
    # prefix: no ingress exchange, so nothing can confirm the event.
    done = evrouter("publish", "network-vif-unplugged", "--server",
                    str(uuid.uuid4()), "--tag", "p", "--timeout", "0.5",
                    "--transport-url", BROKER_URL, "--bus-prefix", bus.prefix)
    assert done.returncode == 1
    assert "not published" in done.stderr and "NOT_FOUND" in done.stderr, \
        done.stderr


def test_bad_input_exits_2_without_touching_the_broker():
    done = evrouter("publish", "network-vif-plugged", "--server", "nope",
                    "--tag", "p", "--transport-url",
                    "rabbit://guest:guest@127.0.0.1:1/")
    assert done.returncode == 2
    assert done.stderr.startswith("evrouter: --server: 'nope' does not match")
