"""The journal's hops as OpenTelemetry spans (router/journal_otlp.py),
sent over OTLP/HTTP to a receiver in this process, by a real router, host
consumer and publisher on the real broker; the journal stream off."""

import http.server
import socket
import threading
import time
import uuid

import kombu
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router import journal
from router.bus import contract
from router.journal_otlp import OtlpSettings
from router.metrics import RouterCollector
from tests.conftest import BROKER_URL, RunningRouter, wait_for

pytestmark = pytest.mark.timeout(90)

HOST = "oh1"
GIVEN = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _value(any_value):
    """An OTLP AnyValue as Python (the kinds the journal sends)."""
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(key_values):
    return {kv.key: _value(kv.value) for kv in key_values}


class Collector:
    """An OTLP/HTTP traces receiver on a free port of this host: decodes
    each ExportTraceServiceRequest (protobuf) into one dict per span."""

    def __init__(self):
        self.spans = []
        self.requests = 0
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces" or self.headers.get(
                        "Content-Type") != "application/x-protobuf":
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.take(request)
                reply = trace_service_pb2.ExportTraceServiceResponse()
                data = reply.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True, name="otlp-collector")
        self.thread.start()

    def take(self, request):
        spans = []
        for rs in request.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "name": s.name, "trace": s.trace_id.hex(),
                        "span": s.span_id.hex(),
                        "parent": s.parent_span_id.hex() or None,
                        "kind": s.kind, "status": s.status.code,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attrs": _attributes(s.attributes),
                        "resource": resource, "scope": ss.scope.name})
        self.spans.extend(spans)
        self.requests += 1

    def of(self, message_id):
        return [s for s in self.spans
                if s["attrs"].get("messaging.message.id") == message_id]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def collector():
    c = Collector()
    try:
        yield c
    finally:
        c.stop()


def _spans_only(bus, endpoint, **otlp):
    """Journal settings with the stream off and spans to `endpoint`."""
    otlp.setdefault("batch_ms", 50)
    return journal.JournalSettings(transport_url=BROKER_URL, prefix=bus.prefix,
                                   stream=False,
                                   otlp=OtlpSettings(endpoint, **otlp))


class World:
    """Router, host consumer (feeding a waiter registry) and publisher, each
    with a journal of these settings."""

    def __init__(self, bus, js):
        bus.declare_central()
        bus.declare_host(HOST)
        self.registry = InstanceEvents()
        self.router = RunningRouter(bus, journal=js)
        self.consumer = HostConsumer(HostConsumerSettings(
            host=HOST, transport_url=BROKER_URL, topology=bus.topology,
            journal=js), self.registry.deliver)
        self.thread = self.consumer.start()
        assert self.consumer.ready.wait(10)
        self.pub = InstanceEventPublisher(PublisherSettings(
            transport_url=BROKER_URL, topology=bus.topology,
            journal=js)).start()

    @property
    def journals(self):
        return (self.pub.journal, self.router.service.journal,
                self.consumer.journal)

    def stop(self):
        started = time.monotonic()
        self.pub.close()
        self.consumer.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.router.stop()
        return time.monotonic() - started


def _no_stream(bus):
    """The journal stream was never declared (the spans need none)."""
    with kombu.Connection(BROKER_URL) as conn:
        with pytest.raises(conn.channel_errors):
            conn.channel().queue_declare(journal.stream_name(bus.prefix),
                                         passive=True)


