"""The journal's spans as an OTLP ExportTraceServiceRequest (protobuf bytes).

The SDK's encoder (opentelemetry-exporter-otlp-proto-common) turns every
attribute of every span into a message through a chain of isinstance
checks: 22 to 40 us a span on the development VM, most of what a span
costs. The journal's spans are all alike (one resource, one scope, string
or string-list attributes, no events or links), so they are written here
field by field into the generated protobuf classes: about 5 times faster,
and the same message (tests/unit/test_journal_otlp.py compares the two).

Imported only by router/journal_otlp.py once OpenTelemetry is wanted.
"""

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags

# the SDK's SpanKind values (0 internal .. 4 consumer) are OTLP's minus one
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def encode(spans):
    """ReadableSpans of one resource and scope to request bytes. Values
    other than str or a sequence of str are sent as their str()."""
    request = ExportTraceServiceRequest()
    if not spans:
        return request.SerializeToString()
    first = spans[0]
    resource_spans = request.resource_spans.add()
    _attributes(resource_spans.resource.attributes, first.resource.attributes)
    scope_spans = resource_spans.scope_spans.add()
    scope = first.instrumentation_scope
    if scope is not None:
        scope_spans.scope.name = scope.name
        if scope.version:
            scope_spans.scope.version = scope.version
    add = scope_spans.spans.add
    for span in spans:
        out = add()
        context = span.context
        out.trace_id = context.trace_id.to_bytes(16, "big")
        out.span_id = context.span_id.to_bytes(8, "big")
        parent = span.parent
        if parent is not None:
            out.parent_span_id = parent.span_id.to_bytes(8, "big")
            out.flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent.is_remote else 0)
        else:
            out.flags = _HAS_IS_REMOTE
        out.name = span.name
        out.kind = span.kind.value + 1
        out.start_time_unix_nano = span.start_time
        out.end_time_unix_nano = span.end_time
        _attributes(out.attributes, span.attributes)
        status = span.status
        out.status.code = status.status_code.value
        if status.description:
            out.status.message = status.description
    return request.SerializeToString()


def _attributes(into, attributes):
    for key, value in (attributes or {}).items():
        kv = into.add()
        kv.key = key
        if type(value) is str:
            kv.value.string_value = value
        elif isinstance(value, (list, tuple)):
            values = kv.value.array_value.values
            for v in value:
                values.add().string_value = v if type(v) is str else str(v)
        else:
            kv.value.string_value = str(value)
