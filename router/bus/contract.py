"""The wire contract every side of the bus speaks.

Pure and free of I/O: the envelope, the event vocabulary, validation and the
dead-letter reasons. ``router/schema/envelope.schema.json`` is the same
contract as a JSON Schema document for other services; a property-based test
keeps the two in agreement, so any change here must be made there too.
"""

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Union

SCHEMA_MAJOR = 1
SCHEMA_VERSION = "1.0"
DEFAULT_MAX_BODY_BYTES = 64 * 1024
# No envelope nests deeper than 4 (document, payload, instances, entry);
# anything deeper is refused before the JSON parser recurses into it.
MAX_DEPTH = 16
MAX_CREATED_AT = 1e12

INSTANCE_EVENT = "instance-event"
LIFECYCLE_EVENT = "lifecycle-event"
HOST_ANNOUNCE = "host-announce"
# A compute host's whole placement in one message: it replaces what a
# router knew of that host (instances gone from it disappear).
HOST_SNAPSHOT = "host-snapshot"
# A router asking every agent for a HOST_SNAPSHOT (after it (re)connects).
RESYNC_REQUEST = "resync-request"
KINDS = (INSTANCE_EVENT, LIFECYCLE_EVENT, HOST_ANNOUNCE, HOST_SNAPSHOT,
         RESYNC_REQUEST)

NETWORK_CHANGED = "network-changed"
VIF_PLUGGED = "network-vif-plugged"
VIF_UNPLUGGED = "network-vif-unplugged"
VIF_DELETED = "network-vif-deleted"
EVENT_NAMES = (
    NETWORK_CHANGED,
    VIF_PLUGGED,
    VIF_UNPLUGGED,
    VIF_DELETED,
    "volume-extended",
    "power-update",
    "accelerator-request-bound",
    "volume-reimaged",
)
# The compute API refuses these without a tag; so do we.
TAG_REQUIRED = ("volume-extended", "power-update", "accelerator-request-bound")

COMPLETED = "completed"
FAILED = "failed"
IN_PROGRESS = "in-progress"
STATUSES = (COMPLETED, FAILED, IN_PROGRESS)

TRANSITIONS = (
    "STARTED",
    "STOPPED",
    "PAUSED",
    "RESUMED",
    "POSTCOPY_STARTED",
    "MIGRATION_COMPLETED",
    "DEFINED",
    "UNDEFINED",
    "CRASHED",
    "PMSUSPENDED",
    "SHUTDOWN",
)

# Dead-letter reasons, carried in the HEADER_REASON header.
REASON_TOO_LARGE = "too-large"
REASON_MALFORMED = "malformed"
REASON_INVALID = "invalid"
REASON_UNSUPPORTED_VERSION = "unsupported-version"
REASON_NO_HOST = "no-host"
REASON_UNKNOWN_HOST = "unknown-host"
REASON_UNROUTABLE = "unroutable"
REASON_FORBIDDEN = "forbidden"
REASON_EXPIRED = "expired"
REASON_INTERNAL = "internal-error"
# Delivered again and again without being settled: something about it keeps
# killing its consumer, so it is set aside instead of looping.
REASON_POISON = "poison"

HEADER_REASON = "x-evrouter-reason"
HEADER_DETAIL = "x-evrouter-detail"
HEADER_ATTEMPT = "x-evrouter-attempt"
HEADER_FIRST_SEEN = "x-evrouter-first-seen"
HEADER_PUBLISHER = "x-evrouter-publisher"

# The patterns are searched (re.search), as JSON Schema does, so they are
# anchored at both ends. "(?![\s\S])" rather than "$": in Python "$" also
# matches before a trailing newline, and "host\n" must not pass.
UUID_PATTERN = (
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    r"-[0-9a-fA-F]{12}(?![\s\S])"
)
# Host names end up in exchange and queue names (at most 255 bytes with the
# prefix), so they are plain ASCII without spaces.
HOST_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}(?![\s\S])"
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}(?![\s\S])"
VERSION_PATTERN = r"^(0|[1-9][0-9]{0,3})\.[0-9]{1,4}(?![\s\S])"

_uuid_re = re.compile(UUID_PATTERN)
_host_re = re.compile(HOST_PATTERN)
_id_re = re.compile(ID_PATTERN)
_version_re = re.compile(VERSION_PATTERN)


