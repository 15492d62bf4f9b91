"""The journal's hops as OpenTelemetry spans, exported over OTLP/HTTP.

Optional: ``[journal] otlp_endpoint`` (nova.conf: ``[evrouter]
otlp_endpoint``) names an OTLP/HTTP traces URL, e.g.
``http://collector:4318/v1/traces``; it needs the extra ``evrouter[otlp]``
(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http). Empty, this
module imports nothing of OpenTelemetry: ``load()`` is the only place that
does, and only ``check()`` and ``SpanJournal`` call it. It works with the
journal stream on or off.

Each hop is one span of the event's trace (the trace id of its
traceparent), named for the hop. Its parent is the traceparent's span (the
publisher's step): the ``published`` hop, recorded by the publisher that
made that traceparent, is that span itself, so a collector shows
published -> routed / retried / parked / dead-lettered -> delivered ->
matched as one tree. A hop without a trace (a message refused before its
event was read) is a span of a trace of its own, findable by its message
id.

Off the hot path: ``record(...)`` builds one ReadableSpan (a few
microseconds) and hands it to the SDK's BatchSpanProcessor, whose thread
encodes batches (router/otlp_wire.py) and sends them with the OTLP/HTTP
exporter's client. It never blocks and never raises. Spans waiting
to be sent are bounded (``max_queue``); past it, new spans are dropped and
counted here, before the SDK's queue, which would drop its oldest silently.
A collector that is down or refuses costs one WARNING, then exports are
skipped (their spans dropped and counted) with a backoff up to 30 s,
while the processor's queue keeps taking new spans.
"""

import collections
import logging
import random
import re
import threading
import time
import types
from dataclasses import dataclass
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

