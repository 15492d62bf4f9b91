"""The journal's index: no batch that names an id is missed (no false
negatives), and the writer never puts a batch before its index entry."""

import json
import uuid

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from router import journal, journal_index, trace_cmd

ids = st.one_of(st.none(), st.text(max_size=40), st.uuids().map(str),
                st.integers(), st.sampled_from(["a", "A", "é", "\ud800"]))
records = st.tuples(st.floats(0, 2e9), st.sampled_from([journal.ROUTED]),
                    ids, ids, ids, ids, st.none(), st.none(), st.none())
batches = st.lists(st.lists(records, min_size=1, max_size=20), min_size=1,
                   max_size=8)


def _index(bs):
    return journal_index.encode_index(
        "w1", "svc", "node",
        [(seq, b[0][0], b[-1][0], journal_index.batch_fingerprints(b))
         for seq, b in enumerate(bs)])


@settings(max_examples=300)
@given(batches)
def test_every_id_of_every_record_finds_its_batch(bs):
    body = _index(bs)
    for seq, batch in enumerate(bs):
        for rec in batch:
            for i in journal_index.KEY_FIELDS:
                if rec[i] is None:
                    continue
                wanted = rec[i] if isinstance(rec[i], str) else str(rec[i])
                writer, hits = journal_index.matching(
                    body, journal_index.wanted_fingerprints(wanted))
                assert writer == "w1"
                assert seq in [h[0] for h in hits], (wanted, seq)


@settings(max_examples=200)
@given(batches, st.uuids())
def test_an_instance_asked_in_upper_case_finds_its_batch(bs, server):
    # the reader folds instance uuids and trace ids, written lower case
    bs[-1].append((1.0, journal.ROUTED, "m", None, str(server), None, None,
                   None, None))
    writer, hits = journal_index.matching(
        _index(bs), journal_index.wanted_fingerprints(str(server).upper()))
    assert len(bs) - 1 in [h[0] for h in hits]
    rec = dict(zip(journal.FIELDS, bs[-1][-1], strict=True))
    assert trace_cmd.matches(rec, str(server).upper())


@settings(max_examples=200)
@given(batches, st.text(max_size=40))
def test_matches_are_exactly_the_batches_holding_a_fingerprint(bs, wanted):
    # a needle found across two fingerprints is no match
    wanted_fps = journal_index.wanted_fingerprints(wanted)
    expected = set()
    for seq, batch in enumerate(bs):
        fps = journal_index.batch_fingerprints(batch)
        words = {int.from_bytes(fps[i:i + 4], "little")
                 for i in range(0, len(fps), 4)}
        if words & wanted_fps:
            expected.add(seq)
    _, hits = journal_index.matching(_index(bs), wanted_fps)
    assert {h[0] for h in hits} == expected


def test_index_messages_and_batches_tell_each_other_apart():
    body = _index([[(1.0, journal.ROUTED, "m", "t", "u", "p", "e", "s",
                     None)]])
    assert journal.decode_batch(body) == []     # no records in an index
    assert journal_index.first_entry(body) == 0
    batch = journal.encode_batch("svc", "n", [(1.0, journal.ROUTED, "m", None,
                                               None, None, None, None, None)],
                                 "w1", 7)
    assert journal_index.matching(batch, {1}) == (None, [])
    assert journal_index.first_entry(batch) is None
    (rec,) = journal.decode_batch(batch)        # old readers read it too
    assert rec["mid"] == "m"
    for foreign in (b"", journal_index.MAGIC, journal_index.MAGIC + b"{}\n",
                    b"\xff"):
        assert journal_index.matching(foreign, {1}) == (None, [])
        assert journal_index.first_entry(foreign) is None
    short = journal_index.MAGIC + b'{"w":1,"b":[[1]]}\n'
    assert journal_index.matching(short, {1}) == (None, [])


def test_batch_ids_round_trip():
    assert journal.parse_batch_id(journal.batch_id("ab12", 7)) == ("ab12", 7)
    for other in (None, 3, "", "jb.", "jb.x", "jb.x.", "jb..3", "jb.x.-1",
                  "trace-marker-1"):
        assert journal.parse_batch_id(other) is None


