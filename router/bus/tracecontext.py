"""W3C trace context (``traceparent``) on evrouter's messages. Pure.

Every instance event evrouter publishes carries a ``traceparent`` AMQP
header: version 00, a 16-byte trace id, an 8-byte span id and the flags,
as https://www.w3.org/TR/trace-context/ writes them. It is taken from the
publishing context when there is one (an explicit value, the current
OpenTelemetry span when that library is loaded, or the request id of the
current OpenStack request: ``req-<uuid>``'s 128 bits are the trace id, so
the trace and the service's own log lines name the same request), made
up otherwise.

The header comes from whoever could publish to the exchange: it is
hostile input. ``parse`` accepts exactly the W3C form (55 ASCII
characters, lower-case hex, ids not all zero, version 00) and nothing
else; the router copies a header that passes and drops one that does not.
"""

import re
import secrets
import sys

HEADER = "traceparent"
VERSION = "00"
SAMPLED = "01"

_FORMAT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?![\s\S])")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_LENGTH = 55


def parse(value):
    """(trace id, span id, flags) of a valid traceparent, else None.

    Total: any value (str, bytes, a number, a table...) gives a tuple or
    None, never an exception.
    """
    if type(value) is bytes:
        if len(value) != _LENGTH:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if type(value) is not str or len(value) != _LENGTH:
        return None
    m = _FORMAT.match(value)
    if m is None:
        return None
    trace_id, span_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags


def valid(value):
    """The value as a str if it is a valid traceparent, else None."""
    parsed = parse(value)
    if parsed is None:
        return None
    return value if type(value) is str else \
        f"00-{parsed[0]}-{parsed[1]}-{parsed[2]}"


def trace_id_of(value):
    """The trace id of a traceparent value, or None for anything invalid."""
    parsed = parse(value)
    return None if parsed is None else parsed[0]


def new(trace_id=None, flags=SAMPLED):
    """A fresh traceparent: a new span of `trace_id` (default: a new trace)."""
    return f"{VERSION}-{trace_id or secrets.token_hex(16)}-" \
           f"{secrets.token_hex(8)}-{flags}"


def for_publish(given=None, request_id=None):
    """The traceparent to put on a message being published.

    `given`, the publishing context's, if it is valid (a new span of its
    trace: this publish is a step of its own); else the current
    OpenTelemetry span's, if that library is loaded and a span is
    recording; else the trace of `request_id` or, when none is given, of
    the current oslo.context's request (if that library is loaded); else
    a new trace.
    """
    parsed = parse(given) if given is not None else None
    if parsed is not None:
        return new(parsed[0], parsed[2])
    otel = _opentelemetry_context()
    if otel is not None:
        return new(*otel)
    trace_id = trace_of_request(request_id if request_id is not None
                                else _current_request_id())
    return new(trace_id)


_REQUEST = re.compile(r"req-([0-9a-fA-F]{8})-([0-9a-fA-F]{4})-([0-9a-fA-F]{4})-"
                      r"([0-9a-fA-F]{4})-([0-9a-fA-F]{12})(?![\s\S])")


def trace_of_request(request_id):
    """The trace id of an OpenStack request id (``req-`` and a UUID), or
    None for anything else (or the all-zero id W3C forbids). Total."""
    if type(request_id) is bytes:
        try:
            request_id = request_id.decode("ascii")
        except UnicodeDecodeError:
            return None
    if type(request_id) is not str or len(request_id) != 40:
        return None
    m = _REQUEST.match(request_id)
    if m is None:
        return None
    trace_id = "".join(m.groups()).lower()
    return None if trace_id == _ZERO_TRACE else trace_id


def _current_request_id():
    # Only if the embedding service already imported it (Neutron does):
    # never imported here.
    context = sys.modules.get("oslo_context.context")
    if context is None:
        return None
    try:
        current = context.get_current()
        return getattr(current, "request_id", None) if current else None
    except Exception:       # a foreign library's trouble is not ours
        return None


def _opentelemetry_context():
    # Only if the embedding service already imported it: never imported here.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    try:
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return f"{ctx.trace_id:032x}", f"{int(ctx.trace_flags):02x}"
    except Exception:       # a foreign library's trouble is not ours
        return None
