"""The journal's OTLP spans (router/journal_otlp.py) without a collector:
what a hop becomes, the bound, a failing exporter, and nothing of
OpenTelemetry imported while the option is empty."""

import json
import logging
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from router import journal, journal_otlp

ROOT = pathlib.Path(__file__).resolve().parents[2]
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE, SPAN = TP[3:35], TP[36:52]
URL = "http://collector.invalid:4318/v1/traces"


class Exporter:
    """An exporter the test drives: keeps spans, answers `result`, or
    waits on `gate` first."""

    def __init__(self, result="SUCCESS"):
        from opentelemetry.sdk.trace.export import SpanExportResult
        self.results = SpanExportResult
        self.result = result
        self.spans = []
        self.calls = 0
        self.gate = None

    def export(self, spans):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.result == "raise":
            raise ConnectionError("collector gone")
        self.spans.extend(spans)
        return getattr(self.results, self.result)

    def shutdown(self):
        if self.gate is not None:
            self.gate.set()


def _journal(exporter, **kw):
    kw.setdefault("batch_ms", 20)
    return journal_otlp.SpanJournal(
        journal_otlp.OtlpSettings(URL, **kw), "router:r1", node="node1",
        exporter=exporter).start()


def _hop(j, hop, mid="m1", trace=TRACE, span=SPAN, detail="d", **kw):
    j.record(hop, mid, trace, "inst-1", "port-1", "network-vif-plugged",
             "completed", detail, span_id=span, **kw)


def test_each_hop_is_a_span_of_the_events_trace_under_the_publish():
    exp = Exporter()
    j = _journal(exp)
    sent_at = time.time() - 0.25
    _hop(j, journal.PUBLISHED, detail="confirmed; host hint h1", at=sent_at)
    _hop(j, journal.ROUTED, detail=["h1", "h2"])
    _hop(j, journal.DELIVERED, detail="host h1")
    _hop(j, journal.DEAD, mid="m2", trace=None, span=None, detail="bad: no")
    assert j.flushed(10)
    j.stop()
    published, routed, delivered, dead = exp.spans
    trace = int(TRACE, 16)
    # the publish is the traceparent's own span; the others are its children
    assert (published.context.trace_id, published.context.span_id) == (
        trace, int(SPAN, 16))
    assert published.parent is None
    for span in (routed, delivered):
        assert span.context.trace_id == trace
        assert span.parent.span_id == int(SPAN, 16)
        assert span.context.span_id not in (0, int(SPAN, 16))
    assert [s.name for s in exp.spans] == [
        journal.PUBLISHED, journal.ROUTED, journal.DELIVERED, journal.DEAD]
    assert [s.kind.name for s in exp.spans] == [
        "PRODUCER", "INTERNAL", "CONSUMER", "INTERNAL"]
    # published: from the send to the confirm
    assert 0.2e9 < published.end_time - published.start_time < 5e9
    assert routed.start_time == routed.end_time
    assert dict(routed.attributes) == {
        "evrouter.hop": "routed", "messaging.message.id": "m1",
        "evrouter.instance": "inst-1", "evrouter.port": "port-1",
        "evrouter.event": "network-vif-plugged",
        "evrouter.status": "completed", "evrouter.detail": ("h1", "h2")}
    assert routed.resource.attributes["service.name"] == "evrouter-router"
    assert routed.resource.attributes["host.name"] == "node1"
    assert routed.resource.attributes["service.instance.id"] == "router:r1"
    # no trace: a trace of its own, findable by message id; an error
    assert dead.context.trace_id not in (0, trace) and dead.parent is None
    assert dead.status.status_code.name == "ERROR"
    assert dead.status.description == "bad: no"
    assert j.span_stats == {"exported": 4}


@pytest.mark.parametrize("trace,span", [
    ("0" * 32, SPAN), (TRACE.upper(), SPAN), ("+" + TRACE[1:], SPAN),
    (TRACE[:-1] + "\u0661", SPAN), (b"x" * 32, SPAN), (TRACE, "0" * 16),
    (TRACE, "1_" + SPAN[2:]), (TRACE, None)])
