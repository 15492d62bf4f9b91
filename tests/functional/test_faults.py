"""Fault injection on the real broker, end to end: publisher -> router(s) -> waiter.

Each scenario reports its counts (sent, delivered, duplicates, dead-lettered,
lost) in the run's summary. "Delivered" counts waiters woken; a duplicate is a
redelivered message the waiter recognised and ignored.
"""

import collections
import signal
import subprocess
import threading
import time
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from compute.events import DELIVERED, DUPLICATE, InstanceEvents
from router.bus import contract
from tests.conftest import (
    BROKER_URL,
    Bus,
    RunningRouter,
    broker_reachable,
    collect,
    report_fault,
    single_user_policy,
    wait_for,
)
from tests.functional.test_router import publish_env, publish_raw
from tests.functional.test_router_process import (
    consumers,
    publish_pipelined,
    start_router,
    stop,
)
from tests.functional.waiter_harness import HostEvents
from tests.unit.test_contract import _documents, _module_accepts


class CountingWaiters:
    """A registry with every event prepared; counts what deliveries did."""

    def __init__(self):
        self.registry = InstanceEvents(max_seen_ids=100_000)
        self.outcomes = collections.Counter()
        self.woken = collections.Counter()
        self._lock = threading.Lock()

    def prepare(self, events):
        for env in events:
            p = env.payload
            self.registry.prepare(p.server_uuid, p.name, p.tag)

    def deliver(self, event, message_id):
        outcome = self.registry.deliver(event, message_id)
        with self._lock:
            self.outcomes[outcome] += 1
            if outcome == DELIVERED:
                self.woken[event.key] += 1
        return outcome


def stream(host, n, name=contract.VIF_PLUGGED):
    return [contract.envelope(contract.InstanceEvent(
        name, str(uuid.uuid4()), f"port-{i}", host=host), "fault") for i in range(n)]


def test_kill_9_of_a_router_mid_stream_wakes_every_waiter_once(bus):
    n = 5000
    bus.declare_central()
    waiters = CountingWaiters()
    host = HostEvents(bus, deliver=waiters.deliver, prefetch=256)
    routers = [start_router(bus, "k1"), start_router(bus, "k2")]
    try:
        wait_for(lambda: consumers(bus) == 2, what="two routers consuming")
        sent = stream(host.host, n)
        waiters.prepare(sent)
        publish_pipelined(bus, sent)
        wait_for(lambda: waiters.outcomes[DELIVERED] >= n // 5, timeout=60,
                 what="the stream flowing")
        routers[0].send_signal(signal.SIGKILL)
        wait_for(lambda: waiters.outcomes[DELIVERED] >= n, timeout=120,
                 what="every waiter woken")
        # nothing left anywhere: a late duplicate would show up here
        wait_for(lambda: host.queue_depth() == 0, what="host queue drained")
        twice = sum(1 for c in waiters.woken.values() if c > 1)
        report_fault("kill -9 router (2 routers)", sent=len(sent),
                     delivered=len(waiters.woken),
                     duplicates=waiters.outcomes[DUPLICATE], duplicate_wakeups=twice,
                     dead_lettered=0, lost=n - len(waiters.woken))
        assert len(waiters.woken) == n and twice == 0
    finally:
        for proc in routers:
            stop(proc, signal.SIGKILL)
        host.stop()


