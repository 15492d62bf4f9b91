"""`evrouter trace` through the journal's index, on the real broker: every
hop found, whatever wrote it (writers before the index too) and however
far off the writers' clocks are."""

import time
import uuid

import kombu
import pytest

from router import journal, journal_index, trace_cmd
from tests.conftest import BROKER_URL

pytestmark = pytest.mark.timeout(60)


def _settings(bus, **kw):
    queues, exchanges = journal.names(bus.prefix)
    bus.own(queues=queues, exchanges=exchanges)
    return journal.JournalSettings(transport_url=BROKER_URL, prefix=bus.prefix,
                                   batch_seconds=0.02, **kw)


def _events(j, n, *, skew=0.0, tag="e"):
    """n events of four hops each through journal `j`, its clock `skew`
    seconds off; [(message id, port, instance)]."""
    out = []
    for i in range(n):
        mid, port, server = (f"{tag}-{i}-{uuid.uuid4().hex[:8]}",
                             f"port-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
        for hop in (journal.PUBLISHED, journal.ROUTED, journal.DELIVERED,
                    journal.MATCHED):
            j.record(hop, mid, uuid.uuid4().hex, server, port,
                     "network-vif-plugged", "completed", None,
                     at=time.time() + skew)
        out.append((mid, port, server))
    return out


def _run(js, service, n, **kw):
    j = journal.Journal(js, service).start()
    try:
        ids = _events(j, n, **kw)
        assert j.flushed(20), f"journal {service} not written"
    finally:
        j.stop()
    return j, ids


def _trace(bus, wanted, since=600, **kw):
    return trace_cmd.read(BROKER_URL, bus.prefix, wanted, since, timeout=20,
                          **kw)


def _legacy_batch(bus, mid):
    """A batch as a writer before the index publishes it: to the journal
    exchange, no writer or sequence number (and its user_id, as every
    writer sets it: a reader ignores a batch without one)."""
    body = journal.encode_batch("old:writer", "n1", [
        (time.time(), journal.ROUTED, mid, None, None, None, None, None,
         ["h1"])])
    with kombu.Connection(BROKER_URL) as conn:
        kombu.Producer(conn.channel()).publish(
            body, exchange=journal.stream_name(bus.prefix), routing_key="",
            user_id=conn.userid)


def test_every_hop_is_found_through_the_index(bus):
    js = _settings(bus, batch_records=7, index_group=3)
    writers = [_run(js, f"w{k}", 60) for k in range(3)]
    for j, _ in writers:
        assert j.stats["index_messages"] >= 1
    for _, ids in writers:
        for mid, port, server in (ids[0], ids[31], ids[-1]):
            for wanted in (mid, port, server, server.upper()):
                found, stats = _trace(bus, wanted)
                assert stats["path"].startswith("index"), stats
                assert [r["mid"] for r in found] == [mid] * 4, (wanted, stats)
                # its four hops are in one or two batches of seven
                assert 1 <= stats["batches_matched"] <= 2, stats
    # a read stops at the batch it looks for: the first event's, early
    found, stats = _trace(bus, writers[0][1][0][0])
    assert stats["messages"] < 10, stats
    found, stats = _trace(bus, "never-written")
    assert found == [] and stats["path"].startswith("index")


@pytest.mark.parametrize("skew", [-600.0, 600.0])
def test_a_writer_whose_clock_is_off_is_still_found(bus, skew):
    # 10 minutes off either way: the batch is found by its sequence number,
    # reading further back (clock ahead) or forward (clock behind)
    js = _settings(bus, batch_records=5)
    _run(js, "on-time", 40)
    _, ids = _run(js, "skewed", 40, skew=skew, tag="skewed")
    _run(js, "on-time-after", 40)
    for mid, port, _ in (ids[0], ids[20], ids[-1]):
        for wanted in (mid, port):
            found, stats = _trace(bus, wanted, since=60)
            assert stats["path"].startswith("index"), stats
            assert [r["mid"] for r in found] == [mid] * 4, (skew, stats)


def test_a_writer_before_the_index_is_still_found(bus):
    js = _settings(bus, batch_records=5)
    # a journal from before the index: its stream and exchange only
    exchange, queue = journal.entities(js)
    with kombu.Connection(BROKER_URL) as conn:
        queue(conn.channel()).declare()
    _legacy_batch(bus, "old-before")
    found, stats = _trace(bus, "old-before")
    assert stats["path"] == "full"              # no index yet
    assert [r["mid"] for r in found] == ["old-before"]
    # a writer with the index starts; an old one goes on writing
    _, ids = _run(js, "new", 20)
    _legacy_batch(bus, "old-after")
    _run(js, "new-after", 20)
    for wanted in ("old-before", "old-after", ids[0][0], ids[-1][0]):
        found, stats = _trace(bus, wanted)
        assert stats["path"].startswith("index"), stats
        assert {r["mid"] for r in found} == {wanted}, (wanted, stats)
        assert len(found) == (1 if wanted.startswith("old") else 4)
    assert _trace(bus, "old-after", index=False)[0] == found[:0] + \
        _trace(bus, "old-after")[0]


def test_an_index_entry_without_its_batch_costs_nothing_but_a_read(bus):
    # a writer that died between its index message and its batch
    js = _settings(bus, batch_records=5)
    _, ids = _run(js, "w", 20)
    entry = journal_index.encode_index("dead-writer", "x", "n", [
        (0, time.time(), time.time(),
         journal_index.batch_fingerprints([(0, 0, ids[3][0], None, None,
                                           None)]))])
    with kombu.Connection(BROKER_URL) as conn:
        kombu.Producer(conn.channel()).publish(
            entry, exchange=journal.index_name(bus.prefix), routing_key="",
            user_id=conn.userid)
    _run(js, "w2", 20)
    found, stats = _trace(bus, ids[3][0])
    assert [r["mid"] for r in found] == [ids[3][0]] * 4
    # its own batches (two: records 12-15 in batches of five) and the entry
    assert stats["batches_matched"] == 3, stats


def test_a_batch_further_back_than_its_writers_clock_says_is_read_back(
        bus, monkeypatch):
    # A writer 5 s ahead: the read around its batch starts 2 s after the
    # batch (by the broker's clock) and must go back for it.
    monkeypatch.setattr(trace_cmd, "FUTURE_SLACK", 0.0)
    js = _settings(bus, batch_records=5)
    written = time.time()
    _, ids = _run(js, "ahead", 10, skew=5.0, tag="ahead")
    deadline = written + 3.5
    while time.time() < deadline:       # the clock passing is the condition
        time.sleep(deadline - time.time())
    _run(js, "later", 10)
    found, stats = _trace(bus, ids[4][0])
    assert [r["mid"] for r in found] == [ids[4][0]] * 4
    assert stats.get("reads_back", 0) >= 1, stats


def test_a_writer_with_permissions_from_before_the_index_writes_the_old_way():
    # A host user as `evrouter permissions` made it before the index: it may
    # write <prefix>.journal only. The index exists (a newer router made it).
    from tests.functional.rabbitmq_users import BrokerUsers
    vhost, prefix = f"evt-jidx-{uuid.uuid4().hex[:8]}", "jp"
    users = BrokerUsers(vhost, {"old-host": ("pw", "^$", r"^jp\.journal$",
                                             "^$")})
    try:
        guest = BROKER_URL.rstrip("/") + "/" + vhost
        router_side = journal.Journal(journal.JournalSettings(
            transport_url=guest, prefix=prefix, batch_seconds=0.02),
            "router").start()
        router_side.record(journal.ROUTED, "m-new", None, None, None, None,
                           None, ["h"])
        assert router_side.flushed(10)
        router_side.stop()
        host = journal.Journal(journal.JournalSettings(
            transport_url=users.url("old-host"), prefix=prefix,
            batch_seconds=0.02), "host").start()
        try:
            host.record(journal.DELIVERED, "m-new", None, None, None, None,
                        None, "host h")
            assert host.flushed(10), host.stats
        finally:
            host.stop()
        assert host.stats["failures"] == 0, host.stats
        found, stats = trace_cmd.read(guest, prefix, "m-new", 600, timeout=20)
        assert stats["path"].startswith("index"), stats
        assert [r["hop"] for r in found] == [journal.ROUTED, journal.DELIVERED]
    finally:
        users.remove()


def test_a_batch_dropped_after_its_index_entry_is_not_searched_for(bus):
    # Writer wx's index names batches 4, 5 and 6; 5 (the one naming the id)
    # never reached the journal, 4 and 6 did: trace answers without reading
    # the journal back to the window's start.
    js = _settings(bus, batch_records=5)
    _run(js, "declares", 5)
    rec = (time.time(), journal.ROUTED, "lost-hop", None, None, None, None,
           None, None)
    other = (time.time(), journal.ROUTED, "other", None, None, None, None,
             None, None)
    entry = journal_index.encode_index("wx", "s", "n", [
        (seq, rec[0], rec[0], journal_index.batch_fingerprints(
            [rec if seq == 5 else other])) for seq in (4, 5, 6)])
    with kombu.Connection(BROKER_URL) as conn:
        producer = kombu.Producer(conn.channel())
        producer.publish(entry, exchange=journal.index_name(bus.prefix),
                         routing_key="", user_id=conn.userid)
        for seq in (4, 6):
            producer.publish(
                journal.encode_batch("s", "n", [other], "wx", seq),
                exchange=journal.batches_exchange(bus.prefix), routing_key="",
                message_id=journal.batch_id("wx", seq), user_id=conn.userid)
    found, stats = _trace(bus, "lost-hop")
    assert found == [] and stats["batches_matched"] == 1, stats
    assert stats.get("reads_back", 0) == 0, stats


def test_a_batch_without_a_user_id_is_not_believed(bus):
    js = _settings(bus, batch_records=5)
    _run(js, "w", 5)
    body = journal.encode_batch("router:forged", "n1", [
        (time.time(), journal.DEAD, "forged-1", None, None, None, None,
         None, "unknown-host: made up")])
    with kombu.Connection(BROKER_URL) as conn:
        # RabbitMQ checks a user_id that is there; leaving it out is allowed
        kombu.Producer(conn.channel()).publish(
            body, exchange=journal.stream_name(bus.prefix), routing_key="")
    for index in (True, False):
        found, stats = _trace(bus, "forged-1", index=index)
        assert found == [] and stats["no_user"] == 1, stats


def test_an_index_naming_an_id_in_too_many_batches_costs_one_whole_read(bus):
    # a writer's forged index entries all naming a known id, over an hour
    js = _settings(bus, batch_records=5)
    _, ids = _run(js, "w", 20)
    wanted = ids[7][0]
    fps = journal_index.batch_fingerprints([(0, 0, wanted, None, None, None)])
    now = time.time()
    entry = journal_index.encode_index("forger", "x", "n", [
        (10_000 + i, now - 3600 + 7 * i, now - 3600 + 7 * i, fps)
        for i in range(trace_cmd.MAX_TARGETS + 50)])
    with kombu.Connection(BROKER_URL) as conn:
        kombu.Producer(conn.channel()).publish(
            entry, exchange=journal.index_name(bus.prefix), routing_key="",
            user_id=conn.userid)
    started = time.monotonic()
    found, stats = _trace(bus, wanted)
    assert [r["mid"] for r in found] == [wanted] * 4
    assert stats["path"].startswith("full"), stats
    assert stats["reads"] <= 3, stats
    assert time.monotonic() - started < 10
