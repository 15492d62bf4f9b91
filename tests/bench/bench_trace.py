"""How long `evrouter trace` takes against a journal of N records.

Writes N records (four hops per event, as a routed event leaves them) with
the journal writer to a stream of its own, then times trace reads of one
event from the middle, the start and the end of it, by message id and by
instance uuid. The stream and its exchange are deleted afterwards.

    python -m tests.bench.bench_trace [--records 100000]
"""

import argparse
import os
import sys
import time
import uuid

import kombu

from router import journal, trace_cmd

URL = os.environ.get("EVROUTER_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//")


def main(argv=None):
    p = argparse.ArgumentParser(prog="bench_trace")
    p.add_argument("--records", type=int, default=100_000)
    args = p.parse_args(argv)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    js = journal.JournalSettings(transport_url=URL, prefix=prefix,
                                 max_pending=args.records + 1)
    events = args.records // 4
    picks = {"first": 0, "middle": events // 2, "last": events - 1}
    ids = {}
    j = journal.Journal(js, "bench-trace").start()
    try:
        start = time.monotonic()
        for i in range(events):
            mid, tid = uuid.uuid4().hex, uuid.uuid4().hex
            server, port = str(uuid.uuid4()), str(uuid.uuid4())
            for hop, detail in ((journal.PUBLISHED, "confirmed; host hint -"),
                                (journal.ROUTED, ["compute-1"]),
                                (journal.DELIVERED, "host compute-1"),
                                (journal.MATCHED, "woken")):
                j.record(hop, mid, tid, server, port, "network-vif-plugged",
                         "completed", detail)
            for name, at in picks.items():
                if at == i:
                    ids[name] = (mid, server)
        assert j.flushed(300), "journal not written"
        wrote = time.monotonic() - start
    finally:
        j.stop()
    print(f"journal: {events * 4:,} records ({events:,} events) written in "
          f"{wrote:.1f} s ({events * 4 / wrote:,.0f} records/s), "
          f"{j.stats['batches']} messages")
    try:
        for name, (mid, server) in ids.items():
            for what, wanted in (("message id", mid), ("instance", server)):
                found, stats = trace_cmd.read(URL, prefix, wanted, 3600,
                                              timeout=60)
                assert len(found) == 4, found
                print(f"trace of the {name} event by {what}: "
                      f"{stats['seconds']:.2f} s, {stats['messages']} "
                      f"messages read, {stats['records']} records decoded, "
                      f"end by {stats['end']}")
    finally:
        with kombu.Connection(URL) as conn:
            ch = conn.channel()
            ch.queue_delete(journal.stream_name(prefix))
            ch.exchange_delete(journal.stream_name(prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