PACKAGES = ("opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
SCOPE = "evrouter.journal"

# Hop names as router/journal.py spells them (not imported from there:
# router/journal.py imports this module).
_KIND = {"published": "PRODUCER", "delivered": "CONSUMER"}
_FAILED = frozenset({"dead-lettered", "dropped"})
_MAX_DETAIL = 1024
_MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class OtlpSettings:
    endpoint: str
    # Spans waiting to be sent, at most; past it, dropped and counted.
    max_queue: int = 20_000
    batch_spans: int = 512
    batch_ms: int = 1000
    # One export request, retries included (the SDK's exporter retries a
    # connection error or a 429/502/503/504 with backoff within it).
    timeout: float = 5.0


class OtlpUnavailable(ValueError):
    """otlp_endpoint is set and the OpenTelemetry packages cannot be
    imported, or it is not an http(s) URL."""


def settings_from(group):
    """The otlp_* options of a [journal] group as OtlpSettings; None when
    otlp_endpoint is empty."""
    if not group.otlp_endpoint:
        return None
    return OtlpSettings(endpoint=group.otlp_endpoint,
                        max_queue=group.otlp_max_queue,
                        timeout=group.otlp_timeout)


def check(endpoint, option="[journal] otlp_endpoint"):
    """At start-up: an endpoint that is set must be an http(s) URL and the
    packages must import. OtlpUnavailable naming the option otherwise.
    Empty: nothing is checked and nothing imported."""
    if not endpoint:
        return
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise OtlpUnavailable(
            f"{option} = {endpoint!r}: not an http(s) URL (an OTLP/HTTP "
            f"traces endpoint, e.g. http://collector:4318/v1/traces)")
    try:
        load()
    except ImportError as exc:
        raise OtlpUnavailable(
            f"{option} is set but OpenTelemetry cannot be imported "
            f"({exc}): install the extra evrouter[otlp] "
            f"({', '.join(PACKAGES)})") from None


def load():
    """The OpenTelemetry names this module uses, imported now."""
    from opentelemetry import trace as api
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace.status import Status, StatusCode
    return types.SimpleNamespace(
        api=api, OTLPSpanExporter=OTLPSpanExporter, Resource=Resource,
        ReadableSpan=ReadableSpan, BatchSpanProcessor=BatchSpanProcessor,
        SpanExportResult=SpanExportResult,
        InstrumentationScope=InstrumentationScope, Status=Status,
        StatusCode=StatusCode)


def service_kind(service):
    """'router:ab12' -> 'evrouter-router' (the OTel service.name)."""
    return "evrouter-" + (service.split(":", 1)[0] or "journal")


def attribute(value):
    """A hop's detail as an OTel attribute value (str or a tuple of str)."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v)[:_MAX_DETAIL] for v in value)
    return str(value)[:_MAX_DETAIL]


class SpanJournal:
    """Records hops as spans, and passes each to the journal stream too
    when there is one (`stream`, a router/journal.py Journal, or None).

    The same interface as the stream's Journal: record, start, stop,
    flushed, stats (the stream's; the spans' are in `span_stats`).
    """

    enabled = True

    def __init__(self, settings, service, *, node, stream=None, exporter=None):
        ot = self._ot = load()
        self.settings = settings
        self.service = service
        self.node = node
        self.stream = stream
        self.span_stats = collections.Counter()
        self._stopped = False
        self._emitted = 0           # spans handed to the processor
        self._resource = ot.Resource({
            "service.name": service_kind(service),
            "service.instance.id": service, "host.name": node})
        self._scope = ot.InstrumentationScope(SCOPE)
        self._flags = ot.api.TraceFlags(ot.api.TraceFlags.SAMPLED)
        self._kinds = {hop: getattr(ot.api.SpanKind, kind)
                       for hop, kind in _KIND.items()}
        self._internal = ot.api.SpanKind.INTERNAL
        self._unset = ot.Status(ot.StatusCode.UNSET)
        self._exporter = GuardedExporter(
            exporter or ot.OTLPSpanExporter(endpoint=settings.endpoint,
                                            timeout=settings.timeout),
            ot.SpanExportResult, self.span_stats, service, settings.endpoint)
        self._processor = None

    @property
    def stats(self):
        return self.stream.stats if self.stream is not None else \
            collections.Counter()

    # --- any thread -----------------------------------------------------------
    def record(self, hop, message_id, trace_id, instance, port, event, status,
               detail=None, at=None, span_id=None):
        if self.stream is not None:
            self.stream.record(hop, message_id, trace_id, instance, port,
                               event, status, detail, at=at)
        try:
            processor = self._processor
            if processor is None or self._stopped:
                self.span_stats["dropped"] += 1
                return
            # Bounded here: the processor's own queue drops its oldest
            # span without telling anyone.
            if self._emitted - self._exporter.settled >= self.settings.max_queue:
                self.span_stats["dropped"] += 1
                return
            span = self._span(hop, message_id, trace_id, instance, port,
                              event, status, detail, at, span_id)
            self._emitted += 1
            processor.on_end(span)
        except Exception:       # never into the caller's path
            self.span_stats["dropped"] += 1

    def _span(self, hop, message_id, trace_id, instance, port, event, status,
              detail, at, span_id):
        api = self._ot.api
        end = time.time_ns()
        start = min(end, int(at * 1e9)) if at else end
        trace = _hex(trace_id, 32)
        parent = _hex(span_id, 16) if trace else None
        if trace is None:
            trace = random.getrandbits(128) or 1
        if hop == "published" and parent is not None:
            # the traceparent's span is this publish: the hop is that span
            own, parent = parent, None
        else:
            own = random.getrandbits(64) or 1
        # the service and node are the resource's (service.instance.id,
        # host.name): sent once per batch, not per span (encoding each
        # attribute is most of a span's cost)
        attrs = {"evrouter.hop": hop}
        for key, value in (("messaging.message.id", message_id),
                           ("evrouter.instance", instance),
                           ("evrouter.port", port), ("evrouter.event", event),
                           ("evrouter.status", status),
                           ("evrouter.detail", detail)):
            if value is not None:
                attrs[key] = attribute(value)
        return self._ot.ReadableSpan(
            hop, api.SpanContext(trace, own, False, self._flags),
            api.SpanContext(trace, parent, True, self._flags)
            if parent is not None else None,
            self._resource, attrs,
            kind=self._kinds.get(hop, self._internal),
            status=self._failed(detail) if hop in _FAILED else self._unset,
            start_time=start, end_time=end,
            instrumentation_scope=self._scope)

    def _failed(self, detail):
        return self._ot.Status(self._ot.StatusCode.ERROR,
                               None if detail is None else attribute(detail))

    # --- the owner's thread ---------------------------------------------------
    def start(self):
        s = self.settings
        self._processor = self._ot.BatchSpanProcessor(
            self._exporter, max_queue_size=s.max_queue,
            schedule_delay_millis=s.batch_ms,
            max_export_batch_size=min(s.batch_spans, s.max_queue))
        if self.stream is not None:
            self.stream.start()
        return self

    def stop(self, timeout=5.0):
        """Send what is waiting (for at most `timeout`), then stop."""
        if self.stream is not None:
            self.stream.stop(timeout)
        self._stopped = True
        processor, self._processor = self._processor, None
        if processor is None:
            return
        # The processor sends all it holds before it stops: each export past
        # the deadline drops its spans instead. The one under way may hang
        # up to the exporter's timeout, and the processor's shutdown waits
        # for it (30 s at most): waited for here only until the deadline.
        self._exporter.deadline = time.monotonic() + timeout
        closing = threading.Thread(target=self._shutdown, args=(processor,),
                                   daemon=True, name=f"otlp-stop-{self.service}")
        closing.start()
        closing.join(timeout + 0.5)
        lost = self._exporter.close(self._emitted)
        if lost > 0:
            self.span_stats["dropped"] += lost
            LOG.warning("journal %s: stopped with %d span(s) not sent",
                        self.service, lost)

    def _shutdown(self, processor):
        try:
            processor.shutdown()
        except Exception:
            LOG.debug("journal %s: stopping the span processor", self.service,
                      exc_info=True)

    @property
    def backlog(self):
        return self._emitted - self._exporter.settled

    def flushed(self, timeout=10.0):
        """Wait until every span so far is sent or dropped (tests, tools)."""
        deadline = time.monotonic() + timeout
        if self.stream is not None and not self.stream.flushed(timeout):
            return False
        processor = self._processor
        while self.backlog > 0:
            if processor is None or time.monotonic() > deadline:
                return False
            processor.force_flush()
            if self.backlog > 0:
                time.sleep(0.02)
        return True


class GuardedExporter:
    """The OTLP exporter as the span processor's thread calls it: counts
    what it sends and what is lost, says a failure once, and skips exports
    (their spans dropped) for a growing while after one fails."""

    def __init__(self, inner, results, stats, service, endpoint):
        self._inner = inner
        self._results = results
        self._stats = stats
        self._service = service
        self._endpoint = endpoint
        self._failing = False
        self._backoff = 0.0
        self._resume_at = 0.0
        self.deadline = None        # stopping: no export after this
        self._lock = threading.Lock()
        self._closed = False
        # spans whose fate is known (sent or dropped): read by record()
        self.settled = 0
        # The OTLP exporter's HTTP client (its retries, TLS, headers, the
        # OTEL_EXPORTER_OTLP_TRACES_* variables) sends what router/otlp_wire
        # encodes, 5 times faster than the SDK's encoder. Not a public
        # interface: an exporter without it is given the spans.
        from router import otlp_wire  # imports OpenTelemetry's protobuf
        self._encode = otlp_wire.encode
        client = getattr(inner, "_client", None)
        self._send = client.export if callable(
            getattr(client, "export", None)) else None

    def _export(self, spans):
        """True if the collector took `spans`."""
        if self._send is not None:
            return bool(self._send(self._encode(spans)).success)
        return self._inner.export(spans) == self._results.SUCCESS

    def export(self, spans):
        now = time.monotonic()
        if now < self._resume_at or \
                (self.deadline is not None and now > self.deadline):
            return self._settle(len(spans), "dropped")
        try:
            error = None if self._export(spans) else \
                "refused or unreachable (the exporter's log says which)"
        except Exception as exc:    # a foreign exporter's trouble
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        if error is None:
            self._ok()
            return self._settle(len(spans), "exported")
        self._failed(error)
        return self._settle(len(spans), "dropped")

    def _settle(self, n, outcome):
        with self._lock:
            if not self._closed:    # after close: counted as lost already
                self._stats[outcome] += n
                self.settled += n
        return self._results.SUCCESS if outcome == "exported" else \
            self._results.FAILURE

    def close(self, emitted):
        """No more counting; the spans of `emitted` not settled (lost)."""
        with self._lock:
            self._closed = True
            return emitted - self.settled

    def _ok(self):
        self._backoff = 0.0
        if self._failing:
            self._failing = False
            LOG.info("journal %s: sending spans to %s again", self._service,
                     self._endpoint)

    def _failed(self, error):
        self._stats["export_failures"] += 1
        self._backoff = min(_MAX_BACKOFF, max(1.0, self._backoff * 2))
        self._resume_at = time.monotonic() + self._backoff
        if not self._failing:
            self._failing = True
            LOG.warning("journal %s: cannot send spans to %s (%s); events are "
                        "not affected, spans are dropped and counted while it "
                        "fails; trying again with backoff", self._service,
                        self._endpoint, error)
        else:
            LOG.debug("journal %s: still cannot send spans: %s",
                      self._service, error)

    def shutdown(self):
        self._inner.shutdown()

    def force_flush(self, timeout_millis=30000):
        return True


_HEX = {32: re.compile(r"[0-9a-f]{32}"), 16: re.compile(r"[0-9a-f]{16}")}


def _hex(value, digits):
    """A lower-case hex id of `digits` digits as an int; None if it is not
    one, or all zero (int() alone would take '+', '_' and other digits)."""
    if type(value) is not str or _HEX[digits].fullmatch(value) is None:
        return None
    return int(value, 16) or None
