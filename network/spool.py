"""The local spool: messages the broker has not confirmed yet, kept on disk.

One append-only file, one record per line::

    P instance.network-vif-plugged {"version":"1.0",...}\\n
    P instance.network-vif-plugged;00-4bf9...-01 {"version":"1.0",...}\\n
    ^ flag: P pending, D done; then routing key (and, after a ";", the
      event's W3C traceparent, so a spooled event keeps its trace), a
      space, the message body

A record is durable once ``append`` returned (the file was fsync'd), which is
what lets the publisher tell its caller "accepted" while the broker is away.
After the broker confirmed a record, its flag byte is overwritten with ``D``
in place (a one-byte write cannot tear) and fsync'd; when nothing is pending
the file is truncated. Opening the spool again after a crash finds exactly
the pending records, oldest first. A torn last line (crash during an append
that never returned) is cut off.

Bounded in records and bytes: ``append`` beyond either raises SpoolFull and
writes nothing. An flock keeps a second process from sharing the file.

The file is input too (a crash, a disk, an older or newer release, a hand
that edited it): it must be a regular file (a symbolic link is refused, its
target never opened), and a line that is not a record this release can send
(its routing key not UTF-8 or over AMQP's 255 bytes, a flag or a form it
does not know) is never deleted and never blocks the records behind it: it
is copied to ``<path>.rejected`` (same format; renamed to a name of its
own beginning with ``<spool_path>.``, the Neutron plugin's next start takes
it over as an orphan), marked done, and named in one ERROR line per load,
without its contents. ``set_aside`` does the same for a record the
publisher will not send or the broker keeps returning.

Every write goes through ``_write_all``: ``pwrite`` may write less than it
was given (a file-size limit, a full disk, a signal) and says so only in its
return value. A short append is finished or, when the rest cannot be
written, cut off and raised, never reported as spooled.
"""

import collections
import errno
import fcntl
import glob
import logging
import os
import stat

from router.bus import tracecontext

LOG = logging.getLogger(__name__)

PENDING = b"P"
DONE = b"D"

REJECTED_SUFFIX = ".rejected"
MAX_KEY_BYTES = 255         # an AMQP short string

DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class SpoolError(Exception):
    pass


class SpoolFull(SpoolError):
    """The spool holds its maximum; the message was not accepted."""


class SpoolLocked(SpoolError):
    """Another process has this spool file open."""


class Record:
    __slots__ = ("offset", "length", "routing_key", "body", "traceparent")

    def __init__(self, offset, length, routing_key, body, traceparent=None):
        self.offset = offset
        self.length = length
        self.routing_key = routing_key
        self.body = body
        self.traceparent = traceparent