class ContractError(ValueError):
    """A message that breaks the contract.

    ``reason`` is one of the REASON_* codes (what a dead-letter says),
    ``field`` the dotted path of the offending field, ``detail`` the why.
    """

    def __init__(self, reason, field, detail):
        super().__init__(f"{field}: {detail}" if field else detail)
        self.reason = reason
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    name: str
    server_uuid: str
    tag: Optional[str] = None
    status: str = COMPLETED
    host: Optional[str] = None
    # The source's revision of what the event is about (the network side's
    # port revision_number): only grows, so a receiver can order events of
    # one port without trusting anyone's clock. None: the source has none.
    revision: Optional[int] = None

    @property
    def key(self):
        """What a waiter prepares for: (instance uuid, name, tag)."""
        return (self.server_uuid, self.name, self.tag)


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    instance_uuid: str
    host: str
    transition: str
    event: int
    detail: int
    seq: int
    snapshot: bool = False


@dataclass(frozen=True, slots=True)
class HostAnnounce:
    host: str
    seq: int = 0


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    host: str
    seq: int
    # ((instance uuid, transition), ...): every domain the host has now
    instances: tuple = ()


@dataclass(frozen=True, slots=True)
class ResyncRequest:
    router: str


Payload = Union[InstanceEvent, LifecycleEvent, HostAnnounce, HostSnapshot,
                ResyncRequest]


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    kind: str
    created_at: float
    producer: str
    payload: Payload
    version: str = SCHEMA_VERSION


def new_id():
    return uuid.uuid4().hex


def envelope(payload, producer, *, message_id=None, created_at=None):
    """Wrap a payload in a fresh envelope (new id, current time)."""
    return Envelope(
        id=message_id or new_id(),
        kind=_KIND_OF[type(payload)],
        created_at=time.time() if created_at is None else created_at,
        producer=producer,
        payload=payload,
    )


# --- encoding ---------------------------------------------------------------

def to_document(env):
    """The envelope as the JSON-ready dict that goes on the wire."""
    p = env.payload
    if type(p) is InstanceEvent:
        payload = {"name": p.name, "server_uuid": p.server_uuid,
                   "status": p.status, "tag": p.tag}
        if p.host is not None:
            payload["host"] = p.host
        if p.revision is not None:
            payload["revision"] = p.revision
    elif type(p) is LifecycleEvent:
        payload = {"instance_uuid": p.instance_uuid, "host": p.host,
                   "transition": p.transition, "event": p.event,
                   "detail": p.detail, "seq": p.seq,
                   "snapshot": p.snapshot}
    elif type(p) is HostSnapshot:
        payload = {"host": p.host, "seq": p.seq,
                   "instances": [{"instance_uuid": u, "transition": t}
                                 for u, t in p.instances]}
    elif type(p) is ResyncRequest:
        payload = {"router": p.router}
    else:
        payload = {"host": p.host, "seq": p.seq}
    return {"version": env.version, "id": env.id, "kind": env.kind,
            "created_at": env.created_at, "producer": env.producer,
            "payload": payload}


def encode(env):
    return json.dumps(to_document(env), separators=(",", ":")).encode()


def _refuse_constant(name):
    # json.loads accepts NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs):
    # Parsers disagree on which of two equal keys wins; a document that
    # says two things is refused rather than read one way here and another
    # way by the next consumer.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup[:80]!r}")
    return doc


# One decoder for every message: json.loads(parse_constant=...) builds a new
# one per call.
_json_decode = json.JSONDecoder(parse_constant=_refuse_constant,
                                object_pairs_hook=_unique_keys).decode
# Strings (with their escapes) and brackets: enough to measure nesting.
_nesting_tokens = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]').finditer


