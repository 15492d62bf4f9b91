"""The router's own code per event, without a broker: deterministic-ish.

    PYTHONPATH=<checkout>[:tenacity] python tests/bench/router_micro.py [--events N] [--batch B]
        [--repeat R] [--profile out.prof] [--real-publish]

A session (new: router.session.Session; old: router.service._Session) is
built by hand on a fake connection whose channels do nothing (no sockets,
no frames: --real-publish makes prepare_message build the real amqp.Message
as kombu does). Real kombu pyamqp Messages (as the buffered transport hands
them over) are fed to the session's loop in batches of B; each batch's
copies are then confirmed with one multiple ack, as the broker does, and
the loop's turn settles and acknowledges them. Prints the best of R runs
of process CPU per event.

Works on this checkout and on the code before issue 19's reshaping
(router.service._Session; git worktree add ... 42e89b0, PYTHONPATH with
tenacity). Time on a shared VM is noisy; callgrind's instruction count is
not. Instructions per routed event, with the build cost subtracted:

    ir() { PYTHONHASHSEED=0 PYTHONPATH=$CHECKOUT valgrind --tool=callgrind \
        --callgrind-out-file=/tmp/cg.$1 python tests/bench/router_micro.py \
        --events 3000 --repeat 0 $2 2>&1 | sed -n 's/.*Collected : //p'; }
    echo $(( ($(ir feed "") - $(ir nofeed --no-feed)) / 3000 ))
"""

import argparse
import collections
import cProfile
import os
import sys
import time
import uuid

import amqp
from kombu.transport import pyamqp

import router
from router import service as service_mod
from router.acks import AckWindow
from router.bus import contract, topology

# An editable install of /work/main also finds modules the checkout lacks.
NEW = os.path.exists(os.path.join(os.path.dirname(router.__file__), "session.py"))
if NEW:
    from router import session as session_mod

HOST = "cpu-host"


class FakeChannel:
    def __init__(self, conn, real_publish):
        self.connection = conn
        self.events = collections.defaultdict(set)
        self.is_open = True
        self.on_broker_close = None
        self.published = 0
        self.acks = 0
        self._real = real_publish

    def confirm_select(self):
        pass

    def prepare_message(self, body, priority=None, content_type=None,
                        content_encoding=None, headers=None, properties=None):
        if self._real:
            return amqp.Message(body, priority=priority, content_type=content_type,
                                content_encoding=content_encoding,
                                application_headers=headers, **properties or {})
        return body

    def basic_publish(self, message, exchange, routing_key, mandatory=False):
        self.published += 1

    def basic_ack(self, tag, multiple=False):
        self.acks += 1

    def exchange_declare(self, *a, **kw):
        pass

    def close(self):
        self.is_open = False


class FakeConn:
    connection_errors = (ConnectionError,)
    channel_errors = (LookupError,)

    def __init__(self, real_publish):
        self.real = real_publish
        self.channels = []
        self.connection = None

    def channel(self):
        ch = FakeChannel(self, self.real)
        self.channels.append(ch)
        return ch


def messages(n, start, channel):
    out = []
    for i in range(n):
        body = contract.encode(contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.UUID(int=start + i + 1)), "port",
            host=HOST), "bench"))
        raw = amqp.Message(body, content_type="application/json",
                           delivery_mode=2, user_id="guest",
                           message_id=uuid.UUID(int=10**9 + start + i).hex)
        raw.delivery_info = {"consumer_tag": "ct", "delivery_tag": start + i + 1,
                             "redelivered": False, "exchange": "ingress",
                             "routing_key": "instance.network-vif-plugged"}
        out.append(pyamqp.Message(raw, channel=channel))
    return out


class StubObserver:
    pending = False
    channel = None

    def pump(self, errors):
        pass


def build_new(svc, conn):
    s = session_mod.Session(svc, conn)
    s.memory = False
    s.user = "guest"
    from router.delivery import Delivery
    from router.lanes import Lane
    s.delivery = Delivery(conn, s.topo, s.stats, settled=s._settled,
                          router_name="cpu",
                          patience=20.0, memory=False)
    s.observer = StubObserver()
    s.main = Lane("main", s.topo.router_queue(), 512, memory=False)
    s.main.channel = s.delivery.watch(conn.channel())
    s.main.window = AckWindow(multiple=True)
    s.probation = Lane("probation", s.topo.probation_queue(), 1, memory=False)
    s.probation.channel = s.delivery.watch(conn.channel())
    s.probation.window = AckWindow(multiple=True)
    svc.placement.connected(svc.settings.resync_window)

    def feed(batch):
        s.main.deliveries.extend(batch)
        s._pump()
        cc = s.delivery.publisher._current
        cc._on_ack(cc._seq, True)
        s._pump()
    return s.main.channel, feed


def build_old(svc, conn):
    s = service_mod._Session(svc, conn)
    s.memory = False
    s.user = "guest"
    s.publish_ch = conn.channel()
    s.publisher = service_mod.publishing.ConfirmedPublisher(
        s.publish_ch, lambda token, outcome: s._outcomes.append((token, outcome)))
    s.check_ch = conn.channel()
    s.main = service_mod._Lane("main", conn.channel(), None, AckWindow(multiple=True))
    s.probation = service_mod._Lane("probation", conn.channel(), None,
                                    AckWindow(multiple=True))
    svc.placement.warm_up(svc.settings.resync_window)

    def feed(batch):
        s._deliveries.extend(batch)
        s._pump()
        s.publisher._on_ack(s.publisher._seq, True)
        s._pump()
    return s.main.channel, feed


def run(n, batch, real, profile, feed_events=True):
    topo = topology.Topology(prefix="micro")
    svc = service_mod.RouterService(service_mod.RouterSettings(
        transport_url="amqp://x", topology=topo, name="cpu"))
    conn = FakeConn(real)
    ch, feed = (build_new if NEW else build_old)(svc, conn)
    msgs = messages(n, 0, ch)
    batches = [msgs[i:i + batch] for i in range(0, n, batch)]
    if profile:
        profile.enable()
    t0 = time.process_time()
    if feed_events:
        for b in batches:
            feed(b)
    t1 = time.process_time()
    if profile:
        profile.disable()
    assert svc.stats["out"] == (n if feed_events else 0), svc.stats
    return (t1 - t0) / n * 1e6


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--real-publish", action="store_true")
    p.add_argument("--profile")
    p.add_argument("--no-feed", action="store_true",
                   help="build everything, route nothing (callgrind baseline)")
    a = p.parse_args()
    if a.no_feed or a.repeat == 0:
        run(a.events, a.batch, a.real_publish, None, not a.no_feed)
        sys.exit(0)
    import gc
    results = []
    for _ in range(a.repeat):
        gc.collect()
        results.append(run(a.events, a.batch, a.real_publish, None))
    if a.profile:
        prof = cProfile.Profile()
        run(a.events, a.batch, a.real_publish, prof)
        prof.dump_stats(a.profile)
    results.sort()
    print(f"{'new' if NEW else 'old'}: best {results[0]:.2f} us/event, median "
          f"{results[len(results) // 2]:.2f} (batch {a.batch}, "
          f"{'real' if a.real_publish else 'stub'} publish)")
