"""The on-disk spool: ordered, durable, bounded, single-owner."""

import logging
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from network.spool import Spool, SpoolFull, SpoolLocked


def bodies(spool, limit=1000):
    return [r.body for r in spool.peek(limit)]


def test_records_come_back_in_order_and_survive_reopening(tmp_path):
    path = tmp_path / "s"
    s = Spool(path)
    s.append([("instance.a", b'{"n":1}'), ("instance.b", b'{"n":2}')])
    s.append([("instance.c", b'{"n":3}')])
    assert [(r.routing_key, r.body) for r in s.peek(10)] == [
        ("instance.a", b'{"n":1}'), ("instance.b", b'{"n":2}'),
        ("instance.c", b'{"n":3}')]
    s.done(s.peek(1))
    s.close()
    s = Spool(path)
    assert bodies(s) == [b'{"n":2}', b'{"n":3}']
    assert len(s) == 2
    s.close()


def test_done_out_of_order_and_twice(tmp_path):
    s = Spool(tmp_path / "s")
    s.append([("k", b"%d" % i) for i in range(5)])
    first, second, third, *_ = s.peek(5)
    s.done([third])
    s.done([third, first])
    assert bodies(s) == [b"1", b"3", b"4"]
    s.close()
    s = Spool(tmp_path / "s")
    assert bodies(s) == [b"1", b"3", b"4"]


def test_an_empty_spool_is_an_empty_file(tmp_path):
    path = tmp_path / "s"
    s = Spool(path)
    s.append([("k", b"x"), ("k", b"y")])
    assert os.path.getsize(path) > 0
    s.done(s.peek(10))
    assert os.path.getsize(path) == 0
    assert len(s) == 0 and s.pending_bytes == 0
    s.append([("k", b"z")])
    s.close()
    assert bodies(Spool(path)) == [b"z"]


def test_a_torn_last_record_is_dropped(tmp_path, caplog):
    path = tmp_path / "s"
    s = Spool(path)
    s.append([("k", b"whole")])
    s.close()
    with open(path, "ab") as f:
        f.write(b"P k half-writ")          # the crash hit mid-append
    with caplog.at_level(logging.WARNING):
        s = Spool(path)
    assert bodies(s) == [b"whole"]
    assert "torn" in caplog.text
    s.append([("k", b"next")])
    s.close()
    assert bodies(Spool(path)) == [b"whole", b"next"]


def test_a_damaged_record_is_set_aside_loudly(tmp_path, caplog):
    path = tmp_path / "s"
    s = Spool(path)
    s.append([("k", b"1"), ("k", b"2"), ("k", b"3")])
    s.close()
    data = bytearray(path.read_bytes())
    second = data.index(b"P k 2")
    data[second] = ord("?")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        s = Spool(path)
    assert bodies(s) == [b"1", b"3"]
    assert "1 record(s) that can never be sent set aside" in caplog.text
    assert s.rejected_path.encode() in caplog.text.encode()
    assert (tmp_path / "s.rejected").read_bytes() == b"? k 2\n"
    s.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        s = Spool(path)             # set aside once, not at every start
    assert bodies(s) == [b"1", b"3"] and caplog.text == ""
    assert (tmp_path / "s.rejected").read_bytes() == b"? k 2\n"


# What a file can hold that no append writes: every kind of line a disk, a
# crash, another release or a hand could leave.
_KEYS = st.one_of(st.sampled_from([b"instance.network-vif-plugged", b"k"]),
                  st.binary(min_size=1, max_size=300).filter(
                      lambda b: b" " not in b and b"\n" not in b and b";" not in b))
_LINES = st.one_of(
    st.tuples(st.just(b"P"), _KEYS, st.binary(min_size=1, max_size=20).filter(
        lambda b: b"\n" not in b)).map(lambda t: b" ".join(t)),
    st.tuples(st.just(b"D"), _KEYS, st.just(b"{}")).map(lambda t: b" ".join(t)),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b))


