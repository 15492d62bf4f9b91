"""The spool and short writes: pwrite may write less than it was given.

Either the whole record is on disk when ``append`` returns, or ``append``
raises and a reopened spool does not contain it.
"""

import os
import subprocess
import sys
import textwrap

from network import spool as spool_module
from network.spool import Spool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_short_writes_are_finished(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def at_most_seven_bytes(fd, data, offset):
        calls.append(len(data))
        return real_pwrite(fd, bytes(data[:7]), offset)

    monkeypatch.setattr(spool_module.os, "pwrite", at_most_seven_bytes)
    s = Spool(tmp_path / "s")
    s.append([("instance.a", b'{"n":1,"pad":"xxxxxxxxxx"}'),
              ("instance.b", b'{"n":2}')])
    s.done(s.peek(1))
    s.close()
    monkeypatch.undo()
    assert len(calls) > 2
    s = Spool(tmp_path / "s")
    assert [(r.routing_key, r.body) for r in s.peek(10)] == [
        ("instance.b", b'{"n":2}')]
    s.close()


def test_a_write_that_makes_no_progress_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module.os, "pwrite", lambda fd, data, off: 0)
    s = Spool(tmp_path / "s")
    try:
        s.append([("instance.a", b"{}")])
    except OSError:
        pass
    else:
        raise AssertionError("append of an unwritten record returned")
    monkeypatch.undo()
    s.close()
    assert os.path.getsize(tmp_path / "s") == 0


# Run in a child: RLIMIT_FSIZE is per process and would limit pytest too.
# Python ignores SIGXFSZ, so the write beyond the limit is an OSError (EFBIG).
_FILE_SIZE_LIMIT = textwrap.dedent("""
    import resource, sys
    from network.spool import Spool
    path = sys.argv[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    s = Spool(path)
    s.append([("instance.a", b"x" * 40)])         # 54 bytes: fits
    try:
        s.append([("instance.b", b"y" * 60)])     # 74 more: only 46 fit
    except OSError as exc:
        print("refused", exc.errno)
    else:
        print("spooled")
    s.close()
""")


def test_a_file_size_limit_refuses_the_record_instead_of_losing_it(tmp_path):
    path = tmp_path / "s"
    child = subprocess.run(
        [sys.executable, "-c", _FILE_SIZE_LIMIT, str(path)], cwd=REPO,
        capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split()[0] == "refused", child.stdout
    # Nothing torn left behind, and the record before it intact.
    assert os.path.getsize(path) == len(b"P instance.a " + b"x" * 40 + b"\n")
    s = Spool(path)
    assert [r.body for r in s.peek(10)] == [b"x" * 40]
    s.close()
