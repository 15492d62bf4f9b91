"""A parked event is never lost on its way back to the router.

An event the router cannot place yet waits in a retry queue and goes back to
the router queue when its TTL expires: the broker dead-letters it there. A
classic queue dead-letters at-most-once, so when the router queue refused
it (a reject-publish limit, no leader in a failover) or was gone for a
moment, the broker dropped a confirmed event with no trace (CI chaos run,
seed 1648519715: a parked event lost under a refuse-router fault). The
failure class: a hop inside the broker that nobody confirms. The retry queues
are the one such hop that carries events still to be delivered (the others
lead to the dead-letter queue), so they are quorum queues with at-least-once
dead-lettering: the broker keeps the event until the router queue took it,
trying again every dead_letter_worker_publisher_confirm_timeout (5 s in
deploy/rabbitmq/advanced.config, which own_node's node runs with).

Runs on own_node: its policies and queue deletions stay off the shared broker.
"""

import json
import os
import re
import shutil
import subprocess
import uuid

import kombu
import pytest

from router.bus import topology
from tests.conftest import Bus, RunningRouter, collect_ids, queue_depth, wait_for
from tests.functional import poison
from tests.functional.conftest import NODE_SCRIPT, node_ctl

TIER_MS = 300
RESEND = 5.0        # deploy/rabbitmq/advanced.config


def _refuse(b):
    name = f"{b.prefix}-refuse-router"
    node_ctl("set_policy", "--apply-to", "queues", name,
             f"^{re.escape(b.topology.router_queue_name)}$",
             json.dumps({"max-length": 0, "overflow": "reject-publish"}))
    return lambda: node_ctl("clear_policy", name)


def _delete(b):
    with kombu.Connection(b.url) as conn:
        conn.channel().queue_delete(b.topology.router_queue_name)
    return b.declare_central


@pytest.mark.parametrize("fault", [_refuse, _delete],
                         ids=["router-queue-refuses", "router-queue-gone"])
def test_a_parked_event_the_router_queue_cannot_take_comes_back_later(
        own_node, fault):
    b = Bus(own_node, retry_delays_ms=(TIER_MS,))
    b.declare_central()
    raw = poison.RawPublisher(own_node)
    undo = None
    try:
        undo = fault(b)
        parked = b.topology.retry_queue_name(TIER_MS)
        ids = [f"parked-{uuid.uuid4().hex[:8]}" for _ in range(3)]
        for msg_id in ids:
            raw.publish("", parked, b"{}", message_id=msg_id)
        # Expired (no longer ready in the retry queue) and not taken: the
        # router queue refused them, or there was none (so the fault is in
        # force: the test cannot pass by the events simply arriving).
        wait_for(lambda: queue_depth(own_node, parked) == 0, 10,
                 what="the parked events expired")
        assert _router_depth(b) == 0
        undo()
        undo = None
        back = collect_ids(own_node, b.topology.router_queue_name, ids,
                           timeout=RESEND * 2 + 5)
        assert {m.properties["message_id"] for m in back} == set(ids)
        assert all(m.headers["x-death"][0]["reason"] == "expired" for m in back)
    finally:
        if undo is not None:
            undo()
        raw.close()
        b.cleanup()


def _router_depth(b):
    try:
        return queue_depth(b.url, b.topology.router_queue_name)
    except Exception:   # gone: nothing in it either
        return 0


# A broker whose stream_queue feature flag is off (one first created before
# 3.9, never told `rabbitmqctl enable_feature_flag all`) dead-letters the
# parking queues at-most-once again, saying so only in its own log: the
# router finds out, and says so at ERROR (hostile review of this change).
NO_STREAMS = {"EVROUTER_NODE": "nostreams@localhost",
              "EVROUTER_NODE_PORT": "5732", "EVROUTER_NODE_DIST_PORT": "25732",
              "RABBITMQ_FEATURE_FLAGS": ",".join((
                  "quorum_queue", "implicit_default_bindings", "user_limits",
                  "virtual_host_metadata", "maintenance_mode_status",
                  "classic_mirrored_queue_version"))}
NO_STREAMS_URL = "amqp://guest:guest@127.0.0.1:5732//"


@pytest.fixture(scope="module")
def node_without_streams():
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("no rabbitmq-server to start a node of our own")
    env = dict(os.environ, **NO_STREAMS)
    script = ["bash", str(NODE_SCRIPT)]
    subprocess.run(script + ["start"], env=env, check=True, timeout=180,
                   capture_output=True)
    try:
        yield NO_STREAMS_URL
    finally:
        subprocess.run(script + ["stop"], env=env, timeout=120,
                       capture_output=True)


def test_a_broker_that_would_park_at_most_once_is_named_at_error(
        own_node, node_without_streams, caplog):
    for url, at_least_once in ((own_node, True), (node_without_streams, False)):
        b = Bus(url)
        try:
            with kombu.Connection(url) as conn:
                why = topology.parking_refusal(conn, b.topology)
            assert (why is None) is at_least_once, why
        finally:
            b.cleanup()
    assert "enable_feature_flag all" in why
    bus = Bus(node_without_streams)
    router = RunningRouter(bus)     # returns once it consumes
    try:
        errors = [r.getMessage() for r in caplog.records
                  if r.levelname == "ERROR" and "parked events may be lost"
                  in r.getMessage()]
        assert len(errors) == 1, errors
    finally:
        router.stop()
        bus.cleanup()