def _sendable(line):
    flag, _, rest = line.partition(b" ")
    key, _, body = rest.partition(b" ")
    key = key.partition(b";")[0]
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return flag == b"P" and 0 < len(key) <= 255 and bool(body)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINES, max_size=12))
def test_whatever_a_file_holds_it_opens_and_loses_no_line(tmp_path_factory, lines):
    """Invariants over any file: opening never raises; the pending records
    are exactly the sendable lines, in order; every other line that is not
    done or empty is in the rejected file, once, byte for byte; opening
    again changes nothing; and nothing is left locked."""
    path = tmp_path_factory.mktemp("spool") / "s"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    s = Spool(path)
    expected = [line.split(b" ", 2)[2] for line in lines if _sendable(line)]
    assert bodies(s) == expected
    aside = [line for line in lines if line and not line.startswith(b"D")
             and not _sendable(line)]
    rejected = path.with_name("s.rejected")
    got = rejected.read_bytes() if rejected.exists() else b""
    assert got == b"".join(line + b"\n" for line in aside)
    for record in s.peek(100):
        assert len(record.routing_key.encode()) <= 255
    s.close()
    s = Spool(path)                 # the lock went with the close
    assert bodies(s) == expected
    assert (rejected.read_bytes() if rejected.exists() else b"") == got
    s.close()


def test_a_spool_that_failed_to_open_holds_no_lock(tmp_path, monkeypatch):
    import network.spool as spool_mod
    path = tmp_path / "s"
    Spool(path).close()
    real = spool_mod._read_all

    def failing(fd):
        monkeypatch.setattr(spool_mod, "_read_all", real)
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(spool_mod, "_read_all", failing)
    with pytest.raises(OSError):
        Spool(path)
    Spool(path).close()             # not SpoolLocked by our own leaked fd


def test_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path):
    from network.spool import SpoolError, adopt_orphans
    precious = tmp_path / "precious.conf"
    precious.write_bytes(b"password = s3cret\n")
    prefix = str(tmp_path / "evrouter-spool.")
    os.symlink(precious, prefix + "4242")
    with pytest.raises(SpoolError, match="symbolic link"):
        Spool(prefix + "4242")
    _spooled(prefix + "4243", b"good")
    assert adopt_orphans(prefix + "1", prefix) == 1
    assert precious.read_bytes() == b"password = s3cret\n"
    assert os.path.islink(prefix + "4242")
    assert bodies(Spool(prefix + "1")) == [b"good"]


def test_an_orphan_of_garbage_is_set_aside_not_deleted(tmp_path, caplog):
    from network.spool import adopt_orphans
    prefix = str(tmp_path / "evrouter-spool.")
    garbage = b"".join(b"X s3cret-line %d\n" % i for i in range(5000))
    (tmp_path / "evrouter-spool.77").write_bytes(garbage + b"P k body\n")
    with caplog.at_level(logging.ERROR):
        assert adopt_orphans(prefix + "1", prefix) == 1
    assert (tmp_path / "evrouter-spool.77.rejected").read_bytes() == garbage
    assert len(caplog.records) == 1         # one line, not one a record
    assert b"s3cret" not in caplog.text.encode()
    assert bodies(Spool(prefix + "1")) == [b"body"]
    # and the rejected file is no orphan
    assert adopt_orphans(prefix + "1", prefix) == 0
    assert (tmp_path / "evrouter-spool.77.rejected").exists()


def test_full_by_records_refuses_all_and_writes_nothing(tmp_path):
    path = tmp_path / "s"
    s = Spool(path, max_records=3)
    s.append([("k", b"1"), ("k", b"2")])
    size = os.path.getsize(path)
    with pytest.raises(SpoolFull, match="full"):
        s.append([("k", b"3"), ("k", b"4")])
    assert os.path.getsize(path) == size
    s.append([("k", b"3")])
    with pytest.raises(SpoolFull):
        s.append([("k", b"4")])
    s.done(s.peek(1))
    s.append([("k", b"4")])
    assert bodies(s) == [b"2", b"3", b"4"]


def test_full_by_bytes(tmp_path):
    s = Spool(tmp_path / "s", max_bytes=40)
    s.append([("k", b"x" * 20)])
    with pytest.raises(SpoolFull):
        s.append([("k", b"y" * 20)])
    assert bodies(s) == [b"x" * 20]


def test_the_directory_is_created(tmp_path):
    s = Spool(tmp_path / "var" / "lib" / "evrouter" / "network.spool")
    s.append([("k", b"x")])
    assert len(s) == 1


def test_one_process_at_a_time(tmp_path):
    s = Spool(tmp_path / "s")
    with pytest.raises(SpoolLocked):
        Spool(tmp_path / "s")
    s.close()
    Spool(tmp_path / "s").close()


