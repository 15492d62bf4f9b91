"""Whole AMQP messages in: the one total decode every consumer uses. Pure.

A message is its body *and* its properties, and both come from whoever could
publish to the exchange. ``decode_message`` turns any (body, properties)
into an Envelope or a ContractError with a dead-letter reason; it raises
nothing else. The ``safe_*`` helpers build what the dead-letter step sends
from the same untrusted values, so the last line of defence cannot itself
fail on them.
"""

import math

from amqp.serialization import dumps

from router.bus import contract

# Set by the transport (router/bus/transport.py) in place of the properties
# when py-amqp could not decode a content header: invalid UTF-8 in a short
# string, a timestamp out of range... The value says what went wrong.
UNDECODABLE = "x-evrouter-undecodable"

# Labels a sender may put on a JSON body. kombu labels raw bytes
# application/data + binary; anything that claims a compression or another
# serialisation is refused rather than guessed at.
_JSON_TYPES = frozenset({"application/json", "application/data",
                         "application/octet-stream", "text/plain"})
_PLAIN_ENCODINGS = frozenset({"utf-8", "utf8", "binary", "identity"})

# kombu's label for a compressed body (a header). A body is never
# decompressed here: whatever claims a compression is refused, as a
# content_encoding naming one is (router/bus/transport.Message).
COMPRESSION = "compression"

_MAX_SHORTSTR = 255
_MAX_HEADER_DEPTH = 4
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def properties_of(message):
    """The AMQP properties of a kombu message as one plain dict.

    kombu keeps content_type and content_encoding beside the properties on
    some transports (memory), inside them on others (py-amqp).
    """
    props = getattr(message, "properties", None)
    props = dict(props) if type(props) is dict else {}
    props.setdefault("content_type", getattr(message, "content_type", None))
    props.setdefault("content_encoding",
                     getattr(message, "content_encoding", None))
    headers = getattr(message, "headers", None)
    if headers is not None:
        props.setdefault("application_headers", headers)
    return props


def decode_message(body, properties, max_bytes=contract.DEFAULT_MAX_BODY_BYTES):
    """Any AMQP message to a validated Envelope, or ContractError."""
    props = properties if type(properties) is dict else {}
    broken = props.get(UNDECODABLE)
    if broken:
        raise contract.ContractError(contract.REASON_MALFORMED, "properties",
                                     f"undecodable AMQP properties: {broken}")
    _check_content_type(props.get("content_type"))
    encoding = _check_content_encoding(props.get("content_encoding"))
    headers = props.get("application_headers")
    if type(headers) is dict and COMPRESSION in headers:
        _malformed(COMPRESSION, f"{clip(repr(headers[COMPRESSION]), 80)}: "
                   f"bodies are plain UTF-8 JSON, never decompressed")
    if type(body) is str:
        # A transport that decoded the body by its label (py-amqp's
        # auto_decode; ours turns it off): back to the bytes that were sent.
        try:
            body = body.encode(encoding or "utf-8", "surrogatepass")
        except (LookupError, UnicodeError, TypeError) as exc:
            raise contract.ContractError(
                contract.REASON_MALFORMED, "", f"body cannot be read back as "
                f"bytes: {type(exc).__name__}") from None
    elif body is None:
        body = b""
    return contract.decode(body, max_bytes)


def raw_body(body):
    """The body as bytes to publish again, whatever a transport handed over."""
    if type(body) is bytes:
        return body
    if type(body) is str:
        return body.encode("utf-8", "surrogatepass")
    if type(body) in (bytearray, memoryview):
        return bytes(body)
    return b""


def _check_content_type(value):
    if value is None or value == "":
        return
    if type(value) is not str:
        _malformed("content_type", f"must be a string, not {type(value).__name__}")
    media, _, params = value.partition(";")
    if media.strip().lower() not in _JSON_TYPES:
        _malformed("content_type", f"{value[:80]!r} is not JSON")
    for param in params.split(";"):
        name, _, v = param.partition("=")
        if name.strip().lower() == "charset" and \
                v.strip().strip('"').lower() not in ("utf-8", "utf8"):
            _malformed("content_type", f"charset {v.strip()[:40]!r} is not UTF-8")


def _check_content_encoding(value):
    if value is None or value == "":
        return None
    if type(value) is not str:
        _malformed("content_encoding",
                   f"must be a string, not {type(value).__name__}")
    if value.strip().lower() not in _PLAIN_ENCODINGS:
        _malformed("content_encoding", f"{value[:80]!r} is not supported "
                                       f"(bodies are plain UTF-8 JSON)")
    return "utf-8"


def _malformed(field, detail):
    raise contract.ContractError(contract.REASON_MALFORMED, field, detail)


# --- what the dead-letter step may send back out ----------------------------

def safe_shortstr(value):
    """A property value fit to publish again (str of <= 255 UTF-8 bytes), or None."""
    if type(value) is not str:
        return None
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value if len(encoded) <= _MAX_SHORTSTR else None


def clip(text, limit=1000):
    """A detail text for a header or a log line: bounded, always encodable."""
    text = text if type(text) is str else repr(text)
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def loggable(value, limit=80):
    """Any value as a short, printable token for a log line."""
    if value is None:
        return "-"
    if type(value) is str and value.isprintable() and value.isascii() \
            and 0 < len(value) <= limit and " " not in value:
        return value
    return repr(value)[:limit]


