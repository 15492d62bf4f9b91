"""Hostile AMQP messages for the poison suites (no tests here).

Whatever a client can put on the wire: any body, any properties, and
content headers py-amqp cannot even decode (written as raw bytes). Each
case names the dead-letter reason a consumer must give it.
"""

import json
import struct
import urllib.parse
import uuid
import zlib

import amqp

from router.bus import contract

MALFORMED = contract.REASON_MALFORMED


class RawMessage(amqp.Message):
    """A message whose content header is sent exactly as given."""

    def __init__(self, body, raw_properties):
        super().__init__(body)
        self._raw = raw_properties

    def _serialize_properties(self):
        return self._raw


def _shortstr(data):
    return struct.pack(">B", len(data)) + data


def raw_properties(*, message_id=None, headers=None, correlation_id=None,
                   delivery_mode=None):
    """Basic properties as bytes: message_id/correlation_id raw bytes,
    headers a raw encoded table body, delivery_mode 2 for persistent."""
    flags, fields = 0, b""
    if headers is not None:
        flags |= 0x2000
        fields += struct.pack(">I", len(headers)) + headers
    if delivery_mode is not None:
        flags |= 0x1000
        fields += struct.pack(">B", delivery_mode)
    if correlation_id is not None:
        flags |= 0x0400
        fields += _shortstr(correlation_id)
    if message_id is not None:
        flags |= 0x0080
        fields += _shortstr(message_id)
    return struct.pack(">H", flags) + fields


def declare_internal_exchange(channel, name, type_="topic"):
    """exchange.declare with the internal bit, as a compromised host could
    declare its own exchange (py-amqp's API keeps the bit off): every
    publish to it then closes the publisher's channel with 403."""
    channel.send_method(amqp.spec.Exchange.Declare, "BssbbbbbF",
                        (0, name, type_, False, True, False, True, False, {}),
                        wait=amqp.spec.Exchange.DeclareOk)


def raw_timestamp_header(name=b"t", value=2 ** 63 - 1):
    """A table entry 'T' (timestamp) that no datetime can hold."""
    return _shortstr(name) + b"T" + struct.pack(">Q", value)


class RawPublisher:
    """Confirmed publishing with py-amqp alone: nothing of evrouter's."""

    def __init__(self, url, userid=None, password=None):
        parts = urllib.parse.urlsplit(url)
        vhost = urllib.parse.unquote(parts.path[1:]) or "/"
        self.userid = userid or parts.username or "guest"
        self.conn = amqp.Connection(
            f"{parts.hostname}:{parts.port or 5672}",
            userid=self.userid,
            password=password or parts.password or "guest",
            virtual_host=vhost)
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.confirm_select()

    def publish(self, exchange, routing_key, body, **properties):
        # As every evrouter publisher does (a message without one is
        # forbidden wherever it claims something); user_id=None leaves it out.
        properties.setdefault("user_id", self.userid)
        if properties["user_id"] is None:
            del properties["user_id"]
        message = amqp.Message(body, delivery_mode=2, **properties)
        self.channel.basic_publish_confirm(message, exchange=exchange,
                                           routing_key=routing_key)

    def publish_raw(self, exchange, routing_key, body, raw):
        self.channel.basic_publish_confirm(RawMessage(body, raw),
                                           exchange=exchange,
                                           routing_key=routing_key)

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


def event_body(host, server=None, tag="port-1", **overrides):
    doc = json.loads(contract.encode(contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, server or str(uuid.uuid4()), "port-1",
        contract.COMPLETED, host), "poison-test")))
    doc["payload"]["tag"] = tag
    doc.update(overrides)
    return json.dumps(doc).encode()