def test_refuses_what_it_could_not_read_back(tmp_path):
    s = Spool(tmp_path / "s")
    with pytest.raises(ValueError):
        s.append([("a key", b"x")])
    with pytest.raises(ValueError):
        s.append([("k", b"two\nlines")])
    assert len(s) == 0


def test_compaction_keeps_order_when_the_spool_never_empties(tmp_path):
    path = tmp_path / "s"
    s = Spool(path, max_bytes=200)
    expected = []
    for i in range(100):
        s.append([("k", b"%03d" % i)])
        expected.append(b"%03d" % i)
        if len(expected) > 3:
            s.done(s.peek(1))
            expected.pop(0)
    assert bodies(s) == expected
    assert os.path.getsize(path) <= 2 * 200 + 20
    s.close()
    assert bodies(Spool(path)) == expected


ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 4)),
    st.tuples(st.just("done"), st.integers(1, 4)),
    st.tuples(st.just("reopen"), st.just(0))), max_size=30)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_behaves_like_a_queue_across_restarts(tmp_path_factory, script):
    path = tmp_path_factory.mktemp("spool") / "s"
    model, n = [], 0
    s = Spool(path, max_bytes=300)
    for op, k in script:
        if op == "append":
            items = [("instance.x", b"%d" % (n + i)) for i in range(k)]
            n += k
            try:
                s.append(items)
            except SpoolFull:
                assert s.pending_bytes + sum(len(b) + 14 for _, b in items) > 300
            else:
                model += [b for _, b in items]
        elif op == "done":
            s.done(s.peek(k))
            del model[:k]
        else:
            s.close()
            s = Spool(path, max_bytes=300)
        assert bodies(s) == model
    s.close()


# --- a process's spool taken over by the next one ---------------------------
# Neutron's workers spool to <spool_path>.<pid>: after a restart no process
# has that name again, so what was pending must be taken over, not lost.

def _spooled(path, *bodies_):
    s = Spool(path)
    s.append([("instance.a", b) for b in bodies_])
    s.close()


def test_orphans_are_taken_over_in_order_and_removed(tmp_path):
    from network.spool import adopt_orphans
    prefix = str(tmp_path / "spool.")
    _spooled(prefix + "101", b"1", b"2")
    os.utime(prefix + "101", (1, 1))            # the older file comes first
    _spooled(prefix + "102", b"3")
    mine = prefix + "200"
    assert adopt_orphans(mine, prefix) == 3
    s = Spool(mine)
    assert bodies(s) == [b"1", b"2", b"3"]
    s.close()
    assert sorted(os.listdir(tmp_path)) == ["spool.200"]


def test_a_live_processs_spool_is_left_alone(tmp_path):
    from network.spool import adopt_orphans
    prefix = str(tmp_path / "spool.")
    _spooled(prefix + "101", b"1")
    live = Spool(prefix + "101")        # its process still holds the lock
    try:
        assert adopt_orphans(prefix + "200", prefix) == 0
        assert len(live) == 1
    finally:
        live.close()
    assert os.path.exists(prefix + "101")


def test_done_records_are_not_taken_over_and_a_full_target_keeps_the_orphan(
        tmp_path):
    from network.spool import adopt_orphans
    prefix = str(tmp_path / "spool.")
    s = Spool(prefix + "101")
    s.append([("instance.a", b"sent"), ("instance.a", b"pending")])
    s.done(s.peek(1))
    s.close()
    assert adopt_orphans(prefix + "200", prefix) == 1
    s = Spool(prefix + "200")
    assert bodies(s) == [b"pending"]
    s.close()
    _spooled(prefix + "102", b"x", b"y")
    assert adopt_orphans(prefix + "200", prefix, max_records=2) == 0
    assert os.path.exists(prefix + "102")       # nothing lost: tried again later
    s = Spool(prefix + "200")
    assert bodies(s) == [b"pending"]
    s.close()


def test_append_now_is_what_the_next_publisher_finds(tmp_path):
    from network.spool import append_now
    path = tmp_path / "spool.1"
    append_now(path, [("instance.a", b"1"), ("instance.b", b"2")])
    s = Spool(path)
    assert [(r.routing_key, r.body) for r in s.peek(10)] == [
        ("instance.a", b"1"), ("instance.b", b"2")]
    s.close()


# --- the event's trace kept with it --------------------------------------------
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
traces = st.one_of(st.none(), st.just(TP), st.builds(
    lambda t, s: f"00-{t:032x}-{s:016x}-01", st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "done", "reopen"]),
                          st.lists(traces, min_size=1, max_size=3)),
                max_size=25))
