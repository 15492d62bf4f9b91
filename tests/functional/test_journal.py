"""The journal of hops and `evrouter trace` on the real broker."""

import json
import logging
import time
import uuid

import kombu
import pytest

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router import journal, trace_cmd
from router.bus import contract, topology, tracecontext
from router.metrics import RouterCollector
from tests.conftest import BROKER_URL, RunningRouter, collect, wait_for

pytestmark = pytest.mark.timeout(60)

HOST = "jh1"
GIVEN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _settings(bus, **kw):
    queues, exchanges = journal.names(bus.prefix)
    bus.own(queues=queues, exchanges=exchanges)
    return journal.JournalSettings(transport_url=kw.pop("url", BROKER_URL),
                                   prefix=bus.prefix, batch_seconds=0.05, **kw)


class Host:
    """A host consumer feeding a registry, with a journal of its own."""

    def __init__(self, bus, js):
        bus.declare_host(HOST)
        self.registry = InstanceEvents()
        self.consumer = HostConsumer(HostConsumerSettings(
            host=HOST, transport_url=BROKER_URL, topology=bus.topology,
            journal=js), self.registry.deliver)
        self.thread = self.consumer.start()
        assert self.consumer.ready.wait(10)

    def stop(self):
        self.consumer.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def journal_settings(bus):
    bus.declare_central()
    return _settings(bus)


@pytest.fixture
def world(bus, journal_settings):
    router = RunningRouter(bus, journal=journal_settings)
    host = Host(bus, journal_settings)
    pub = InstanceEventPublisher(PublisherSettings(
        transport_url=BROKER_URL, topology=bus.topology,
        journal=journal_settings)).start()
    try:
        yield router, host, pub
    finally:
        pub.close()
        host.stop()
        router.stop()


def _written(j, n):
    """Wait until journal `j` wrote `n` records (those of the test's own
    events, recorded after the condition a test could otherwise wait on)."""
    wait_for(lambda: j.stats["written"] >= n, 10,
             what=f"{n} record(s) written by {j.service}")


def _flushed(*journals):
    for j in journals:
        assert j.flushed(10), f"journal {j.service} not written"


def _trace(bus, wanted, since=600):
    found, stats = trace_cmd.read(BROKER_URL, bus.prefix, wanted, since,
                                  timeout=10)
    return found, stats


def test_a_routed_event_is_traced_from_publisher_to_waiter(bus, world):
    router, host, pub = world
    server, port = str(uuid.uuid4()), f"port-{uuid.uuid4().hex[:8]}"
    prepared = host.registry.prepare(server, contract.VIF_PLUGGED, port)
    receipt = pub.publish(contract.InstanceEvent(
        contract.VIF_PLUGGED, server, port, host=HOST), traceparent=GIVEN)
    wait_for(lambda: prepared.how is not None, 10, what="the waiter woken")
    # recorded after the waiter was woken: delivered and matched
    _written(host.consumer.journal, 2)
    _flushed(pub.journal, router.service.journal)

    found, stats = _trace(bus, receipt.message_id)
    assert stats["end"] == "marker"
    hops = [(r["hop"], r["detail"]) for r in found]
    assert hops == [
        (journal.PUBLISHED, f"confirmed; host hint {HOST}"),
        (journal.ROUTED, [HOST]),
        (journal.DELIVERED, f"host {HOST}"),
        (journal.MATCHED, "woken")], hops
    # one trace throughout: the publishing context's, kept by the router
    trace_id = GIVEN[3:35]
    assert {r["tid"] for r in found} == {trace_id}
    assert {r["svc"].split(":")[0] for r in found} == {
        "publisher", "router", "host"}
    # found by any of its names
    for wanted in (trace_id, server, port):
        assert [r["hop"] for r in _trace(bus, wanted)[0]] == [
            r["hop"] for r in found]


def test_the_waiters_other_outcomes_are_traced(bus, world):
    router, host, pub = world
    server, port = str(uuid.uuid4()), "port-early"
    early = contract.InstanceEvent(contract.VIF_PLUGGED, server, port,
                                   host=HOST)
    first = pub.publish(early)
    _written(host.consumer.journal, 2)      # delivered, matched: held
    pub.publish(early, message_id=first.message_id)     # sent again
    _written(host.consumer.journal, 4)      # delivered, matched: duplicate
    matched = [r["detail"] for r in _trace(bus, first.message_id)[0]
               if r["hop"] == journal.MATCHED]
    assert matched == ["held early", "duplicate"]