def safe_headers(headers):
    """A copy of untrusted headers that py-amqp can always serialise.

    Keys must be str of at most 128 UTF-8 bytes; values may be str, bytes,
    bool, None, 64-bit ints, finite floats, and lists/tables of these up to
    a small depth. Anything else is left out (and counted in
    ``x-evrouter-dropped-headers``) rather than risk a publish that raises.
    """
    dropped = [0]
    clean = _safe_table(headers, 0, dropped) if type(headers) is dict else {}
    if type(headers) not in (dict, type(None)):
        dropped[0] += 1
    if dropped[0]:
        clean["x-evrouter-dropped-headers"] = dropped[0]
    return clean


HEADER_CUT = "x-evrouter-cut-headers"
# Room left for the marker that says what was cut (a count, a size and
# the first key names, clipped).
_CUT_MARKER_ROOM = 512


DEFAULT_FRAME_MAX = 131_072         # py-amqp's and RabbitMQ's default

# A content header frame beside its header table: the frame's own 8 bytes;
# class id, weight and body size (12); the property flags (2); and every
# other basic property at its largest: ten short strings (content type and
# encoding, correlation id, reply-to, expiration, message id, type, user
# id, app id, cluster id) of 1 + 255 bytes, delivery mode and priority (1
# each), timestamp (8). RabbitMQ refuses a frame over frame_max with 501
# FRAME_ERROR, which closes the whole connection.
_CONTENT_HEADER_FIXED = 8 + 12 + 2 + 10 * 256 + 1 + 1 + 8


def header_budget(frame_max):
    """Bytes a header table may take, encoded, in the content header frame
    of a connection that negotiated `frame_max`, whatever the properties."""
    return frame_max - _CONTENT_HEADER_FIXED


def frame_max_of(conn):
    """The frame_max a kombu connection negotiated (memory: the default)."""
    value = getattr(getattr(conn, "connection", None), "frame_max", None)
    return value if type(value) is int and value > 0 else DEFAULT_FRAME_MAX


def encoded_size(headers):
    """Bytes of a header table as py-amqp puts it on the wire.

    Not the size it arrived with: py-amqp re-encodes every int as 32 or 64
    bits and every float as a double, so a table of one-byte integers grows
    five-fold on its way back out.
    """
    return len(dumps("F", [headers]))


def bounded_headers(headers, budget):
    """(headers, cut): untrusted headers made safe and at most `budget` bytes.

    Whole entries are left out, largest first, until the encoded table fits;
    what was left out is said in HEADER_CUT (and returned as ``cut``, None
    when nothing was). A budget too small even for the marker gives {}.
    A content header must fit in one frame, so whatever a service sends back
    out (a dead letter) is bounded below the connection's frame_max.
    """
    clean = safe_headers(headers)
    size = encoded_size(clean)
    if size <= budget:
        return clean, None
    if budget < _CUT_MARKER_ROOM:
        return {}, f"all {len(clean)} header(s), {size} bytes"
    entries = sorted(((encoded_size({k: v}) - 4, k) for k, v in clean.items()),
                     reverse=True)
    cut, cut_bytes = [], 0
    for entry_size, key in entries:
        if size <= budget - _CUT_MARKER_ROOM:
            break
        del clean[key]
        size -= entry_size
        cut_bytes += entry_size
        cut.append(key)
    names = ",".join(loggable(k, 40) for k in cut)
    marker = (f"{len(cut)} header(s), {cut_bytes} bytes: {names}"[:200]
              .encode("ascii", "backslashreplace").decode("ascii")[:200])
    clean[HEADER_CUT] = marker
    return clean, marker



def bounded_beside(theirs, ours, frame_max):
    """(headers, cut): `theirs`, a sender's untrusted headers, made safe
    and cut to what fits beside `ours` in one content frame of
    `frame_max`, then `ours` on top (they win over anything sent as
    theirs). Every copy that carries a sender's headers is built by this:
    the router's dead-letter, retry and probation copies and the host
    consumer's dead letters."""
    # Two tables merged take at most their sizes less one length prefix.
    room = header_budget(frame_max) - encoded_size(ours) + 4
    headers, cut = bounded_headers(theirs, room)
    headers.update(ours)
    return headers, cut

def _safe_table(table, depth, dropped):
    out = {}
    for key, value in table.items():
        if safe_shortstr(key) is None or len(key.encode()) > 128:
            dropped[0] += 1
            continue
        ok, value = _safe_value(value, depth + 1, dropped)
        if ok:
            out[key] = value
        else:
            dropped[0] += 1
    return out


def _safe_value(value, depth, dropped):
    t = type(value)
    if value is None or t is bool or t is bytes:
        return True, value
    if t is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False, None
        return True, value
    if t is int:
        return _INT64[0] <= value <= _INT64[1], value
    if t is float:
        return math.isfinite(value), value
    if depth > _MAX_HEADER_DEPTH:
        return False, None
    if t is dict:
        return True, _safe_table(value, depth, dropped)
    if t is list:
        items = []
        for item in value:
            ok, item = _safe_value(item, depth + 1, dropped)
            if ok:
                items.append(item)
            else:
                dropped[0] += 1
        return True, items
    return False, None      # Decimal, datetime, anything a transport made up


def header(headers, name, kind, default):
    """One header of an expected type; the default for anything else."""
    if type(headers) is not dict:
        return default
    value = headers.get(name, default)
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (kind is float and not math.isfinite(value)):
        return default
    return value


def delivery_count(headers):
    """How often the broker says it delivered this before (quorum queues)."""
    count = header(headers, "x-delivery-count", int, 0)
    return count if count > 0 else 0
