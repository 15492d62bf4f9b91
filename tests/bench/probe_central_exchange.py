"""What a central exchange would cost the broker (issue 22, item 1). Not a test.

    python -m tests.bench.probe_central_exchange [--hosts 2000] [--events 20000]
        [--broker dedicated [--broker-conf 'queue_index_embed_msgs_below = 0']]

The design question: the router publishes each host copy straight to the
host's topic exchange today, so it must know the exchange exists (a passive
declare, budgeted and cached: router/observer.py KnownHosts) because a
publish to a missing exchange closes the channel. With one central topic
exchange that every host exchange is bound to (exchange-to-exchange, binding
key = the host), the router publishes there with the host in the routing
key and `mandatory`: a host without an exchange is a returned message, never
a closed channel, and there is nothing to check or cache. The price is a
second routing step in the broker, and the routing key carrying the host
(the host queue then binds that key too).

This measures that price alone, with plain py-amqp and no router: --hosts
host exchanges and queues (as evrouter declares them), --events persistent
messages spread over them with pipelined confirms, once published to each
host exchange directly (key instance.<name>) and once to the central
exchange (key <host>), alternating --rounds times; the broker's CPU per
message (its beam.smp process, /proc) and the publisher's rate.
"""

import argparse
import os
import time
import uuid

import amqp

from tests.bench import storm_broker

URL = dict(host="127.0.0.1:5672", userid="guest", password="guest",
           virtual_host="/")


def declare(ch, prefix, hosts, queue_type="classic"):
    central = f"{prefix}.hosts"
    ch.exchange_declare(central, "topic", durable=True, auto_delete=False)
    for h in hosts:
        ex, q = f"{prefix}.host.{h}", f"{prefix}.host.{h}.events"
        ch.exchange_declare(ex, "topic", durable=True, auto_delete=False)
        ch.queue_declare(q, durable=True, auto_delete=False,
                         arguments={"x-queue-type": queue_type})
        ch.queue_bind(q, ex, "instance.*")
        ch.queue_bind(q, ex, h)                 # the key the central path carries
        ch.exchange_bind(ex, central, h)        # destination, source, key
    return central


def delete(ch, prefix, hosts):
    for h in hosts:
        ch.queue_delete(f"{prefix}.host.{h}.events")
        ch.exchange_delete(f"{prefix}.host.{h}")
    ch.exchange_delete(f"{prefix}.hosts")


class Confirms:
    """Publisher confirms on one channel: tags count from 1 per channel, and
    a queue's confirms may come before another's earlier ones."""

    def __init__(self, ch):
        self.sent = 0
        self.outstanding = set()
        self.returned = 0
        ch.events["basic_ack"].add(self._ack)
        ch.events["basic_return"].add(self._return)

    def _ack(self, tag, multiple):
        if multiple:
            self.outstanding = {t for t in self.outstanding if t > tag}
        else:
            self.outstanding.discard(tag)

    def _return(self, *args):
        self.returned += 1


def publish(conn, ch, confirms, targets, body, window=512, mode=2):
    """Every (exchange, key) once, persistent, mandatory, confirms
    pipelined `window` deep. Returns (seconds, returned)."""
    returned0 = confirms.returned
    start = time.monotonic()
    for exchange, key in targets:
        ch.basic_publish(amqp.Message(body, delivery_mode=mode), exchange, key,
                         mandatory=True)
        confirms.sent += 1
        confirms.outstanding.add(confirms.sent)
        while len(confirms.outstanding) >= window:
            conn.drain_events(timeout=10)
    while confirms.outstanding:
        conn.drain_events(timeout=10)
    return time.monotonic() - start, confirms.returned - returned0


def main(argv=None):
    p = argparse.ArgumentParser(prog="probe_central_exchange")
    p.add_argument("--hosts", type=int, default=2000)
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--queue-type", choices=("classic", "quorum"),
                   default="classic")
    p.add_argument("--transient", action="store_true",
                   help="delivery_mode 1: what persistence costs, by difference")
    p.add_argument("--body", type=int, default=400, help="bytes per message")
    storm_broker.add_arguments(p)
    args = p.parse_args(argv)
    with storm_broker.chosen(args.broker, conf=args.broker_conf,
                             name="evrouter-probe", port=5694) as broker:
        return probe(args, dict(URL, host=f"127.0.0.1:{broker.port}"),
                     broker.process)


def probe(args, url, broker):
    prefix = f"probe-{uuid.uuid4().hex[:8]}"
    hosts = [f"h{i}" for i in range(args.hosts)]
    body = os.urandom(args.body)
    conn = amqp.Connection(**url)
    conn.connect()
    ch = conn.channel()
    ch.confirm_select()
    confirms = Confirms(ch)
    try:
        central = declare(ch, prefix, hosts, args.queue_type)
        ways = {
            "direct to host exchanges": [
                (f"{prefix}.host.{hosts[i % len(hosts)]}",
                 "instance.network-vif-plugged") for i in range(args.events)],
            "through the central exchange": [
                (central, hosts[i % len(hosts)]) for i in range(args.events)],
        }
        results = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, targets in ways.items():
                for h in hosts:
                    ch.queue_purge(f"{prefix}.host.{h}.events")
                c0 = storm_broker.cpu_seconds(broker)
                took, returned = publish(conn, ch, confirms, targets, body,
                                         mode=1 if args.transient else 2)
                used = storm_broker.cpu_seconds(broker) - c0
                depth = sum(ch.queue_declare(f"{prefix}.host.{h}.events",
                                             passive=True).message_count
                            for h in hosts[:10])
                per_host = args.events // len(hosts)
                assert returned == 0 and \
                    depth == min(10, len(hosts)) * per_host, (returned, depth)
                results[name].append((args.events / took,
                                       used / args.events * 1e6))
        for name, runs in results.items():
            rates = ", ".join(f"{r:,.0f}/s" for r, _ in runs)
            cpus = ", ".join(f"{c:.0f}" for _, c in runs)
            print(f"{args.hosts:,} {args.queue_type} host queues, {name}: "
                  f"{rates}; broker CPU per "
                  f"message {cpus} us", flush=True)
        # a host with no exchange: returned, the channel stays open
        took, returned = publish(conn, ch, confirms, [(central, "no-such-host")],
                                body)
        print(f"a copy for a host with no exchange: returned={returned}, "
              f"channel open={ch.is_open}")
    finally:
        delete(ch, prefix, hosts)
        conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