@pytest.mark.disruptive
def test_broker_restart_mid_stream_loses_nothing(bus, tmp_path):
    from network.publisher import InstanceEventPublisher, PublisherSettings
    n = 600
    bus.declare_central()
    waiters = CountingWaiters()
    host = HostEvents(bus, deliver=waiters.deliver)
    router = RunningRouter(bus)
    events = stream(host.host, n)
    waiters.prepare(events)
    publisher = InstanceEventPublisher(PublisherSettings(
        transport_url=bus.url, topology=bus.topology, spool_path=str(tmp_path / "spool"),
        retry_for=0.5, confirm_timeout=2.0)).start()
    spooled = []

    def publish_all():
        # a steady producer (~200/s), so the outage lands mid-stream
        for env in events:
            spooled.append(publisher.publish(env.payload).spooled)
            time.sleep(0.005)
    writer = threading.Thread(target=publish_all, daemon=True)
    try:
        writer.start()
        wait_for(lambda: len(spooled) >= n // 4, what="a quarter published")
        bus.conn.release()
        subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True,
                       timeout=120)
        try:
            wait_for(lambda: any(spooled[n // 4:]) or len(spooled) == n, timeout=30,
                     what="the publisher spooling while the broker is away")
        finally:
            subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True,
                           timeout=120)
        wait_for(broker_reachable, timeout=60, what="broker back")
        writer.join(120)
        wait_for(lambda: waiters.outcomes[DELIVERED] >= n, timeout=120,
                 what="every waiter woken after the restart")
        twice = sum(1 for c in waiters.woken.values() if c > 1)
        report_fault("RabbitMQ restart mid-stream", sent=n, spooled=sum(spooled),
                     delivered=len(waiters.woken), duplicates=waiters.outcomes[DUPLICATE],
                     duplicate_wakeups=twice, lost=n - len(waiters.woken))
        assert sum(spooled) > 0, "the outage should have made the publisher spool"
        assert len(waiters.woken) == n and twice == 0
    finally:
        publisher.close()
        router.stop()
        host.stop()


def test_host_away_gets_fresh_events_on_return_and_stale_ones_expire():
    ttl_ms = 1500
    b = Bus(BROKER_URL, host_message_ttl_ms=ttl_ms)
    try:
        b.declare_central()
        router = RunningRouter(b)
        waiters = CountingWaiters()
        host = HostEvents(b, deliver=waiters.deliver)
        host.stop()                                  # the host goes away
        stale = stream(host.host, 5)
        for env in stale:
            publish_env(b, env)
        dead = collect(b.url, b.topology.dead_letter_queue_name, 5, timeout=ttl_ms / 1000 + 20)
        fresh = stream(host.host, 5)
        waiters.prepare(fresh)
        for env in fresh:
            publish_env(b, env)
        wait_for(lambda: host.queue_depth() == 5, what="fresh events waiting in the queue")
        host.start()                                 # the host comes back
        wait_for(lambda: waiters.outcomes[DELIVERED] >= 5, what="fresh events delivered")
        reasons = [contract.dead_letter_reason(m.headers) for m in dead]
        report_fault("compute host away past the TTL", sent=10,
                     delivered=waiters.outcomes[DELIVERED], dead_lettered=len(dead),
                     lost=10 - waiters.outcomes[DELIVERED] - len(dead))
        assert reasons == [contract.REASON_EXPIRED] * 5
        assert {contract.decode(m.body).id for m in dead} == {e.id for e in stale}
        assert set(waiters.woken) == {e.payload.key for e in fresh}
        host.stop()
        router.stop()
    finally:
        b.cleanup()


# --- bad input: a corpus and a fuzzer, interleaved with good events -----------

CORPUS = [
    (b"", contract.REASON_MALFORMED),
    (b"{\"version\": \"1.0\", \"id\": \"x\"", contract.REASON_MALFORMED),   # truncated
    (b"not json at all", contract.REASON_MALFORMED),
    (b"\x00\x01\x02", contract.REASON_MALFORMED),
    (b"[1, 2, 3]", contract.REASON_INVALID),
    (b"{\"version\": 1.0}", contract.REASON_INVALID),                      # wrong type
    (b"{\"version\": \"9.0\", \"id\": \"x\"}", contract.REASON_UNSUPPORTED_VERSION),
    (b"{\"pad\": \"" + b"x" * 70_000 + b"\"}", contract.REASON_TOO_LARGE),
]


def _bad_body(doc):
    import json
    return json.dumps(doc).encode()


def _reason_of(body):
    try:
        contract.decode(body)
    except contract.ContractError as exc:
        return exc.reason
    return None


@settings(max_examples=1, deadline=None, phases=[Phase.generate],
          suppress_health_check=list(HealthCheck))
@given(docs=st.lists(_documents(), min_size=150, max_size=150))
def test_fuzzed_bad_input_is_dead_lettered_and_good_events_all_arrive(docs):
    b = Bus(BROKER_URL, retry_delays_ms=(100, 200))
    try:
        b.declare_central()
        router = RunningRouter(b, policy=single_user_policy(no_host_timeout=1.0))
        waiters = CountingWaiters()
        host = HostEvents(b, deliver=waiters.deliver)
        bad = [(body, reason) for body, reason in CORPUS]
        bad += [(_bad_body(d), _reason_of(_bad_body(d))) for d in docs
                if not _module_accepts(d)]
        # unknown host: valid, but no exchange for it -> retried, then dead-lettered
        bad += [(contract.encode(env), contract.REASON_UNKNOWN_HOST)
                for env in stream("no-such-host", 3)]
        good = stream(host.host, len(bad))
        waiters.prepare(good)
        for i, (body, _) in enumerate(bad):
            publish_raw(b, body, message_id=f"bad-{i}")
            publish_env(b, good[i])
        dead = collect(b.url, b.topology.dead_letter_queue_name, len(bad), timeout=60)
        wait_for(lambda: waiters.outcomes[DELIVERED] >= len(good), timeout=60,
                 what="every good event delivered")
        got = collections.Counter(m.headers[contract.HEADER_REASON] for m in dead)
        want = collections.Counter(reason for _, reason in bad)
        report_fault("bad-input corpus + fuzzer", sent=len(bad) + len(good),
                     bad=len(bad), dead_lettered=len(dead),
                     delivered=waiters.outcomes[DELIVERED],
                     lost=len(good) - waiters.outcomes[DELIVERED])
        assert got == want
        assert router.thread.is_alive()
        host.stop()
        router.stop()
    finally:
        b.cleanup()