def test_a_spooled_events_trace_survives_reopening_and_compaction(
        tmp_path_factory, script):
    path = tmp_path_factory.mktemp("spool") / "s"
    model, n = [], 0
    s = Spool(path, max_bytes=600)      # small: compaction happens
    for op, tps in script:
        if op == "append":
            items = [("instance.x", b"%d" % (n + i), tp)
                     for i, tp in enumerate(tps)]
            n += len(items)
            try:
                s.append(items)
            except SpoolFull:
                pass
            else:
                model += [(b, tp) for _, b, tp in items]
        elif op == "done":
            s.done(s.peek(len(tps)))
            del model[:len(tps)]
        else:
            s.close()
            s = Spool(path, max_bytes=600)
        assert [(r.body, r.traceparent) for r in s.peek(1000)] == model
        assert all(r.routing_key == "instance.x" for r in s.peek(1000))
    s.close()


@pytest.mark.parametrize("bad", ["not-a-trace", "00-" + "0" * 32 + "-" + "1" * 16
                                 + "-01", TP.upper(), TP + " x"])
def test_a_traceparent_that_is_not_the_w3c_form_is_not_kept(tmp_path, bad):
    s = Spool(tmp_path / "s")
    s.append([("instance.x", b"1", bad)])
    assert s.peek(1)[0].traceparent is None
    s.close()
    assert Spool(tmp_path / "s").peek(1)[0].traceparent is None


def test_an_old_spool_file_reads_as_before(tmp_path):
    (tmp_path / "s").write_bytes(b'P instance.x {"n":1}\nP instance.y;' +
                                 TP.encode() + b' {"n":2}\n')
    s = Spool(tmp_path / "s")
    assert [(r.routing_key, r.body, r.traceparent) for r in s.peek(9)] == [
        ("instance.x", b'{"n":1}', None), ("instance.y", b'{"n":2}', TP)]


def test_an_adopted_orphans_traces_come_along(tmp_path):
    from network.spool import adopt_orphans
    prefix = str(tmp_path / "spool.")
    s = Spool(prefix + "101")
    s.append([("instance.a", b"1", TP), ("instance.a", b"2")])
    s.close()
    os.utime(prefix + "101", (1, 1))
    adopt_orphans(prefix + "200", prefix)
    assert [(r.body, r.traceparent) for r in Spool(prefix + "200").peek(9)] == [
        (b"1", TP), (b"2", None)]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_bad_lines_that_cannot_be_set_aside_are_kept_through_everything(
        tmp_path, kind, caplog):
    """The rejected file is derived input too: a FIFO there hung the start,
    a link raised out of Spool(), and lines that 'stay in the file' were
    then truncated with the last good record, compacted away, or unlinked
    with their orphan."""
    path = tmp_path / "s"
    rejected = tmp_path / "s.rejected"
    if kind == "directory":
        rejected.mkdir()
    elif kind == "fifo":
        os.mkfifo(rejected)
    else:
        os.symlink(tmp_path / "elsewhere", rejected)
    bad = b"X not a record\n"
    path.write_bytes(b"P k good\n" + bad)
    with caplog.at_level(logging.ERROR):
        s = Spool(path, max_bytes=64)
    assert bodies(s) == [b"good"] and "could not be set aside" in caplog.text
    s.done(s.peek(1))                       # nothing pending: no truncation
    assert bad in path.read_bytes()
    for i in range(40):                     # past 2 * max_bytes: no compaction
        s.append([("k", b"%d" % i)])
        s.done(s.peek(1))
    assert bad in path.read_bytes()
    s.close()
    from network.spool import adopt_orphans
    orphan = tmp_path / "evrouter-spool.9"
    os.rename(path, orphan)
    if kind != "symlink":
        os.rename(rejected, tmp_path / "evrouter-spool.9.rejected")
    else:
        os.symlink(tmp_path / "elsewhere", tmp_path / "evrouter-spool.9.rejected")
    adopt_orphans(str(tmp_path / "evrouter-spool.1"), str(tmp_path / "evrouter-spool."))
    assert bad in orphan.read_bytes()       # left in place, its line with it
    assert adopt_orphans(str(tmp_path / "evrouter-spool.1"),
                         str(tmp_path / "evrouter-spool.")) == 0   # not twice
