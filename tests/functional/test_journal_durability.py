"""The journal outlives its writers and its broker, and stays bounded.

Issue 23: "the journal survives a router restart and a broker restart
(stream durability), and its retention is bounded". On the real broker:

- a router process stopped (SIGTERM) and started again: the hops it held
  when it was told to stop are written at stop, and `evrouter trace` (a
  process) shows the hops of both runs, none lost;
- a broker restart (the suite's own node, own_node: the shared broker is
  never restarted): what was written before is read after (a stream is on
  disk), and a writer that was running keeps its backlog in its deque,
  says so in exactly one WARNING, reconnects and writes it;
- retention: a stream declared with a tiny x-max-length-bytes keeps about
  that much (the oldest records go, the newest stay), and one with
  x-max-age 2s drops a segment older than that once a new one starts.
"""

import json
import logging
import signal
import socket
import subprocess
import sys
import time
import uuid

import kombu
import pytest

from router import journal
from router.bus import contract
from router.bus.publishing import BlockingPublisher
from tests.conftest import Bus, broker_reachable, collect_ids, wait_for
from tests.functional.conftest import node_ctl
from tests.functional.test_router_process import (
    consumers,
    publish_pipelined,
    start_router,
    stop,
)

pytestmark = pytest.mark.timeout(180)

HOST = "jd1"


def read_stream(url, prefix, timeout=20.0):
    """What the journal stream of `prefix` holds now, from its first
    offset: ([(offset, record dict)], messages read, their body bytes). Ends on a marker of
    its own, appended to the journal and confirmed first: every batch
    written before the call is before it (no quiet period waited for)."""
    name = journal.stream_name(prefix)
    marker = f"durability-marker-{uuid.uuid4().hex}"
    with kombu.Connection(url) as conn:
        BlockingPublisher(conn).publish(name, "", b"{}", message_id=marker,
                                        timeout=10.0)
    found, messages, size, done = [], [0], [0], []
    with kombu.Connection(url) as conn:
        conn.connect()
        ch = conn.channel()
        ch.basic_qos(0, 500, False)

        def on_message(m):
            messages[0] += 1
            size[0] += len(m.body)
            # a stream says where each message is; a classic queue does not
            offset = m.properties["application_headers"]["x-stream-offset"]
            ch.basic_ack(m.delivery_tag)
            if m.properties.get("message_id") == marker:
                done.append(True)
                return
            found.extend((offset, rec) for rec in journal.decode_batch(m.body))

        ch.basic_consume(name, callback=on_message, no_ack=False,
                         arguments={"x-stream-offset": "first"})
        deadline = time.monotonic() + timeout
        while not done:
            left = deadline - time.monotonic()
            assert left > 0, f"the marker at the end of {name} not read " \
                             f"within {timeout}s ({messages[0]} messages)"
            try:
                conn.drain_events(timeout=min(left, 1.0))
            except socket.timeout:
                pass
    return found, messages[0], size[0]


def own_journal(bus, **kw):
    """JournalSettings on `bus` (its prefix, its URL); the stream and the
    exchange deleted with the bus."""
    name = journal.stream_name(bus.prefix)
    bus.own(queues=[name], exchanges=[name])
    kw.setdefault("batch_seconds", 0.05)
    return journal.JournalSettings(transport_url=bus.url, prefix=bus.prefix,
                                   **kw)


def declare_journal(settings):
    exchange, queue = journal.entities(settings)
    with kombu.Connection(settings.transport_url) as conn:
        queue(conn.channel()).declare()


# --- a router restart -----------------------------------------------------------

def trace_process(bus, wanted):
    """`evrouter trace WANTED --json` as an operator runs it: its records."""
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "trace", wanted, "--json",
         "--since", "10m", "--timeout", "20",
         "--transport-url", bus.url.replace("amqp://", "rabbit://"),
         "--bus-prefix", bus.prefix],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_router_process_restarted_keeps_its_hops_and_writes_them_at_stop(bus):
    """Each run's router holds its records (a batch waits 10 minutes for
    company) until SIGTERM: none is in the stream before the stop, all
    are after it; the two runs' hops are one timeline."""
    bus.declare_central()
    bus.declare_host(HOST)
    # the stream the routers would declare (the [journal] defaults), made
    # now so that it can be read before the first router wrote anything
    declare_journal(own_journal(bus))
    server = str(uuid.uuid4())
    per_run = 40
    sent = []
    for run, name in enumerate(("jr-1", "jr-2")):
        proc = start_router(bus, name, extra=(
            "--journal-enabled", "--journal-batch_ms", "600000"))
        try:
            wait_for(lambda: consumers(bus) == 1, what=f"router {name} consuming")
            envs = [contract.envelope(contract.InstanceEvent(
                contract.VIF_PLUGGED, server, f"port-{run}-{i}", host=HOST),
                "durability") for i in range(per_run)]
            publish_pipelined(bus, envs)
            sent += [e.id for e in envs]
            got = collect_ids(bus.url, bus.topology.host_queue_name(HOST),
                              [e.id for e in envs], 20)
            assert {m.properties.get("message_id") for m in got} >= set(
                e.id for e in envs)
            # routed, and still held by the router's journal: the stream
            # has only the runs before this one
            before = trace_process(bus, server)
            assert len(before) == run * per_run, before
        finally:
            code, out = stop(proc, signal.SIGTERM)
        assert code == 0, out
        assert "not written" not in out, out
        after = trace_process(bus, server)
        assert len(after) == (run + 1) * per_run, out
    routed = trace_process(bus, server)
    assert sorted(r["mid"] for r in routed) == sorted(sent)    # none lost, once
    assert {r["hop"] for r in routed} == {journal.ROUTED}
    assert {r["svc"] for r in routed} == {"router:jr-1", "router:jr-2"}
    assert all(r["detail"] == [HOST] for r in routed)