def _publish_raw(bus, body, message_id, headers=None, name=contract.VIF_PLUGGED):
    with kombu.Connection(BROKER_URL) as conn:
        producer = kombu.Producer(conn.channel())
        producer.publish(body, exchange=bus.topology.ingress_exchange_name,
                         routing_key=topology.instance_routing_key(name),
                         message_id=message_id, headers=headers,
                         user_id=conn.userid, content_type="application/json",
                         content_encoding="utf-8")


def test_a_senders_traceparent_is_kept_only_if_well_formed(bus, router):
    bus.declare_host(HOST)      # and no consumer: the copies stay there
    sent = {}
    for label, value in (("good", GIVEN), ("bad", GIVEN[:-1] + "\n"),
                         ("wrong", b"\xff" * 55), ("table", {"a": 1})):
        env = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "p", host=HOST), "test")
        _publish_raw(bus, contract.encode(env), env.id,
                     {tracecontext.HEADER: value})
        sent[env.id] = label
    got = collect(BROKER_URL, bus.topology.host_queue_name(HOST), 0,
                  until=lambda got: {m.properties.get("message_id")
                                     for m in got} >= set(sent), timeout=10)
    carried = {sent[m.properties["message_id"]]:
               m.headers.get(tracecontext.HEADER) for m in got}
    assert carried == {"good": GIVEN, "bad": None, "wrong": None,
                       "table": None}


def test_a_dead_lettered_event_is_traced_with_its_reason(bus, world):
    router, host, pub = world
    msg_id = f"dl-{uuid.uuid4().hex}"
    _publish_raw(bus, b'{"not": "an envelope"', msg_id)
    env = contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-x"), "test")
    doc = contract.to_document(env)
    doc["payload"]["status"] = "half-done"
    _publish_raw(bus, json.dumps(doc).encode(), env.id,
                 {tracecontext.HEADER: GIVEN})
    _written(router.service.journal, 2)     # its only records: two dead letters
    (rec,) = _trace(bus, msg_id)[0]
    assert rec["hop"] == journal.DEAD
    assert rec["detail"].startswith("malformed: not JSON")
    (rec,) = _trace(bus, env.id)[0]
    assert rec["hop"] == journal.DEAD and rec["tid"] == GIVEN[3:35]
    assert rec["detail"].startswith("invalid: payload.status"), rec


def _route_some(bus, n=5):
    ids = []
    for _ in range(n):
        env = contract.envelope(contract.InstanceEvent(
            contract.VIF_PLUGGED, str(uuid.uuid4()), "p", host=HOST), "test")
        _publish_raw(bus, contract.encode(env), env.id)
        ids.append(env.id)
    got = collect(BROKER_URL, bus.topology.host_queue_name(HOST), 0,
                  until=lambda got: {m.properties.get("message_id")
                                     for m in got} >= set(ids), timeout=10)
    return ids, got