def cases(host):
    """(name, body, properties or None, raw property bytes or None, reason).

    Every failure found by trying the system as a user would is here, with
    the reason it must be dead-lettered for (issue: nothing a sender does
    can stop a service).
    """
    valid = event_body(host)
    deep = b"[" * 30_000 + b"]" * 30_000
    return [
        ("empty body labelled binary", b"", {"content_encoding": "binary"},
         None, MALFORMED),
        ("empty body, no labels", b"", {}, None, MALFORMED),
        ("valid event labelled idna", valid, {"content_encoding": "idna"},
         None, MALFORMED),
        ("valid event labelled gzip", valid, {"content_encoding": "gzip"},
         None, MALFORMED),
        ("valid event labelled msgpack", valid,
         {"content_type": "application/x-msgpack"}, None, MALFORMED),
        ("valid event, charset latin-1", valid,
         {"content_type": "application/json; charset=latin-1"}, None,
         MALFORMED),
        ("JSON nested 30,000 deep (61 KiB)", deep, {}, None, MALFORMED),
        ("JSON nested 20 deep", b'{"a":' * 20 + b"1" + b"}" * 20, {}, None,
         MALFORMED),
        ("duplicate keys", b'{"version":"1.0","version":"1.0"}', {}, None,
         MALFORMED),
        # json.dumps writes the lone surrogate as the escape \ud800
        ("lone surrogate in a field", event_body(host, producer="\ud800"),
         {}, None, MALFORMED),
        ("created_at 1e999", valid.replace(b'"created_at":', b'"created_at":1e999,"x":'),
         {}, None, contract.REASON_INVALID),
        ("an integer of 5,000 digits", b'{"version":"1.0","n":' + b"9" * 5000 + b"}",
         {}, None, MALFORMED),
        ("invalid UTF-8 body", b'{"version":"\xff"}', {}, None, MALFORMED),
        ("body over the size limit", b'{"pad":"' + b"x" * 70_000 + b'"}', {},
         None, contract.REASON_TOO_LARGE),
        ("message_id that is not UTF-8", valid, None,
         raw_properties(message_id=b"\xff\xfe-id"), MALFORMED),
        ("timestamp header out of range", valid, None,
         raw_properties(headers=raw_timestamp_header()), MALFORMED),
        ("headers of every type, bad body", b"{nope",
         {"application_headers": {
             "list": [1, "two", [3.5, None]], "table": {"a": {"b": True}},
             "bytes": b"\x00\xff", "neg": -2 ** 40, "void": None}},
         None, MALFORMED),
        ("no message id, not JSON", b"\x00\x01", {}, None, MALFORMED),
        # kombu decompressed by this header, before any decode of ours: a
        # codec it does not know, or a body not in the codec, raised out of
        # the consumer on every delivery (every router, for good).
        ("valid event, compression header naming no codec", valid,
         {"application_headers": {"compression": "application/x-nothing"}},
         None, MALFORMED),
        ("valid event, compression header zlib, body not zlib", valid,
         {"application_headers": {"compression": "application/x-gzip"}},
         None, MALFORMED),
        ("valid event, compression header that is a number", valid,
         {"application_headers": {"compression": 7}}, None, MALFORMED),
        # Free text reaches log lines and the journal: a newline forged a
        # whole log line of the embedding service, an escape coloured one.
        ("a tag that forges a log line",
         event_body(host, tag="p\nERROR nova.compute.manager [req-x] deleted"),
         {}, None, contract.REASON_INVALID),
        ("a producer with a terminal escape", event_body(host, producer="\x1b[31mred"),
         {}, None, contract.REASON_INVALID),
        ("valid event zlib-compressed, compression header zlib",
         zlib.compress(valid),
         {"application_headers": {"compression": "application/x-gzip"}},
         None, MALFORMED),
    ]


# --- header tables that py-amqp re-encodes larger than they came ------------
# A consumer's copy of a message must fit the negotiated frame_max although
# the sender's did: py-amqp decodes 'b' (1 byte) and 'f' (4 bytes) numbers
# and writes them back as 'I' (4 bytes) and 'd' (8 bytes) (issue 19).

def raw_array_entry(name, type_code, values):
    """A table entry holding an array of one raw AMQP number type."""
    fmt = {b"b": ">b", b"B": ">B", b"s": ">h", b"u": ">H", b"f": ">f",
           b"I": ">i", b"d": ">d"}[type_code]
    items = b"".join(type_code + struct.pack(fmt, v) for v in values)
    return _shortstr(name) + b"A" + struct.pack(">I", len(items)) + items


def raw_string_entry(name, text):
    data = text.encode()
    return _shortstr(name) + b"S" + struct.pack(">I", len(data)) + data


def oversized_header_cases():
    """(name, headers or None, raw encoded table or None): messages the
    broker accepts whose headers, re-encoded with a dead-letter reason, do
    not fit in the 131,072-byte frame the broker negotiated."""
    return [
        ("one 130,950-byte string header", {"pad": "A" * 130_950}, None),
        ("30,000 one-byte integers ('b', 60 KB, 150 KB re-encoded)", None,
         raw_array_entry(b"ints", b"b", [i % 100 for i in range(30_000)])),
        ("20,000 32-bit floats ('f', 100 KB, 180 KB re-encoded)", None,
         raw_array_entry(b"floats", b"f", [i / 8 for i in range(20_000)])),
    ]