def test_an_events_hops_arrive_as_spans_of_its_trace(bus, collector):
    world = World(bus, _spans_only(bus, collector.endpoint))
    try:
        server, port = str(uuid.uuid4()), f"port-{uuid.uuid4().hex[:8]}"
        prepared = world.registry.prepare(server, contract.VIF_PLUGGED, port)
        receipt = world.pub.publish(contract.InstanceEvent(
            contract.VIF_PLUGGED, server, port, host=HOST), traceparent=GIVEN)
        wait_for(lambda: prepared.how is not None, 10, what="the waiter woken")
        wait_for(lambda: len(collector.of(receipt.message_id)) >= 4, 10,
                 what="4 spans at the collector")
        for j in world.journals:
            assert j.flushed(10)
    finally:
        world.stop()
    spans = {s["name"]: s for s in collector.of(receipt.message_id)}
    assert len(collector.of(receipt.message_id)) == 4, spans
    published, routed, delivered, matched = (spans[hop] for hop in (
        journal.PUBLISHED, journal.ROUTED, journal.DELIVERED, journal.MATCHED))
    # one trace, the publishing context's; the publish is the traceparent's
    # span (a new one of GIVEN's trace), the parent of every other hop
    assert {s["trace"] for s in spans.values()} == {GIVEN[3:35]}
    assert published["parent"] is None
    assert published["span"] != GIVEN[36:52]
    for s in (routed, delivered, matched):
        assert s["parent"] == published["span"]
    assert len({s["span"] for s in spans.values()}) == 4
    for s in spans.values():
        assert s["attrs"]["evrouter.instance"] == server
        assert s["attrs"]["evrouter.port"] == port
        assert s["attrs"]["evrouter.event"] == contract.VIF_PLUGGED
        assert s["attrs"]["evrouter.status"] == contract.COMPLETED
        assert s["attrs"]["evrouter.hop"] == s["name"]
        assert s["resource"]["host.name"] == socket.gethostname()
        assert s["scope"] == "evrouter.journal"
        assert s["start"] <= s["end"]
    assert published["attrs"]["evrouter.detail"] == \
        f"confirmed; host hint {HOST}"
    assert routed["attrs"]["evrouter.detail"] == [HOST]
    assert delivered["attrs"]["evrouter.detail"] == f"host {HOST}"
    assert matched["attrs"]["evrouter.detail"] == "woken"
    assert {name: s["resource"]["service.name"] for name, s in spans.items()} \
        == {journal.PUBLISHED: "evrouter-publisher",
            journal.ROUTED: "evrouter-router",
            journal.DELIVERED: "evrouter-host", journal.MATCHED: "evrouter-host"}
    assert routed["resource"]["service.instance.id"] == \
        f"router:{world.router.service.settings.name}"
    # PRODUCER, INTERNAL, CONSUMER (OTLP's numbering)
    assert (published["kind"], routed["kind"], delivered["kind"]) == (4, 1, 5)
    _no_stream(bus)
    for j in world.journals:
        assert j.span_stats["exported"] >= 1 and not j.span_stats["dropped"]


@pytest.fixture(params=["refused", "hanging"])
def dead_collector(request):
    """An endpoint that refuses connections, or one that takes them and
    never answers (a hung collector)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    if request.param == "hanging":
        s.listen(0)     # and never accept: requests wait for their timeout
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}/v1/traces"
    finally:
        s.close()


def test_a_collector_that_is_down_never_slows_or_stops_routing(
        bus, dead_collector):
    # an export takes up to 3 s to fail; at most 5 spans wait for one
    world = World(bus, _spans_only(bus, dead_collector, timeout=3.0,
                                   max_queue=5))
    n = 30
    try:
        started = time.monotonic()
        waits = []
        for _ in range(n):
            server = str(uuid.uuid4())
            waits.append(world.registry.prepare(server, contract.VIF_PLUGGED,
                                                "p"))
            world.pub.publish(contract.InstanceEvent(
                contract.VIF_PLUGGED, server, "p", host=HOST))
        wait_for(lambda: all(w.how is not None for w in waits), 10,
                 what=f"{n} waiters woken")
        took = time.monotonic() - started
        # Waiting on the collector would take 3 s per export at least.
        assert took < 3.0, f"{n} events took {took:.1f}s end to end"
        # Every span is accounted for: dropped (none sent), none pending.
        for j, per_event in zip(world.journals, (1, 1, 2), strict=True):
            wait_for(lambda j=j, k=per_event: j.span_stats["dropped"] == n * k,
                     15, what=f"{n * per_event} spans of {j.service} dropped")
            assert not j.span_stats["exported"]
            assert j.span_stats["export_failures"] >= 1   # it was tried
            assert j.backlog == 0
        metrics = {(s.name, s.labels.get("outcome")): s.value
                   for family in RouterCollector(world.router.service).collect()
                   for s in family.samples
                   if s.name == "evrouter_journal_spans_total"}
        assert metrics == {("evrouter_journal_spans_total", "exported"): 0,
                           ("evrouter_journal_spans_total", "dropped"): n}
    finally:
        stopped_in = world.stop()
    assert stopped_in < 15