class FlakyPublisher:
    """Takes what is published, failing when told to."""

    def __init__(self, fail_at):
        self.fail_at = set(fail_at)
        self.calls = 0
        self.sent = []

    def publish(self, exchange, routing_key, body, *, timeout,
                message_id=None):
        self.calls += 1
        if self.calls in self.fail_at:
            raise OSError("connection lost")
        self.sent.append((exchange, body))


@settings(max_examples=200)
@given(st.integers(1, 40), st.lists(st.integers(1, 60), max_size=10),
       st.integers(1, 4), st.integers(1, 7))
def test_the_writer_puts_every_batch_after_its_index_entry(
        n, fail_at, group, size):
    j = journal.Journal(journal.JournalSettings(
        prefix="p", batch_records=size, index_group=group), "test")
    for i in range(n):
        j.record(journal.ROUTED, f"m{i}", None, None, None, None, None, None)
    j._stop.set()       # write all that is pending, as at stop
    pub = FlakyPublisher(fail_at)
    for _ in range(100):
        try:
            j._write(pub)
        except OSError:
            continue
        if not j.backlog:
            break
    assert not j.backlog
    indexed, written = set(), []
    for exchange, body in pub.sent:
        if exchange == journal.index_name("p"):
            writer, hits = journal_index.matching(
                body, journal_index.wanted_fingerprints("m0"))
            head = json.loads(body[len(journal_index.MAGIC):body.index(b"\n", 6)])
            indexed.update(b[0] for b in head["b"])
        else:
            assert exchange == journal.batches_exchange("p")
            doc = msgpack.unpackb(body)
            assert doc["q"] in indexed, "a batch before its index entry"
            written.extend(r[2] for r in doc["r"])
    # every record written (a batch whose confirm was lost may come twice)
    assert sorted(set(written), key=lambda m: int(m[1:])) == [
        f"m{i}" for i in range(n)]


def test_reads_are_grouped_by_time():
    targets = {("a", 1): 100.0, ("b", 4): 101.0, ("a", 9): 200.0,
               ("c", 2): 99.5}
    assert list(trace_cmd._groups(targets, gap=6)) == [
        [("c", 2), ("a", 1), ("b", 4)], [("a", 9)]]


def test_batches_are_packed_and_both_encodings_read_back():
    rec = (1.5, journal.ROUTED, "m", "t" * 32, "u", "p", "e", "completed",
           ("h1", "h2"))
    packed = journal.encode_batch("router:x", "n1", [rec], "w1", 3)
    plain = journal.encode_batch("router:x", "n1", [rec], "w1", 3,
                                 packed=False)
    assert plain[:1] == b"{" and packed[:1] != b"{"
    assert journal.decode_batch(packed) == journal.decode_batch(plain)
    (out,) = journal.decode_batch(packed)
    assert out["detail"] == ["h1", "h2"] and out["t"] == 1.5
    # trace's test before decoding: the ids are in the body as they are
    assert b"m" in packed and b"t" * 32 in packed
    # what neither encoding takes goes as its str, as JSON's default=str did
    odd = journal.encode_batch("s", "n", [(1.0, journal.ROUTED, uuid.UUID(
        int=1), None, None, None, None, None, 1 << 70)])
    (out,) = journal.decode_batch(odd)
    assert out["mid"] == str(uuid.UUID(int=1))
    assert str(out["detail"]) == str(1 << 70)
    for foreign in (b"\x91\x01", b"\xc1", b"\x81\xa1v\x01",
                    msgpack.packb({"v": 1, "r": [[1, 2]]})):
        assert journal.decode_batch(foreign) == []


def test_an_index_entry_that_is_not_one_is_ignored():
    fps = journal_index.batch_fingerprints([(0, 0, "m", None, None, None)])
    wanted = journal_index.wanted_fingerprints("m")
    for seq, t0, t1 in (("1", 1.0, 2.0), (1, "x", 2.0), (1, 1.0, None),
                        (True, 1.0, 2.0)):
        body = journal_index.encode_index("w", "s", "n", [(seq, t0, t1, fps)])
        assert journal_index.matching(body, wanted) == ("w", [])
    body = journal_index.encode_index(7, "s", "n", [(1, 1.0, 2.0, fps)])
    assert journal_index.matching(body, wanted) == (None, [])
    body = journal_index.encode_index("w", "s", "n", [(1, 1.0, 2.0, fps)])
    assert journal_index.matching(body, wanted) == ("w", [(1, 1.0, 2.0)])