# --- a broker restart (the suite's own node) ------------------------------------

def _records(j, instance, first, n):
    for i in range(first, first + n):
        j.record(journal.ROUTED, f"m{i}", None, instance, None,
                 contract.VIF_PLUGGED, contract.COMPLETED, [HOST])


def _reachable(url):
    return lambda: broker_reachable(url)


def test_the_journal_survives_a_broker_restart_and_its_writer_catches_up(
        own_node, caplog):
    b = Bus(own_node)
    caplog.set_level(logging.INFO, logger="router.journal")
    j = journal.Journal(own_journal(b), "restart-test").start()
    instance = str(uuid.uuid4())
    stopped = False
    try:
        _records(j, instance, 0, 100)
        assert j.flushed(10)
        before, _, _ = read_stream(own_node, b.prefix)
        assert [r["mid"] for _, r in before] == [f"m{i}" for i in range(100)]
        b.conn.release()

        node_ctl("stop_app", timeout=120)
        stopped = True
        # recorded while the broker is away: they wait in the deque
        _records(j, instance, 100, 100)
        wait_for(lambda: j.stats["failures"] >= 2, 20,
                 what="two failed attempts while the broker is away")
        assert j.backlog == 100 and not j.stats["dropped"], j.stats
        node_ctl("start_app", timeout=120)
        stopped = False
        wait_for(lambda: broker_reachable(own_node), 60, what="the node back")
        _records(j, instance, 200, 100)
        # the writer's backoff doubles from 0.5 s while it fails (30 s at most)
        assert j.flushed(60), f"backlog {j.backlog} not written: {j.stats}"
        after, _, _ = read_stream(own_node, b.prefix)
    finally:
        if stopped:
            node_ctl("start_app", timeout=120)
        j.stop()
        b.cleanup()
    # the same stream: what was there before the restart, then the backlog
    # and what came after, in the order recorded, each once
    assert after[:100] == before
    assert [r["mid"] for _, r in after] == [f"m{i}" for i in range(300)]
    assert all(r["instance"] == instance for _, r in after)
    assert j.stats["written"] == 300 and not j.stats["dropped"], j.stats
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "router.journal" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write" in warnings[0], warnings
    assert [r.getMessage() for r in caplog.records
            if r.name == "router.journal" and r.levelno == logging.INFO
            and "again" in r.getMessage()], "no INFO line when it wrote again"


# --- retention -------------------------------------------------------------------

def _write(j, first, n, detail):
    for i in range(first, first + n):
        j.record(journal.ROUTED, f"m{i}", None, None, None, None, None, detail)
    assert j.flushed(60), f"not written: {j.stats}"


def test_retention_by_size_keeps_the_newest_and_about_max_bytes(bus):
    """1.8 MB of records into a stream of at most 100 kB: the broker
    deletes whole segments (of 20 kB) from the oldest on."""
    max_bytes, segment = 100_000, 20_000
    j = journal.Journal(own_journal(bus, max_bytes=max_bytes,
                                    segment_bytes=segment, batch_records=20),
                        "retention-size").start()
    n = 8000
    try:
        _write(j, 0, n, "x" * 200)      # about 230 bytes a record
    finally:
        j.stop()
    assert j.stats["written"] == n and j.stats["batches"] == n // 20
    kept, messages, size = read_stream(bus.url, bus.prefix)
    mids = [r["mid"] for _, r in kept]
    # what is left is the newest, without a gap, to the last one written
    assert mids == [f"m{i}" for i in range(n - len(mids), n)], mids[:3]
    assert kept[0][0] > 0, "the first segment is still there"
    assert len(mids) < n // 10, f"{len(mids)} of {n} records kept"
    # whole segments go: at most max_bytes and the segment being written
    assert size <= max_bytes + 2 * segment, size
    print(f"\nretention by size: {n} records ({j.stats['batches']} messages) "
          f"written, {len(mids)} ({messages} messages, {size} body bytes) "
          f"kept; first offset {kept[0][0]}")


def test_retention_by_age_drops_a_segment_past_max_age(bus):
    """x-max-age 2s: the broker looks at the age of closed segments when a
    new one starts, so records older than 2 s go at the next roll-over."""
    segment = 20_000
    j = journal.Journal(own_journal(bus, max_age="2s", segment_bytes=segment,
                                    batch_records=20), "retention-age").start()
    try:
        _write(j, 0, 400, "x" * 200)      # about 4 segments
        old_written = time.time()
        first, _, _ = read_stream(bus.url, bus.prefix)
        assert first[0][1]["mid"] == "m0"
        # the oldest segments only now older than max_age (a wait on the
        # clock: the age is the condition)
        time.sleep(max(0.0, old_written + 2.5 - time.time()))
        _write(j, 400, 200, "x" * 200)    # two more roll-overs

        def oldest_gone():
            kept, _, _ = read_stream(bus.url, bus.prefix)
            return kept if kept[0][1]["mid"] != "m0" else None
        kept = wait_for(oldest_gone, 10, interval=0.5,
                        what="segments past max_age deleted")
    finally:
        j.stop()
    mids = [r["mid"] for _, r in kept]
    assert mids[-1] == "m599" and f"m{400}" in mids
    assert len(mids) < 600
    print(f"\nretention by age: 600 records written, {len(mids)} kept, the "
          f"first now {mids[0]}")