class Spool:
    def __init__(self, path, *, max_records=DEFAULT_MAX_RECORDS,
                 max_bytes=DEFAULT_MAX_BYTES):
        self.path = os.fspath(path)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._pending = collections.OrderedDict()   # offset -> Record
        self._bytes = 0            # pending bytes
        self._end = 0              # end of the last whole record
        self._unsaved = False      # bad lines kept only in this file
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700,
                    exist_ok=True)
        created = not os.path.lexists(self.path)
        self._fd = _open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolLocked(f"spool {self.path} is in use by another "
                                  f"process") from None
            if created:
                _fsync_dir(self.path)
            self._load()
        except BaseException:
            # A spool that could not be opened holds no lock: the next
            # attempt (this process's too) must not find it "in use".
            self.close()
            raise

    # --- state --------------------------------------------------------------
    def __len__(self):
        return len(self._pending)

    @property
    def pending_bytes(self):
        return self._bytes

    def close(self):
        if self._fd is not None:
            os.close(self._fd)     # releases the flock
            self._fd = None

    def _load(self):
        data = _read_all(self._fd)
        offset = 0
        bad = []                    # (offset, line, why): set aside below
        while offset < len(data):
            nl = data.find(b"\n", offset)
            if nl < 0:
                LOG.warning("spool %s: dropping a torn last record (%d bytes) "
                            "from an append that never completed", self.path,
                            len(data) - offset)
                break
            line = data[offset:nl]
            record, why = _parse(line, offset)
            if record is not None:
                self._remember(record)
            elif why is not None:
                bad.append((offset, line, why))
            offset = nl + 1
        self._end = offset
        if self._end != len(data):
            os.ftruncate(self._fd, self._end)
            os.fsync(self._fd)
        if bad and not self._reject(
                [line for _, line, _ in bad], [o for o, _, _ in bad],
                f"(the first, at byte {bad[0][0]}: {bad[0][2]})", len(bad)):
            # They stay in this file, and the file as it is: no truncation
            # or compaction while they could not be copied out.
            self._unsaved = True
        if not self._pending and self._end:
            self._truncate()
        if self._pending:
            LOG.info("spool %s: %d records pending from before", self.path,
                     len(self._pending))

    def _remember(self, record):
        self._pending[record.offset] = record
        self._bytes += record.length

    # --- writing ------------------------------------------------------------
    def append(self, items):
        """Durably add (routing_key, body[, traceparent]) items, all or
        none, in order. A traceparent that is not the W3C form is not kept."""
        items = [(i[0], i[1], _traceparent(i[2]) if len(i) > 2 else None)
                 for i in items]
        lines = []
        for routing_key, body, traceparent in items:
            if " " in routing_key or ";" in routing_key or b"\n" in body:
                raise ValueError("routing key without spaces or ';' and a body "
                                 "without newlines, please")
            lines.append(_line(routing_key, body, traceparent))
        size = sum(map(len, lines))
        if (len(self._pending) + len(lines) > self.max_records
                or self._bytes + size > self.max_bytes):
            raise SpoolFull(
                f"spool {self.path} is full ({len(self._pending)} records, "
                f"{self._bytes} bytes; limits {self.max_records} records, "
                f"{self.max_bytes} bytes): {len(lines)} message(s) refused")
        try:
            _write_all(self._fd, b"".join(lines), self._end)
            os.fsync(self._fd)
        except OSError:
            # Not accepted: leave nothing behind that a restart would replay.
            os.ftruncate(self._fd, self._end)
            raise
        for line, (routing_key, body, traceparent) in zip(lines, items,
                                                          strict=True):
            self._remember(Record(self._end, len(line), routing_key, body,
                                  traceparent))
            self._end += len(line)

    @property
    def rejected_path(self):
        return self.path + REJECTED_SUFFIX

    def set_aside(self, records, why):
        """Move pending records the broker will not take out of the way:
        copied to the rejected file, then done. Returns whether they were
        (else they stay pending, and the ERROR line says why)."""
        records = [r for r in records if r.offset in self._pending]
        if not records:
            return True
        if not self._reject([_line(r.routing_key, r.body, r.traceparent)[:-1]
                             for r in records], [], why, len(records)):
            return False
        self.done(records)
        return True

    def _reject(self, lines, offsets, why, count):
        """Append `lines` to the rejected file, then mark the lines at
        `offsets` done in place; one ERROR line. False (and those lines
        left as they are) if the rejected file cannot be written."""
        try:
            # O_NONBLOCK: a FIFO there (no reader) fails instead of hanging
            # the start; _open_regular refuses it and a link anyway.
            fd = _open_regular(self.rejected_path,
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK)
            try:
                _write_all(fd, b"".join(line + b"\n" for line in lines), None)
                os.fsync(fd)
            finally:
                os.close(fd)
            for offset in offsets:
                _write_all(self._fd, DONE, offset)
            if offsets:
                os.fsync(self._fd)
        except (OSError, SpoolError) as exc:
            LOG.error("spool %s: %d record(s) that can never be sent %s; they "
                      "could not be set aside in %s (%s) and stay in the file",
                      self.path, count, why, self.rejected_path, exc)
            return False
        LOG.error("spool %s: %d record(s) that can never be sent set aside in "
                  "%s %s", self.path, count, self.rejected_path, why)
        return True

    def peek(self, limit):
        """Up to `limit` pending records, oldest first."""
        out = []
        for record in self._pending.values():
            if len(out) >= limit:
                break
            out.append(record)
        return out

    def done(self, records):
        """Forget records the broker confirmed (durably)."""
        marked = False
        for record in records:
            if self._pending.pop(record.offset, None) is None:
                continue
            self._bytes -= record.length
            _write_all(self._fd, DONE, record.offset)
            marked = True
        if not marked:
            return
        if self._pending:
            os.fsync(self._fd)
            if self._end > 2 * self.max_bytes:
                self._compact()
        else:
            self._truncate()

    def _truncate(self):
        if self._unsaved:
            return          # lines set aside nowhere yet live only here
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._end = 0

    @property
    def holds_unsaved(self):
        """Lines this release cannot send that could not be copied to the
        rejected file: this file is their only copy (never truncated,
        compacted or removed while so)."""
        return self._unsaved

    def _compact(self):
        # Done records ahead of a spool that never empties: rewrite the
        # pending ones to a new file and swap it in atomically.
        if self._unsaved:
            return
        tmp = self.path + ".compact"
        try:
            os.unlink(tmp)      # whatever is there: ours to replace, not follow
        except FileNotFoundError:
            pass
        fd = _open_regular(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            records, end = [], 0
            for r in self._pending.values():
                line = _line(r.routing_key, r.body, r.traceparent)
                _write_all(fd, line, end)
                records.append(Record(end, len(line), r.routing_key, r.body,
                                      r.traceparent))
                end += len(line)
            os.fsync(fd)
            os.rename(tmp, self.path)
            _fsync_dir(self.path)
        except BaseException:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd, self._end = fd, end
        self._pending.clear()
        self._bytes = 0
        for r in records:
            self._remember(r)


def append_now(path, items, **limits):
    """Durably add (routing_key, body) pairs to the spool at `path` without
    a publisher: for events a process could not hand to one (its bus
    settings are wrong). The next publisher on that file sends them."""
    spool = Spool(path, **limits)
    try:
        spool.append(items)
    finally:
        spool.close()


def adopt_orphans(path, prefix, **limits):
    """Move the pending records of the spool files ``<prefix>*`` whose
    process is gone into the spool at `path`, oldest file first; remove them.

    A process spools to a file of its own (Neutron's API and RPC workers
    fork: ``<spool_path>.<pid>``); after a restart nobody has that name
    again, so a new process takes over what the old ones left. A file still
    locked belongs to a live process and is left alone. A crash between the
    append and the unlink sends those records twice: the waiter drops the
    second copy by id. Each file's records keep their order; files are
    taken oldest first (mtime), which orders nothing between processes.
    Returns the number of records adopted.
    """
    here = os.path.abspath(path)
    adopted = 0
    candidates = [f for f in glob.glob(glob.escape(prefix) + "*")
                  if os.path.abspath(f) != here
                  and not f.endswith((".compact", REJECTED_SUFFIX))]
    for orphan_path in sorted(candidates, key=_mtime):
        try:
            mode = os.lstat(orphan_path).st_mode
        except OSError:
            continue                # taken over meanwhile
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            LOG.error("spool %s: not a regular file, left alone", orphan_path)
            continue
        try:
            orphan = Spool(orphan_path, **limits)
        except SpoolLocked:
            continue
        except (OSError, SpoolError) as exc:
            LOG.error("spool %s: cannot be read, left in place: %s",
                      orphan_path, exc)
            continue
        try:
            if not _same_file(orphan, orphan_path):
                continue    # taken over and removed while we opened it
            records = orphan.peek(len(orphan))
            if records:
                append_now(path, [(r.routing_key, r.body, r.traceparent)
                                  for r in records],
                           **limits)
                LOG.warning("spool %s: %d record(s) left by a process that is "
                            "gone, taken over by %s", orphan_path,
                            len(records), path)
            if orphan.holds_unsaved:
                # its bad lines have no other copy: its records are ours
                # now (marked done there), the file stays for an operator
                orphan.done(records)
                LOG.error("spool %s: left in place, it holds lines that "
                          "could not be set aside", orphan_path)
            else:
                os.unlink(orphan_path)
                _fsync_dir(orphan_path)
            adopted += len(records)
        except (OSError, SpoolError) as exc:
            LOG.error("spool %s: %d record(s) could not be taken over, left "
                      "in place: %s", orphan_path, len(orphan), exc)
        finally:
            orphan.close()
    return adopted


def _same_file(spool, path):
    try:
        return os.path.samestat(os.fstat(spool._fd), os.stat(path))
    except OSError:
        return False


def _mtime(path):
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _parse(line, offset):
    """(Record, None) for a pending record this release can send; (None,
    None) for a done one or an empty line; (None, why) for anything else."""
    if not line or line[:1] == DONE:
        # done: written so, or marked so in place (the first byte only,
        # whatever the line was: set_aside and _load mark bad lines so)
        return None, None
    flag, _, rest = line.partition(b" ")
    routing_key, _, body = rest.partition(b" ")
    routing_key, _, traceparent = routing_key.partition(b";")
    if flag != PENDING or not routing_key or not body:
        return None, "not a record"
    if len(routing_key) > MAX_KEY_BYTES:
        return None, f"a routing key of {len(routing_key)} bytes"
    try:
        key = routing_key.decode("utf-8")
        traceparent = traceparent.decode("ascii")
    except UnicodeDecodeError:
        return None, "a routing key or traceparent that is not UTF-8"
    return Record(offset, len(line) + 1, key, body,
                  _traceparent(traceparent)), None


def _open_regular(path, flags):
    """An fd on the regular file at `path`; a symbolic link or anything
    else is refused (SpoolError), its target never opened."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SpoolError(f"spool {path} is a symbolic link; refused") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SpoolError(f"spool {path} is not a regular file; refused")
    return fd


def _line(routing_key, body, traceparent):
    """One pending record as written: the only place that writes one."""
    key = routing_key.encode()
    if traceparent is not None:
        key += b";" + traceparent.encode()
    return b"%s %s %s\n" % (PENDING, key, body)


def _traceparent(value):
    """A valid traceparent as str, else None (a file is input too)."""
    if not value:
        return None
    return tracecontext.valid(value)


def _write_all(fd, data, offset):
    """Write all of `data` at `offset` (None: where the fd is, as an
    O_APPEND one), or raise OSError."""
    view = memoryview(data)
    while view:
        written = (os.write(fd, view) if offset is None
                   else os.pwrite(fd, view, offset))
        if written <= 0:
            # POSIX allows 0 for a non-empty write without saying why.
            raise OSError(errno.EIO, f"wrote nothing of {len(view)} bytes "
                                     f"at offset {offset}")
        view = view[written:]
        if offset is not None:
            offset += written


def _read_all(fd):
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