def test_ids_that_are_not_lower_case_hex_are_not_believed(trace, span):
    exp = Exporter()
    j = _journal(exp)
    _hop(j, journal.ROUTED, trace=trace, span=span)
    assert j.flushed(10)
    j.stop()
    (got,) = exp.spans
    if trace == TRACE:          # a good trace, no usable parent
        assert got.context.trace_id == int(TRACE, 16) and got.parent is None
    else:
        assert got.context.trace_id != 0 and got.parent is None


def test_spans_past_the_bound_are_dropped_and_counted_never_waited_for():
    exp = Exporter()
    exp.gate = threading.Event()        # the collector hangs
    j = _journal(exp, max_queue=10, batch_spans=5)
    started = time.monotonic()
    for i in range(200):
        _hop(j, journal.ROUTED, mid=f"m{i}")
    took = time.monotonic() - started
    assert took < 1.0, f"record waited: {took:.2f}s for 200 hops"
    # at most 10 in the processor (5 of them in the hung export)
    assert j.backlog <= 10
    assert j.span_stats["dropped"] >= 190
    exp.gate.set()
    assert j.flushed(10)
    j.stop()
    assert j.span_stats["exported"] + j.span_stats["dropped"] == 200
    assert j.span_stats["exported"] == len(exp.spans) <= 10


@pytest.mark.parametrize("how", ["FAILURE", "raise"])
def test_a_failing_collector_costs_one_warning_and_backs_off(how, caplog):
    exp = Exporter(result=how)
    j = _journal(exp, batch_spans=1)
    with caplog.at_level(logging.DEBUG, logger="router.journal_otlp"):
        for i in range(5):
            _hop(j, journal.ROUTED, mid=f"m{i}")
            time.sleep(0.05)
        assert j.flushed(10)
        j.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "cannot send spans" in warnings[0].getMessage()
    # the first export failed; the rest were skipped during the backoff
    assert exp.calls == 1
    assert j.span_stats["dropped"] == 5 and not j.span_stats["exported"]
    assert j.span_stats["export_failures"] == 1


def test_stop_is_bounded_when_the_collector_hangs():
    exp = Exporter()
    exp.gate = threading.Event()
    j = _journal(exp, batch_spans=1)
    for i in range(20):
        _hop(j, journal.ROUTED, mid=f"m{i}")
    started = time.monotonic()
    j.stop(timeout=0.5)
    took = time.monotonic() - started
    exp.gate.set()          # the collector answers at last: too late
    assert took < 2, f"stop took {took:.1f}s"
    assert j.span_stats["exported"] + j.span_stats["dropped"] == 20
    _hop(j, journal.ROUTED, mid="late")     # after stop: counted, no error
    assert j.span_stats["dropped"] + j.span_stats["exported"] == 21


def test_record_never_raises():
    j = _journal(Exporter())
    j.record(journal.ROUTED, object(), TRACE, {"a": 1}, 3, None, b"\xff",
             {"detail": object()}, at="not a time", span_id=SPAN)
    assert j.span_stats["dropped"] == 1
    j.stop()


def test_the_stream_gets_every_hop_too(monkeypatch):
    got = []

    class Stream:
        stats = {"written": 7}

        def record(self, *args, at=None):
            got.append((*args, at))

        def start(self):
            got.append("start")

        def stop(self, timeout):
            got.append("stop")

        def flushed(self, timeout):
            return True

    j = journal_otlp.SpanJournal(journal_otlp.OtlpSettings(URL, batch_ms=20),
                                 "host:h1", node="n", stream=Stream(),
                                 exporter=Exporter()).start()
    _hop(j, journal.MATCHED, detail="woken", at=12.5)
    assert j.flushed(10)
    j.stop()
    assert got == ["start", (journal.MATCHED, "m1", TRACE, "inst-1", "port-1",
                             "network-vif-plugged", "completed", "woken",
                             12.5), "stop"]
    assert j.stats == {"written": 7}