@pytest.mark.parametrize("fault", ["stream-missing", "login-refused"])
def test_a_journal_the_broker_refuses_costs_a_warning_never_an_event(
        bus, caplog, fault):
    bus.declare_central()
    bus.declare_host(HOST)
    if fault == "stream-missing":
        # A classic queue where the stream should be: declaring the stream
        # is refused, and there is no journal exchange to publish to.
        js = _settings(bus)
        ch = bus.channel()
        ch.queue_declare(journal.stream_name(bus.prefix), durable=True,
                         auto_delete=False)
    else:
        js = _settings(bus, url=BROKER_URL.replace("guest:guest",
                                                   "guest:wrong-password"))
    caplog.set_level(logging.WARNING, logger="router.journal")
    router = RunningRouter(bus, journal=js)
    try:
        ids, got = _route_some(bus)
        assert {m.properties.get("message_id") for m in got} >= set(ids)
        j = router.service.journal
        wait_for(lambda: j.stats["failures"] >= 1, 10, what="a failed write")
        assert router.service.ready.is_set()
        metrics = {s.name: s.value for family in
                   RouterCollector(router.service).collect()
                   for s in family.samples if s.name.startswith("evrouter_journal")}
        assert metrics["evrouter_journal_write_failures_total"] >= 1
    finally:
        router.stop()
    warnings = [r for r in caplog.records if r.name == "router.journal"
                and r.levelno == logging.WARNING
                and "cannot write" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert j.stats["written"] == 0


def test_the_journal_survives_a_router_restart(bus, journal_settings):
    bus.declare_host(HOST)
    before = after = None
    for round_ in range(2):
        router = RunningRouter(bus, journal=journal_settings)
        try:
            ids, _ = _route_some(bus, 1)
        finally:
            router.stop()       # stopping writes what is pending
        if round_ == 0:
            before = (ids[0], router.service.settings.name)
        else:
            after = (ids[0], router.service.settings.name)
    for msg_id, name in (before, after):
        (rec,) = _trace(bus, msg_id)[0]
        assert rec["hop"] == journal.ROUTED
        assert rec["svc"] == f"router:{name}"


def _stream_bytes(conn, name):
    """(first offset, body bytes) of everything the stream holds now."""
    ch = conn.channel()
    ch.basic_qos(0, 1000, False)
    seen = []
    ch.basic_consume(name, no_ack=False, arguments={"x-stream-offset": "first"},
                     callback=lambda m: seen.append(
                         (m.properties["application_headers"]["x-stream-offset"],
                          len(m.body))))
    quiet = time.monotonic() + 1.0
    count = 0
    while time.monotonic() < quiet:
        try:
            conn.drain_events(timeout=0.1)
        except TimeoutError:
            pass
        if len(seen) != count:
            count, quiet = len(seen), time.monotonic() + 0.3
    ch.close()
    return min(o for o, _ in seen), sum(n for _, n in seen)


def test_retention_bounds_the_stream(bus):
    bus.declare_central()
    max_bytes, segment = 200_000, 50_000
    js = _settings(bus, max_bytes=max_bytes, segment_bytes=segment,
                   batch_records=50)
    j = journal.Journal(js, "retention-test").start()
    try:
        detail = "x" * 200
        for i in range(6000):       # about 1.5 MB of records
            j.record(journal.ROUTED, f"m{i}", None, None, None, None, None,
                     detail)
        assert j.flushed(30)
    finally:
        j.stop()
    assert j.stats["written"] == 6000
    with kombu.Connection(BROKER_URL) as conn:
        first, size = _stream_bytes(conn.connection, journal.stream_name(bus.prefix))
    assert first > 0, "no segment was deleted"
    # whole segments go: the stream holds at most max_bytes and the
    # segment being written
    assert size <= max_bytes + 2 * segment, size


def test_a_reader_that_cannot_mark_the_end_probes_for_it(bus):
    bus.declare_central()
    js = _settings(bus)
    j = journal.Journal(js, "probe-test").start()
    try:
        for i in range(30):
            j.record(journal.ROUTED, f"m{i}", None, None, None, None, None,
                     None)
        assert j.flushed(10)
    finally:
        j.stop()
    # no journal exchange: the marker cannot be written
    bus.channel().exchange_delete(journal.stream_name(bus.prefix))
    found, stats = _trace(bus, "m29")
    assert stats["end"] == "probe"
    assert [r["mid"] for r in found] == ["m29"]


def test_a_host_consumers_dead_letter_is_traced(bus, world):
    router, host, pub = world
    msg_id = f"host-dl-{uuid.uuid4().hex}"
    with kombu.Connection(BROKER_URL) as conn:
        kombu.Producer(conn.channel()).publish(
            b"\xff not json", exchange=bus.topology.host_exchange_name(HOST),
            routing_key=topology.instance_routing_key(contract.VIF_PLUGGED),
            message_id=msg_id, content_type="application/json",
            content_encoding="utf-8")
    # this host's journal has nothing else to write
    wait_for(lambda: host.consumer.journal.stats["written"] >= 1, 10,
             what="the host's dead letter journaled")
    (rec,) = _trace(bus, msg_id)[0]
    assert rec["hop"] == journal.DEAD and rec["svc"] == f"host:{HOST}"
    assert rec["detail"].startswith("malformed: ")
    assert rec["detail"].endswith(f"(host {HOST})")


def test_a_journal_message_whose_routing_key_is_not_utf8_is_skipped(bus):
    """Anyone who may write the journal (every host) could stop `evrouter
    trace` and `stuck` with one such message, for as long as the stream
    kept it: py-amqp raised on the key before the reader saw the body."""
    from tests.functional import poison
    bus.declare_central()
    js = _settings(bus)
    j = journal.Journal(js, "key-test").start()
    try:
        j.record(journal.ROUTED, "before", None, None, None, None, None, None)
        assert j.flushed(10)
        raw = poison.RawPublisher(bus.url)
        try:
            raw.publish(journal.stream_name(bus.prefix), b"\xff", b"{}")
        finally:
            raw.close()
        j.record(journal.ROUTED, "after", None, None, None, None, None, None)
        assert j.flushed(10)
    finally:
        j.stop()
    for wanted in ("before", "after"):
        found, _ = _trace(bus, wanted)
        assert [r["mid"] for r in found] == [wanted]
