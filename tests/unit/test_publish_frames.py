"""transport.publish writes the bytes py-amqp would, and a corked transport
sends them in order, once, before any read that waits on the socket."""

import datetime
import decimal
import functools
import struct
import types

import amqp
import pytest
from amqp import spec
from amqp.method_framing import frame_writer
from amqp.serialization import dumps, loads
from hypothesis import given, settings
from hypothesis import strategies as st

from router.bus import transport

# AMQP short strings (lone surrogates too); some over 255 bytes, which
# neither writer may send
chars = st.characters(blacklist_categories=())
names = st.text(chars, max_size=90) | st.text(min_size=250, max_size=300)
scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
           | st.text(max_size=40) | st.binary(max_size=40)
           | st.floats(allow_nan=False)
           | st.decimals(places=2, min_value=-10**6, max_value=10**6)
           | st.datetimes(min_value=datetime.datetime(1970, 1, 2),
                          max_value=datetime.datetime(2100, 1, 1)).map(
                              lambda d: d.replace(microsecond=0)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=20), inner, max_size=3),
                      max_leaves=8)
keys = st.text(chars, max_size=30) | st.text(min_size=250, max_size=260)
headers = (st.none() | st.dictionaries(keys, values, max_size=6)
           | st.dictionaries(keys, st.text(chars, max_size=60), max_size=6))
optional_names = st.none() | names


class Wire:
    """A transport's write end: what was written, call by call."""

    def __init__(self):
        self.writes = []

    def write(self, data):
        self.writes.append(bytes(data))


def reference(frame_max, exchange, key, body, mandatory, properties):
    """py-amqp's bytes: Channel._basic_publish's frame through its frame writer."""
    wire = Wire()
    conn = types.SimpleNamespace(frame_max=frame_max, bytes_sent=0)
    write_frame = frame_writer(conn, wire)
    message = amqp.basic_message.Message(body, **properties)
    args = dumps("Bssbb", (0, exchange, key, mandatory, False))
    write_frame(1, 7, spec.Basic.Publish, args, message)
    return b"".join(wire.writes)


class Channel:
    """What transport.publish uses of a channel; its fallback is py-amqp's."""

    channel_id = 7

    def __init__(self, frame_max):
        self.wire = Wire()
        self.connection = types.SimpleNamespace(
            frame_max=frame_max, bytes_sent=0, transport=self.wire)
        self.fallbacks = 0

    def basic_publish(self, message, exchange, routing_key, mandatory):
        self.fallbacks += 1
        args = dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
        frame_writer(self.connection, self.wire)(
            1, self.channel_id, spec.Basic.Publish, args, message)


def outcome(call):
    try:
        return call(), None
    except Exception as exc:
        return None, type(exc)


@settings(max_examples=400, deadline=None)
@given(frame_max=st.sampled_from([4096, 8192, 131072]),
       exchange=names, key=names, body=st.binary(max_size=9000),
       mandatory=st.booleans(), content_type=optional_names, headers=headers,
       delivery_mode=st.none() | st.sampled_from([1, 2]),
       message_id=optional_names, user_id=optional_names)
def test_publish_writes_what_py_amqp_writes(frame_max, exchange, key, body, mandatory,
                                            content_type, headers, delivery_mode,
                                            message_id, user_id):
    properties = {k: v for k, v in (
        ("content_type", content_type), ("application_headers", headers),
        ("delivery_mode", delivery_mode), ("message_id", message_id),
        ("user_id", user_id)) if v is not None}
    expected, expected_error = outcome(
        lambda: reference(frame_max, exchange, key, body, mandatory, properties))
    ch = Channel(frame_max)
    _, error = outcome(lambda: transport.publish(
        ch, exchange, key, body, mandatory=mandatory, content_type=content_type,
        headers=headers, delivery_mode=delivery_mode, message_id=message_id,
        user_id=user_id))
    assert error == expected_error
    if error is None:
        assert b"".join(ch.wire.writes) == expected
        assert ch.connection.bytes_sent == 1
    # one write for a message that fits a frame, built here
    if error is None and not ch.fallbacks:
        assert len(ch.wire.writes) == 1
        assert len(body) <= frame_max - 8


def test_a_body_over_one_frame_goes_through_py_amqp_in_frames():
    ch = Channel(4096)
    body = bytes(range(256)) * 40
    transport.publish(ch, "ex", "key", body, delivery_mode=2)
    assert ch.fallbacks == 1
    assert b"".join(ch.wire.writes) == reference(4096, "ex", "key", body, False,
                                                 {"delivery_mode": 2})


