"""How long `evrouter trace` takes against a journal of N records.

Writes N records (four hops per event, as a routed event leaves them: the
publisher's, the router's, and the host consumer's two, each part with a
journal of its own, as in a deployment) to a stream of its own, then times
trace reads of the first, middle and last event by message id, port and
instance uuid: through the index (router/journal_index.py) and, unless
--no-full, by reading the whole journal (the path of writers without the
index). The streams and exchanges are deleted afterwards.

The journal is written as fast as the writers go, not at 1,000 events/s:
a second of the broker's clock holds more records than at that rate, so a
read around an indexed batch (a few seconds) reads more than it would in a
real hour. The index path's times here are an upper bound for that reason.

    python -m tests.bench.bench_trace [--records 100000] [--no-full]
"""

import argparse
import os
import sys
import time
import uuid

import kombu

from router import journal, trace_cmd

URL = os.environ.get("EVROUTER_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//")

HOPS = (("publisher", journal.PUBLISHED, "confirmed; host hint -"),
        ("router", journal.ROUTED, ["compute-1"]),
        ("host", journal.DELIVERED, "host compute-1"),
        ("host", journal.MATCHED, "woken"))


def write(prefix, records):
    """Write `records` records; {pick: (message id, port, instance)}."""
    events = records // 4
    picks = {"first": 0, "middle": events // 2, "last": events - 1}
    ids = {}
    js = journal.JournalSettings(transport_url=URL, prefix=prefix,
                                 max_pending=200_000, max_bytes=20 << 30)
    parts = {name: journal.Journal(js, f"bench-{name}").start()
             for name in ("publisher", "router", "host")}
    start = time.monotonic()
    try:
        for i in range(events):
            mid, tid = uuid.uuid4().hex, uuid.uuid4().hex
            server, port = str(uuid.uuid4()), str(uuid.uuid4())
            for part, hop, detail in HOPS:
                j = parts[part]
                while j.backlog > 150_000:      # no drops: wait for the writer
                    time.sleep(0.01)
                j.record(hop, mid, tid, server, port, "network-vif-plugged",
                         "completed", detail)
            for name, at in picks.items():
                if at == i:
                    ids[name] = (mid, port, server)
        for j in parts.values():
            assert j.flushed(600), "journal not written"
        wrote = time.monotonic() - start
    finally:
        for j in parts.values():
            j.stop()
    dropped = sum(j.stats["dropped"] for j in parts.values())
    assert not dropped, f"{dropped} records dropped"
    print(f"journal: {events * 4:,} records ({events:,} events) written in "
          f"{wrote:.1f} s ({events * 4 / wrote:,.0f} records/s), "
          f"{sum(j.stats['batches'] for j in parts.values())} batches, "
          f"{sum(j.stats['index_messages'] for j in parts.values())} index "
          f"messages")
    for what, key in (("batches", "bytes"), ("index", "index_bytes")):
        size = sum(j.stats[key] for j in parts.values())
        print(f"  {what}: {size / 1e6:,.1f} MB ({size / (events * 4):.1f} "
              f"bytes per record)")
    return ids


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_trace")
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--no-full", action="store_true",
                   help="time only the index path (a full read of a large "
                        "journal takes long)")
    p.add_argument("--full-timeout", type=float, default=120)
    args = p.parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        ids = write(prefix, args.records)
        paths = [True] if args.no_full else [True, False]
        for name, (mid, port, server) in ids.items():
            for what, wanted in (("message id", mid), ("port", port),
                                 ("instance", server)):
                for indexed in paths:
                    if not indexed and what != "message id":
                        continue    # the full read's time is the same
                    found, stats = trace_cmd.read(
                        URL, prefix, wanted, 24 * 3600, index=indexed,
                        timeout=60 if indexed else args.full_timeout)
                    assert len(found) == 4, (name, what, indexed, found)
                    print(f"trace of the {name} event by {what} "
                          f"({stats['path']}): {stats['seconds']:.2f} s, "
                          f"{stats['index_messages']} index messages, "
                          f"{stats.get('batches_matched', '-')} batches "
                          f"matched, {stats['reads']} reads, "
                          f"{stats['messages']} journal messages read, "
                          f"{stats['records']} records decoded")
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