def nesting_depth(body):
    """How deep the arrays and objects of a JSON text nest (bytes)."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return 0        # cannot be deeper than that: skip the scan
    depth = deepest = 0
    for m in _nesting_tokens(body):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def decode(body, max_bytes=DEFAULT_MAX_BODY_BYTES):
    """Bytes off the wire to a validated Envelope, or ContractError.

    Total: any bytes give an Envelope or a ContractError, never another
    exception. (Whole AMQP messages, with their properties, go through
    router.bus.inbound.decode_message, which ends here.)
    """
    if type(body) is not bytes:
        if type(body) in (bytearray, memoryview):
            body = bytes(body)
        else:
            raise ContractError(REASON_MALFORMED, "",
                                f"body must be bytes, not {type(body).__name__}")
    if len(body) > max_bytes:
        raise ContractError(REASON_TOO_LARGE, "",
                            f"body is {len(body)} bytes, limit {max_bytes}")
    if not body:
        raise ContractError(REASON_MALFORMED, "", "empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ContractError(REASON_MALFORMED, "",
                            f"not UTF-8: {exc}") from None
    depth = nesting_depth(body)
    if depth > MAX_DEPTH:
        raise ContractError(REASON_MALFORMED, "",
                            f"nested {depth} deep, limit {MAX_DEPTH}")
    try:
        doc = _json_decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, duplicate keys and integers
        # past Python's digit limit.
        raise ContractError(REASON_MALFORMED, "",
                            f"not JSON: {str(exc)[:200]}") from None
    return from_document(doc)


# --- validation -------------------------------------------------------------

# Control characters (C0, DEL, C1) and the Unicode line and paragraph
# separators: never in free text (the schema's $defs/text says the same).
_CONTROL = "\x00-\x1f\x7f-\x9f\u2028\u2029"      # a regex class's inside
_control_re = re.compile(f"[{_CONTROL}]")
# The same as a pattern of a whole value, for options that become free text.
TEXT_PATTERN = f"\\A[^{_CONTROL}]{{1,255}}\\Z"


def _fail(field, detail, reason=REASON_INVALID):
    raise ContractError(reason, field, detail)


def _is_int(v):
    # JSON Schema's "integer" is any number without a fraction; bool is not.
    t = type(v)
    return t is int or (t is float and v.is_integer())


def _str(doc, field, path, *, pattern=None, max_len=255, required=True,
         choices=None):
    """A string field; an optional one may be absent or null."""
    if field not in doc:
        if required:
            _fail(path, "is required")
        return None
    v = doc[field]
    if v is None and not required:
        return None
    if type(v) is not str:
        _fail(path, f"must be a string, not {_json_type(v)}")
    if choices is not None:
        if v not in choices:
            _fail(path, f"unknown value {v[:80]!r}; expected one of "
                        f"{', '.join(choices)}")
        return v
    if not 1 <= len(v) <= max_len:
        _fail(path, f"length must be 1..{max_len}, got {len(v)}")
    if pattern is None and _control_re.search(v) is not None:
        # Free text (a tag, a producer, a router's name) reaches log lines
        # and the journal: a newline or an escape sequence there would
        # forge a line or a colour in an operator's terminal.
        _fail(path, f"{v[:80]!r} has a control character")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from a \\uD800 escape: not Unicode text, and
            # it would make every later encode of this value raise.
            _fail(path, "is not valid Unicode (lone surrogate)",
                  REASON_MALFORMED)
    if pattern is not None and pattern.search(v) is None:
        _fail(path, f"{v[:80]!r} does not match {pattern.pattern}")
    return v


def _json_type(v):
    return _JSON_TYPES.get(type(v), type(v).__name__)


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer",
               float: "number", str: "string", list: "array", dict: "object"}


def _int(doc, field, path):
    if field not in doc:
        _fail(path, "is required")
    v = doc[field]
    if not _is_int(v):
        _fail(path, f"must be an integer, not {_json_type(v)}")
    if v < 0:
        _fail(path, f"must be >= 0, got {v}")
    return int(v)


def _instance_event(p):
    name = _str(p, "name", "payload.name", choices=EVENT_NAMES)
    # One spelling of an instance everywhere (placement, waiters, REST):
    # the compute API accepts either case, so the contract folds it.
    server_uuid = _str(p, "server_uuid", "payload.server_uuid",
                       pattern=_uuid_re).lower()
    status = COMPLETED
    if "status" in p:
        status = _str(p, "status", "payload.status", choices=STATUSES)
    tag = _str(p, "tag", "payload.tag", required=False)
    if tag is None and name in TAG_REQUIRED:
        _fail("payload.tag", f"is required for {name}")
    host = _str(p, "host", "payload.host", pattern=_host_re, required=False)
    revision = None
    if p.get("revision") is not None:
        revision = _int(p, "revision", "payload.revision")
    return InstanceEvent(name, server_uuid, tag, status, host, revision)


def _lifecycle_event(p):
    instance_uuid = _str(p, "instance_uuid", "payload.instance_uuid",
                         pattern=_uuid_re).lower()
    host = _str(p, "host", "payload.host", pattern=_host_re)
    transition = _str(p, "transition", "payload.transition",
                      choices=TRANSITIONS)
    event = _int(p, "event", "payload.event")
    detail = _int(p, "detail", "payload.detail")
    seq = _int(p, "seq", "payload.seq")
    snapshot = p.get("snapshot", False)
    if type(snapshot) is not bool:
        _fail("payload.snapshot", "must be a boolean")
    return LifecycleEvent(instance_uuid, host, transition, event, detail, seq,
                          snapshot)


def _host_announce(p):
    host = _str(p, "host", "payload.host", pattern=_host_re)
    seq = _int(p, "seq", "payload.seq") if "seq" in p else 0
    return HostAnnounce(host, seq)


def _host_snapshot(p):
    host = _str(p, "host", "payload.host", pattern=_host_re)
    seq = _int(p, "seq", "payload.seq")
    entries = p.get("instances")
    if type(entries) is not list:
        _fail("payload.instances", "must be an array")
    instances = []
    for i, entry in enumerate(entries):
        path = f"payload.instances.{i}"
        if type(entry) is not dict:
            _fail(path, "must be an object")
        uuid_ = _str(entry, "instance_uuid", f"{path}.instance_uuid",
                     pattern=_uuid_re).lower()
        transition = _str(entry, "transition", f"{path}.transition",
                          choices=TRANSITIONS)
        instances.append((uuid_, transition))
    return HostSnapshot(host, seq, tuple(instances))


def _resync_request(p):
    return ResyncRequest(_str(p, "router", "payload.router"))


_PAYLOAD_OF = {INSTANCE_EVENT: _instance_event,
               LIFECYCLE_EVENT: _lifecycle_event,
               HOST_ANNOUNCE: _host_announce,
               HOST_SNAPSHOT: _host_snapshot,
               RESYNC_REQUEST: _resync_request}
_KIND_OF = {InstanceEvent: INSTANCE_EVENT, LifecycleEvent: LIFECYCLE_EVENT,
            HostAnnounce: HOST_ANNOUNCE, HostSnapshot: HOST_SNAPSHOT,
            ResyncRequest: RESYNC_REQUEST}


def from_document(doc):
    """A decoded JSON document to an Envelope, or ContractError.

    Unknown fields are ignored within a major version; another major
    version is refused with REASON_UNSUPPORTED_VERSION.
    """
    if type(doc) is not dict:
        _fail("", f"message must be a JSON object, not {_json_type(doc)}")
    version = _str(doc, "version", "version", pattern=_version_re)
    major = int(version.split(".", 1)[0])
    if major != SCHEMA_MAJOR:
        _fail("version", f"major version {major} is not supported "
                         f"(this side speaks {SCHEMA_MAJOR}.x)",
              REASON_UNSUPPORTED_VERSION)
    message_id = _str(doc, "id", "id", pattern=_id_re)
    kind = _str(doc, "kind", "kind", choices=KINDS)
    created_at = doc.get("created_at")
    if "created_at" not in doc:
        _fail("created_at", "is required")
    if type(created_at) not in (int, float) or not (
            0 <= created_at <= MAX_CREATED_AT):
        # The upper bound also keeps out 1e999, which Python parses as inf.
        _fail("created_at", "must be a number of seconds since the epoch, "
                            f"0..{MAX_CREATED_AT:.0e}")
    producer = _str(doc, "producer", "producer")
    payload = doc.get("payload")
    if type(payload) is not dict:
        _fail("payload", "must be an object")
    return Envelope(message_id, kind, created_at, producer,
                    _PAYLOAD_OF[kind](payload), version)


def dead_letter_reason(headers):
    """Why a message is in the dead-letter queue.

    The router says so in HEADER_REASON; the broker (TTL expiry, delivery
    limit, reject) says so in x-death.
    """
    headers = headers or {}
    reason = headers.get(HEADER_REASON)
    if reason:
        return reason.decode() if isinstance(reason, bytes) else reason
    deaths = headers.get("x-death") or []
    if deaths:
        why = deaths[0].get("reason")
        why = why.decode() if isinstance(why, bytes) else why
        return REASON_EXPIRED if why == "expired" else why
    return None