def test_a_closed_connection_is_said_as_py_amqp_says_it():
    ch = Channel(4096)
    ch.connection = None
    with pytest.raises(amqp.exceptions.RecoverableConnectionError):
        transport.publish(ch, "ex", "key", b"{}")


def test_decimal_and_nested_headers_round_trip_through_py_amqp():
    # what the router sends must decode as sent, by the reader consumers use
    hdrs = {"x-evrouter-attempt": 3, "nested": {"a": [1, "b", decimal.Decimal("1.50")]},
            "x-b": True, "none": None}
    ch = Channel(131072)
    transport.publish(ch, "ex", "key", b"{}", headers=hdrs, message_id="m1",
                      user_id="router", content_type="application/json",
                      delivery_mode=2)
    data = ch.wire.writes[0]
    _, _, size = struct.unpack_from(">BHI", data, 0)
    header_at = 7 + size + 1
    _, _, hsize = struct.unpack_from(">BHI", data, header_at)
    message = amqp.basic_message.Message()
    message._load_properties(60, data[header_at + 7 + 12:header_at + 7 + hsize], 0)
    assert message.properties == {
        "content_type": "application/json", "application_headers": hdrs,
        "delivery_mode": 2, "message_id": "m1", "user_id": "router"}


# --- corking ---------------------------------------------------------------

class Socket:
    def __init__(self):
        self.sent, self.timeout = [], None

    def sendall(self, data):
        self.sent.append((bytes(data), self.timeout))

    def gettimeout(self):
        return self.timeout

    def settimeout(self, value):
        self.timeout = value


def corkable():
    t = transport.BufferedTCPTransport.__new__(transport.BufferedTCPTransport)
    t.sock, t.connected = Socket(), True
    t._write = t.sock.sendall           # as _setup_transport sets it
    return t


@given(st.lists(st.binary(min_size=1, max_size=70000), max_size=12),
       st.integers(0, 12))
def test_a_corked_transport_sends_every_byte_in_order(chunks, flush_at):
    t = corkable()
    t.cork()
    for i, chunk in enumerate(chunks):
        if i == flush_at:
            t.flush()
        t.write(memoryview(bytearray(chunk)))   # py-amqp reuses its buffer
    t.uncork()
    assert b"".join(d for d, _ in t.sock.sent) == b"".join(chunks)
    assert t._wbuf is None
    # held no further than the limit: at most one send per limit's worth, + 2
    assert len(t.sock.sent) <= sum(map(len, chunks)) // transport._CORK_LIMIT + 2
    t.write(b"after")
    assert t.sock.sent[-1][0] == b"after"       # uncorked: straight out


def test_a_read_that_waits_sends_what_is_corked_before_setting_a_timeout():
    t = corkable()
    conn = transport._Connection.__new__(transport._Connection)
    conn.transport = t

    class Waited(Exception):
        pass

    def recv(*_):
        raise Waited

    t._quick_recv = recv
    t.cork()
    t.write(b"queue.declare")
    with pytest.raises(Waited):
        conn.blocking_read(timeout=0)
    # sent before the read, under the socket's own (blocking) timeout
    assert t.sock.sent == [(b"queue.declare", None)]


# --- basic.deliver read as py-amqp reads it ----------------------------------

shortstrs = st.text(chars, max_size=80).filter(
    lambda t: len(t.encode("utf-8", "surrogatepass")) <= 255)


@given(shortstrs, st.integers(0, 2**64 - 1), st.integers(0, 255), shortstrs, shortstrs)
def test_deliver_arguments_read_as_py_amqp_reads_them(tag, delivery_tag, bits,
                                                      exchange, key):
    # any octet for the bits: only the lowest is "redelivered"
    payload = b"".join((struct.pack(">HH", 60, 60), transport._shortstr(tag),
                        struct.pack(">QB", delivery_tag, bits),
                        transport._shortstr(exchange), transport._shortstr(key)))
    expected, _ = loads("sLbss", payload, 4)
    assert list(transport._deliver_args(payload)) == expected


