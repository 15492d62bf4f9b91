"""The journal's index: which batch names which ids, in a few bytes. Pure.

`evrouter trace` must answer for an hour of traffic (1,000 events/s, four
hops each: 14.4 million records, about 2.4 GB of batches) in 2 s; reading
the batches cannot, reading a small index can. Each writer, before it
publishes a group of batches to the journal, publishes one index message
naming them: per batch its sequence number, the first and last record time
(the writer's clock), and a 32-bit fingerprint (CRC-32) of every distinct
id it contains (message id, trace id, instance uuid, port). The index is a
stream of its own (`<prefix>.journal.index`). `trace` reads it, keeps the
batches whose fingerprints contain the wanted id's, and then reads only the
stretches of the journal around those batches.

No false negatives: every id of every record is fingerprinted, as the
string the reader compares (router/trace_cmd.py `matches`: the message id
and port exactly, the instance and trace id lower case, as written). A
false positive costs one extra stretch read: with 32-bit fingerprints, an
hour at 1,000 events/s (44 million fingerprints: four ids an event, from
each of three parts) gives one about every 50 traces.

Why fingerprints and not a Bloom filter per batch: a Bloom filter's false
positives grow with the number of batches (one test per batch), and a host
consumer's batches are small and many; a fingerprint's grow with the number
of ids only. At the sizes that matter (4 bytes an id against 2.4 bytes for
a 1-in-10,000 Bloom filter) the saving would not pay for its hashing.

On the wire: ``MAGIC``, one JSON line ``{"w": writer, "svc", "node",
"b": [[seq, t_first, t_last, n], ...]}``, then the fingerprints of each
batch in order, n little-endian 32-bit words each. Not JSON as a whole, so
a reader of batches (``journal.decode_batch``) finds no records in it.
"""

import array
import bisect
import json
import sys
import zlib

MAGIC = b"EVJI1\n"
# record tuple positions of the ids (journal.FIELDS: mid, tid, instance, port)
KEY_FIELDS = (2, 3, 4, 5)       # rec[2:6] in batch_fingerprints
_SWAP = sys.byteorder != "little"


def fingerprint(key):
    """The 32-bit fingerprint of an id (a str; anything else as its str)."""
    if type(key) is not str:
        key = str(key)
    return zlib.crc32(key.encode("utf-8", "surrogatepass"))


def batch_fingerprints(records):
    """The fingerprints of the distinct ids of `records` (tuples in
    journal.FIELDS order), as bytes. Runs in every writer, so the common
    case (all ids str) stays in C loops: 0.9 us a record against 2.5 us
    for a Python loop over the ids."""
    keys = set().union(*[rec[2:6] for rec in records])
    keys.discard(None)
    try:
        encoded = list(map(str.encode, keys))
    except (TypeError, UnicodeEncodeError):     # not str, or a lone surrogate
        encoded = None
    if encoded is None:
        words = array.array("I", map(fingerprint, keys))
    else:
        words = array.array("I", map(zlib.crc32, encoded))
    if _SWAP:
        words.byteswap()
    return words.tobytes()


def wanted_fingerprints(wanted):
    """Fingerprints to look for: `wanted` as given and lower case (the
    reader folds instance uuids and trace ids)."""
    return {fingerprint(wanted), fingerprint(wanted.lower())}


def encode_index(writer, service, node, entries):
    """[(seq, t_first, t_last, fingerprint bytes)] to one message body."""
    head = {"w": writer, "svc": service, "node": node,
            "b": [[seq, t0, t1, len(fps) // 4] for seq, t0, t1, fps in entries]}
    return b"".join([MAGIC, json.dumps(head, separators=(",", ":")).encode(),
                     b"\n"] + [fps for _, _, _, fps in entries])


# An index message names up to a group of batches' fingerprints (a few
# KB); anything far larger is not one of ours, and each trace would read it.
MAX_INDEX_BYTES = 1 << 20
# Batches one index message may name: a writer's group is 20.
MAX_ENTRIES = 1_000


def is_index(body):
    return body[:len(MAGIC)] == MAGIC and len(body) <= MAX_INDEX_BYTES


def matching(body, wanted_fps):
    """(writer, [(seq, t_first, t_last)] of the batches whose fingerprints
    include one of `wanted_fps`); (None, []) for a body that is not an index
    message. Total: any writer wrote it."""
    try:
        return _matching(body, wanted_fps)
    except Exception:
        return None, []


def _matching(body, wanted_fps):
    if not is_index(body):
        return None, []
    nl = body.find(b"\n", len(MAGIC))
    try:
        head = json.loads(body[len(MAGIC):nl])
        writer, batches = head["w"], head["b"]
        if type(batches) is not list or len(batches) > MAX_ENTRIES:
            return None, []
        counts = [int(b[3]) for b in batches]
        if type(writer) is not str or min(counts, default=0) < 0:
            return None, []
    except Exception:       # any writer wrote it: deep nesting, inf, ...
        return None, []
    blob = body[nl + 1:]
    ends = []           # the end (in words) of each batch's fingerprints
    total = 0
    for n in counts:
        total += n
        ends.append(total)
    hits = set()
    for fp in wanted_fps:
        needle = fp.to_bytes(4, "little")
        at = blob.find(needle)
        while at != -1:
            if at % 4 == 0:     # a match across two words is no match
                i = bisect.bisect_right(ends, at // 4)
                if i < len(batches):
                    hits.add(i)
            at = blob.find(needle, at + 1)
    out = []
    for i in sorted(hits):
        # any user that may write the journal may write an index message:
        # an entry that is not (int, finite time, finite time) is no entry
        seq, t0, t1 = batches[i][:3]
        if type(seq) is int and all(type(t) in (int, float) and
                                    0 <= t <= 1e10 for t in (t0, t1)):
            out.append((seq, t0, t1))
    return writer, out


def first_entry(body):
    """The sequence number of the first batch an index message names; None
    for anything else. Total."""
    if not is_index(body):
        return None
    try:
        head = json.loads(body[len(MAGIC):body.find(b"\n", len(MAGIC))])
        seq = head["b"][0][0]
        return seq if type(seq) is int else None
    except Exception:       # any writer wrote it
        return None
