"""The journal's recording side: bounded, never blocking, never raising."""

import json

from router import journal


def test_a_full_journal_drops_new_records_and_counts_them():
    j = journal.Journal(journal.JournalSettings(max_pending=3), "test")
    for i in range(5):
        j.record(journal.ROUTED, f"m{i}", None, "u", "p", "e", "s", ("h",))
    assert j.backlog == 3
    assert j.stats["dropped"] == 2
    assert [r[2] for r in j._pending] == ["m0", "m1", "m2"]


def test_batches_round_trip_and_foreign_bodies_give_nothing():
    rec = (1.5, journal.ROUTED, "m", "t" * 32, "u", "p", "e", "completed",
           ("h1", "h2"))
    body = journal.encode_batch("router:x", "node1", [rec])
    (out,) = journal.decode_batch(body)
    assert out["mid"] == "m" and out["detail"] == ["h1", "h2"]
    assert out["svc"] == "router:x" and out["node"] == "node1"
    for foreign in (b"", b"{}", b"[]", b"\xff", b'{"v": 1, "r": 3}',
                    json.dumps({"v": 1, "r": [[1, 2]]}).encode()):
        assert journal.decode_batch(foreign) == []


def test_the_null_journal_records_nothing():
    j = journal.NullJournal()
    j.record(journal.ROUTED, "m", None, None, None, None, None, None)
    # every way the callers call Journal.record
    j.record(journal.ROUTED, "m", None, None, None, None, None, None, at=1.0)
    j.record(journal.ROUTED, "m", None, None, None, None, None)
    j.start()
    j.stop()
    assert not j.enabled


def test_trace_ages_and_matching():
    import pytest

    from router import trace_cmd
    assert trace_cmd.parse_age("90s") == 90
    assert trace_cmd.parse_age("30m") == 1800
    assert trace_cmd.parse_age("1h") == 3600
    assert trace_cmd.parse_age("2d") == 172800
    assert trace_cmd.parse_age("15") == 15
    for bad in ("", "1w", "-1h", "h", "1 h"):
        with pytest.raises(ValueError):
            trace_cmd.parse_age(bad)
    rec = {"mid": "Msg-1", "tid": "ab" * 16, "instance": "6f1c2a4e-8d3b-4c55-"
           "9a10-2b7e4f0c9d21", "port": "Port-A"}
    for wanted in ("Msg-1", "AB" * 16, "6F1C2A4E-8D3B-4C55-9A10-2B7E4F0C9D21",
                   "Port-A"):
        assert trace_cmd.matches(rec, wanted), wanted
    for wanted in ("msg-1", "port-a", "6f1c"):
        assert not trace_cmd.matches(rec, wanted), wanted


def test_the_writer_backs_off_more_each_time_the_broker_refuses(monkeypatch):
    """Not a fixed pause: a broker that refuses is asked less and less."""
    import threading

    j = journal.Journal(journal.JournalSettings(batch_seconds=0.01), "t")
    waits, done = [], threading.Event()

    def refuse():
        raise ConnectionRefusedError("no broker")

    def wait(seconds):
        waits.append(seconds)
        if len(waits) >= 5:
            j._stop_at = 0.0
            j._stop.set()
            done.set()
        return False

    monkeypatch.setattr(j, "_connect", refuse)
    monkeypatch.setattr(j._stop, "wait", wait)
    j.record(journal.ROUTED, "m", None, None, None, None, None)
    j._run()
    assert done.is_set()
    assert waits[:4] == [0.5, 1.0, 2.0, 4.0], waits


def test_a_timeline_line_never_carries_control_characters():
    from router import trace_cmd
    line = trace_cmd.format_record({
        "t": 1.0, "hop": "dead-lettered", "svc": "router:x", "node": "n",
        "mid": "evil\x1b[2J\x07", "detail": ["h\x1b]0;x\x07"], "port": "p"})
    assert line.isprintable(), line
    assert "evil\\x1b[2J\\x07" in line
