"""The host consumer's fault table (compute/host_session.py), walked by a
hypothesis state machine on the real broker.

Traffic (good events, malformed ones, ones whose headers do not fit a
frame once re-encoded) interleaves with faults of every blast radius: the
dead-letter exchange deleted and restored, a policy that makes the
dead-letter queue refuse everything set and cleared, the connection cut.
After every step, once the consumer has settled everything:
- every good event reached the registry;
- every bad one is dead-lettered with our reason exactly when the
  dead-letter path was whole, and otherwise dropped and counted;
- the host queue is empty, and the consumer ran one session per
  connection cut (no fault of a message or a broker object ended one).
"""

import os
import socket
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from router.bus import contract, inbound
from router.bus.backoff import Schedule
from tests.conftest import BROKER_URL, Bus, collect, wait_for
from tests.functional import poison
from tests.functional.waiter_harness import HostEvents

pytestmark = pytest.mark.timeout(600)

KEY = "instance.network-vif-plugged"
BAD_KINDS = {
    "malformed": None,
    "oversized string": {"pad": "A" * 130_950},
    "re-encoded ints": poison.raw_array_entry(b"ints", b"b", [7] * 30_000),
}


def _ctl(*args):
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True,
                   timeout=60)


def _policy_of(queue):
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "policy", "--quiet",
         "--no-table-headers"], check=True, capture_output=True, text=True,
        timeout=60).stdout
    for line in listed.splitlines():
        parts = line.split("\t")
        if parts[0] == queue:
            return parts[1] if len(parts) > 1 else ""
    return None


def _unacknowledged(queue):
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "messages_unacknowledged",
         "--quiet", "--no-table-headers"], check=True, capture_output=True,
        text=True, timeout=60).stdout
    for line in listed.splitlines():
        name, _, count = line.partition("\t")
        if name == queue:
            return int(count)
    return None


def _reason(message):
    value = message.headers.get(contract.HEADER_REASON)
    return value.decode() if isinstance(value, bytes) else value


class HostConsumerFaults(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.bus = Bus(BROKER_URL)
        self.bus.declare_central()
        self.policy = f"{self.bus.prefix}-refuse"
        self.dlq = self.bus.topology.dead_letter_queue_name
        # Cuts come in a row here, each right after a session came up: the
        # reconnect schedule (router/bus/backoff.py) would grow to its 30 s
        # cap. What this walks is blast radius, so the waits stay short.
        self.host = HostEvents(self.bus, reconnect=Schedule(first=0.2, cap=1.0),
                               dead_letter_patience=1.0)
        self.raw = poison.RawPublisher(self.bus.url)
        self.exchange = self.bus.topology.host_exchange_name(self.host.host)
        self.goods = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.cuts = 0
        self.exchange_present = True
        self.refusing = False

    @property
    def stats(self):
        return self.host.consumer.stats

    # --- traffic -------------------------------------------------------------
    @rule()
    def good_event(self):
        env = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1",
            contract.COMPLETED, self.host.host), "model-test")
        self.raw.publish(self.exchange, KEY, contract.encode(env),
                         message_id=env.id)
        self.goods += 1
        wait_for(lambda: self.stats["held"] == self.goods, 20,
                 what="the good event")

    @rule(kind=st.sampled_from(sorted(BAD_KINDS)))
    def bad_event(self, kind):
        msg_id = f"bad-{uuid.uuid4().hex[:8]}"
        headers = BAD_KINDS[kind]
        if isinstance(headers, bytes):
            self.raw.publish_raw(self.exchange, KEY, b"{bad",
                                 poison.raw_properties(
                                     message_id=msg_id.encode(),
                                     headers=headers))
        else:
            self.raw.publish(self.exchange, KEY, b"{bad", message_id=msg_id,
                             application_headers=headers)
        if self.exchange_present and not self.refusing:
            self.dead_lettered += 1
            wait_for(lambda: self.stats["dead_lettered"] == self.dead_lettered,
                     20, what=f"{kind} dead-lettered")
            [dead] = collect(self.bus.url, self.dlq, 1, timeout=10)
            assert dead.properties["message_id"] == msg_id
            assert _reason(dead) == contract.REASON_MALFORMED
            assert bool(dead.headers.get(inbound.HEADER_CUT)) == \
                (headers is not None)
        else:
            self.dropped += 1
            wait_for(lambda: self.stats["dropped:malformed"] == self.dropped,
                     20, what=f"{kind} dropped")
            # Dropped means its original acknowledged: settled before the
            # next step (a cut, the exchange back) could bring it back.
            queue = self.bus.topology.host_queue_name(self.host.host)
            wait_for(lambda: _unacknowledged(queue) == 0, 20,
                     what="the original settled")

    # --- faults ----------------------------------------------------------------
    @precondition(lambda self: self.exchange_present)
    @rule()
    def delete_dead_letter_exchange(self):
        ch = self.bus.channel()
        ch.exchange_delete(self.bus.topology.dead_letter_exchange_name)
        ch.close()
        self.exchange_present = False

    @precondition(lambda self: not self.exchange_present)
    @rule()
    def restore_dead_letter_exchange(self):
        self.bus.declare_central()
        self.exchange_present = True

    @precondition(lambda self: not self.refusing)
    @rule()
    def refuse_dead_letters(self):
        _ctl("set_policy", "--apply-to", "queues", "--priority", "100",
             self.policy, f"^{self.dlq.replace('.', '[.]')}$",
             '{"max-length": 0, "overflow": "reject-publish"}')
        self.refusing = True
        wait_for(lambda: _policy_of(self.dlq) == self.policy, 20,
                 what="the policy applied")

    @precondition(lambda self: self.refusing)
    @rule()
    def accept_dead_letters(self):
        _ctl("clear_policy", self.policy)
        self.refusing = False
        wait_for(lambda: _policy_of(self.dlq) == "", 20,
                 what="the policy cleared")

    @rule()
    def cut_the_connection(self):
        consumer = self.host.consumer
        sessions = self.stats["sessions"]
        consumer.connection.connection.sock.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: self.stats["sessions"] == sessions + 1
                 and consumer.ready.is_set(), 30, what="the next session")

    # --- after every step -------------------------------------------------------
    @invariant()
    def one_session_per_cut_and_nothing_left(self):
        stats = self.stats
        assert stats["failures"] == 0, dict(stats)
        assert stats["sessions"] == stats["reconnects"] + 1, dict(stats)
        assert self.host.consumer.ready.is_set()
        assert self.host.queue_depth() == 0
        assert stats["dead_lettered"] == self.dead_lettered, dict(stats)
        # Within a 1 s patience a copy is tried at 0, 0.25, 0.75 and 1.75 s.
        refused = stats["dead_letter_refusals"]
        assert refused <= 4 * self.dropped, dict(stats)

    def teardown(self):
        try:
            if self.refusing:
                _ctl("clear_policy", self.policy)
        finally:
            try:
                self.host.stop()
            finally:
                self.raw.close()
                self.bus.cleanup()


# 5 walks of 15 steps in the main run (about 40 s); EVROUTER_FAULT_WALKS
# sets more (the CI time budget, not the table, bounds the default).
HostConsumerFaults.TestCase.settings = settings(
    max_examples=int(os.environ.get("EVROUTER_FAULT_WALKS", "5")),
    stateful_step_count=15, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
test_host_consumer_fault_table = HostConsumerFaults.TestCase
