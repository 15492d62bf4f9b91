"""What the journal costs the process that records: the writer thread's
CPU per record (encoding, index, publishing with confirms), at a steady
rate, beside record()'s own cost. Not a test.

    python -m tests.bench.bench_journal_cost [--rate 3000] [--seconds 10]
        [--batch-records 500] [--batch-ms 200] [--json] [--hot PAIRS]

--json: alternate with batches encoded as JSON (the encoding before
MessagePack) for a comparison in the same run.
"""

import argparse
import os
import sys
import time
import uuid

import kombu

from router import journal

URL = os.environ.get("EVROUTER_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//")


def run(prefix, rate, seconds, packed, batch_records=500, batch_ms=200):
    js = journal.JournalSettings(transport_url=URL, prefix=prefix,
                                 batch_records=batch_records,
                                 batch_seconds=batch_ms / 1000)
    j = journal.Journal(js, "bench-cost")
    if not packed:
        encode = journal.encode_batch

        def as_json(*args, **kwargs):
            return encode(*args, packed=False, **kwargs)
        journal.encode_batch = as_json
    j.start()
    try:
        ids = [(uuid.uuid4().hex, uuid.uuid4().hex, str(uuid.uuid4()),
                str(uuid.uuid4())) for _ in range(1000)]
        n, spent = 0, 0.0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            ahead = start + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            mid, tid, server, port = ids[n % 1000]
            t0 = time.thread_time()
            j.record(journal.ROUTED, mid, tid, server, port,
                     "network-vif-plugged", "completed", ["compute-1"])
            spent += time.thread_time() - t0
            n += 1
        assert j.flushed(30)
    finally:
        j.stop()
        if not packed:
            journal.encode_batch = encode
    return n, spent, j.stats


def _work(n):
    """Pure-Python work standing in for the router's ~70 us an event."""
    x = 0
    for i in range(n):
        x += i * i
    return x


def hot(prefix, seconds, on, spin):
    """Events/s of a thread doing `spin` work and one record() an event,
    with the journal on or off: its cost to a busy process, GIL and all."""
    js = journal.JournalSettings(transport_url=URL, prefix=prefix)
    j = journal.Journal(js, "bench-hot").start() if on else journal.NullJournal()
    ids = [(uuid.uuid4().hex, uuid.uuid4().hex, str(uuid.uuid4()),
            str(uuid.uuid4())) for _ in range(1000)]
    try:
        n = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for _ in range(100):
                _work(spin)
                mid, tid, server, port = ids[n % 1000]
                j.record(journal.ROUTED, mid, tid, server, port,
                         "network-vif-plugged", "completed", ["compute-1"])
                n += 1
        return n / (time.monotonic() - start)
    finally:
        j.stop()


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_journal_cost")
    p.add_argument("--rate", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--batch-records", type=int, default=500)
    p.add_argument("--batch-ms", type=int, default=200)
    p.add_argument("--json", action="store_true",
                   help="alternate with JSON-encoded batches")
    p.add_argument("--hot", type=int, default=0, metavar="PAIRS",
                   help="instead: PAIRS of off/on runs of a busy thread "
                        "(~70 us of work an event), events/s")
    args = p.parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        if args.hot:
            spin = 1000
            t0 = time.perf_counter()
            _work(spin)
            print(f"work {(time.perf_counter() - t0) * 1e6:.0f} us an event; "
                  f"load {os.getloadavg()[0]:.1f}")
            for i in range(args.hot):
                for on in ((False, True) if i % 2 == 0 else (True, False)):
                    rate = hot(prefix, args.seconds, on, spin)
                    print(f"journal {'on ' if on else 'off'}: {rate:,.0f} "
                          f"events/s (load {os.getloadavg()[0]:.1f})",
                          flush=True)
            return 0
        for packed in ((True, False, True, False) if args.json else
                       (True, True)):
            n, spent, stats = run(prefix, args.rate, args.seconds, packed,
                                  args.batch_records, args.batch_ms)
            print(f"{'msgpack' if packed else 'json   '}: {n:,} records at "
                  f"{args.rate}/s: writer thread {stats['cpu_us'] / n:.2f} us "
                  f"CPU a record ({stats['batches']} batches, "
                  f"{stats['index_messages']} index messages, "
                  f"{stats['bytes'] / n:.0f} + {stats['index_bytes'] / n:.0f} "
                  f"bytes a record); record() {spent / n * 1e6:.2f} us",
                  flush=True)
    finally:
        queues, exchanges = journal.names(prefix)
        with kombu.Connection(URL) as conn:
            ch = conn.channel()
            for q in queues:
                ch.queue_delete(q)
            for e in exchanges:
                ch.exchange_delete(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