def test_a_truncated_deliver_is_refused_as_py_amqp_refuses_it():
    payload = b"".join((struct.pack(">HH", 60, 60), transport._shortstr("ctag"),
                        struct.pack(">QB", 7, 1), transport._shortstr("ex"),
                        transport._shortstr("key")))
    for cut in range(4, len(payload)):
        short = payload[:cut]
        _, expected = outcome(functools.partial(loads, "sLbss", short, 4))
        ch = transport.Channel.__new__(transport.Channel)
        ch.is_closing, ch._pending, ch.auto_decode = False, {}, False
        ch._callbacks = {transport._DELIVER: lambda *args: args}
        _, got = outcome(functools.partial(ch.dispatch_method, transport._DELIVER,
                                           short, object()))
        if expected is None:        # py-amqp reads a cut string short
            continue
        assert got is expected, cut


def test_a_send_that_times_out_part_way_ends_the_stream():
    # A peer that stops reading (a broker blocking publishers; TLS sockets
    # keep the connect timeout): what was written may stop inside a frame,
    # so nothing more may follow on that stream.
    import socket
    ours, peer = socket.socketpair()
    try:
        t = transport.BufferedTCPTransport.__new__(transport.BufferedTCPTransport)
        t.sock, t.connected, t._write = ours, True, ours.sendall
        ours.settimeout(0.2)
        t.cork()
        with pytest.raises(socket.timeout):
            for _ in range(200):
                t.write(b"\x01" * 65536)
        assert not t.connected
        t.uncork()                  # what was held went with the failed send
        with pytest.raises(OSError):
            t.write(b"more")        # the stream is shut
    finally:
        ours.close()
        peer.close()


# --- sender-written strings in methods from the broker: never a raise --------

def _arg(code):
    return {"s": shortstrs | st.binary(max_size=255), "b": st.booleans(),
            "o": st.integers(0, 255), "B": st.integers(0, 2**16 - 1),
            "l": st.integers(0, 2**32 - 1), "L": st.integers(0, 2**64 - 1)}[code]


def _raw(code, value):
    if code == "s":
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
        return bytes((len(raw),)) + raw
    return None


@st.composite
def sender_text_methods(draw):
    sig = draw(st.sampled_from(sorted(transport._SENDER_TEXT)))
    fmt = transport._SENDER_TEXT[sig]
    values = [draw(_arg(code)) for code in fmt]
    # py-amqp's writer, with each string's bytes put in as drawn
    parts, bits = [], []
    for code, value in zip(fmt, values, strict=True):
        if code == "b":
            bits.append(value)
            continue
        if bits:
            parts.append(dumps("b" * len(bits), bits))
            bits = []
        parts.append(_raw(code, value) or dumps(code, [value]))
    if bits:
        parts.append(dumps("b" * len(bits), bits))
    return sig, fmt, values, struct.pack(">HH", *sig) + b"".join(parts)


@settings(max_examples=400)
@given(sender_text_methods())
def test_sender_text_never_raises_and_is_py_amqps_where_it_is_utf8(method):
    sig, fmt, values, payload = method
    args, escaped = transport.total_method_args(fmt, payload)
    try:
        expected, _ = loads(fmt, payload, 4)
    except UnicodeDecodeError:
        expected = None
    if expected is not None:
        assert args == expected and escaped == []
    else:
        assert escaped
        for i in escaped:
            assert isinstance(values[i], bytes)
            assert len(args[i].encode()) <= 255 and "\\x" in args[i]
    # what a listener is then given can always be written again
    dumps(fmt, args)


def test_a_delivery_with_a_key_that_is_not_utf8_reaches_its_listener_marked():
    payload = b"".join((struct.pack(">HH", 60, 60), transport._shortstr("ctag"),
                        struct.pack(">QB", 7, 0), transport._shortstr("ex"),
                        b"\x0binstance.\xff\xfe"))
    ch = transport.Channel.__new__(transport.Channel)
    ch.is_closing, ch._pending, ch.auto_decode = False, {}, False
    got = []
    ch._callbacks = {transport._DELIVER: lambda *args: got.append(args)}
    content = transport._TotalMessage(b"{}", message_id="m-1")
    ch.dispatch_method(transport._DELIVER, payload, content)
    [(tag, delivery_tag, redelivered, exchange, key, message)] = got
    assert (tag, delivery_tag, redelivered, exchange) == ("ctag", 7, False, "ex")
    assert key == "instance.\\xff\\xfe"
    assert message.properties["message_id"] == "m-1"
    assert "routing key is not UTF-8" in message.properties[transport.UNDECODABLE]