def test_the_wire_encoding_is_the_sdks_message():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from router import otlp_wire
    exp = Exporter()
    j = _journal(exp)
    _hop(j, journal.PUBLISHED, detail="confirmed; host hint h1", at=12.5)
    _hop(j, journal.ROUTED, detail=["h1", "h2"])
    _hop(j, journal.DELIVERED, detail="host h1")
    _hop(j, journal.MATCHED, detail="woken")
    _hop(j, journal.RETRIED, detail="attempt 1 in 500ms: no known host")
    _hop(j, journal.DEAD, mid="m2", trace=None, span=None, detail="bad: no")
    j.record(journal.DROPPED, "m3", None, None, None, None, None, None)
    assert j.flushed(10)
    j.stop()
    assert len(exp.spans) == 7
    ours = ExportTraceServiceRequest.FromString(otlp_wire.encode(exp.spans))
    assert ours == encode_spans(exp.spans)
    assert otlp_wire.encode([]) == b""


def test_the_otlp_exporter_sends_what_the_wire_encodes():
    """The exporter's HTTP client is used as router/journal_otlp.py
    expects (a private part of the pinned SDK: this fails if it moves)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    inner = OTLPSpanExporter(endpoint=URL)
    g = journal_otlp.GuardedExporter(inner, Exporter().results,
                                     journal_otlp.collections.Counter(),
                                     "t", URL)
    assert g._send is not None and g._send == inner._client.export
    inner.shutdown()


def test_check_names_the_option_and_the_extra():
    journal_otlp.check("")      # off: nothing to check
    journal_otlp.check(URL)     # installed here
    for bad in ("collector:4318", "grpc://c:4317", "http://"):
        with pytest.raises(journal_otlp.OtlpUnavailable, match="otlp_endpoint"):
            journal_otlp.check(bad)


def _python(code):
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# A process with the option empty: the services' journals are built and
# used, and not one opentelemetry (or protobuf) module is loaded.
_OFF = """
import json, sys
from oslo_config import cfg
from router import journal, options, service_entry, main
from network import options as network_options
from compute import nova_driver
conf = cfg.ConfigOpts()
options.register_bus_opts(conf)
conf([], project="evrouter-test", default_config_files=[])
service_entry.journal_otlp.check(conf.journal.otlp_endpoint)
js = journal.settings_from(conf, "memory://")
j = journal.from_conf(conf, "router:x", "memory://")
j.record(journal.ROUTED, "m", "0" * 32, None, None, None, None, None,
         span_id="1" * 16)
conf.set_override("enabled", True, group="journal")
stream = journal.from_conf(conf, "router:x", "memory://")
stream.record(journal.ROUTED, "m", "0" * 32, None, None, None, None, None,
              span_id="1" * 16)
print(json.dumps([js is None, type(j).__name__, type(stream).__name__,
                  sorted(m for m in sys.modules
                         if m.split(".")[0] in ("opentelemetry", "google"))]))
"""


def test_with_the_option_empty_opentelemetry_is_never_imported():
    off, kind, stream, loaded = json.loads(_python(_OFF))
    assert (off, kind, stream) == (True, "NullJournal", "Journal")
    assert loaded == []


# Set, with the packages missing: the entry point stops with one line.
_MISSING = """
import sys
sys.modules["opentelemetry"] = None     # as if not installed
from router import main
sys.exit(main.main(["--config-file", "/dev/null",
                    "--journal-otlp_endpoint", "http://c:4318/v1/traces"]))
"""


def test_set_without_the_packages_stops_the_service_with_one_line():
    done = subprocess.run([sys.executable, "-c", _MISSING], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "[journal] otlp_endpoint" in lines[0]
    assert "evrouter[otlp]" in lines[0]
    assert "opentelemetry-sdk" in lines[0]


def test_settings_from_the_options():
    from oslo_config import cfg

    from router import options
    conf = cfg.ConfigOpts()
    options.register_bus_opts(conf)
    conf([], project="evrouter-test", default_config_files=[])
    conf.set_override("otlp_endpoint", URL, group="journal")
    conf.set_override("otlp_max_queue", 7, group="journal")
    s = journal.settings_from(conf, "memory://")
    # spans alone: no stream
    assert s.stream is False
    assert s.otlp == journal_otlp.OtlpSettings(URL, max_queue=7, timeout=5.0)
    j = journal.open_journal(s, "router:x")
    assert isinstance(j, journal_otlp.SpanJournal) and j.stream is None
    conf.set_override("enabled", True, group="journal")
    j = journal.open_journal(journal.settings_from(conf, "memory://"), "r:x")
    assert isinstance(j.stream, journal.Journal)
