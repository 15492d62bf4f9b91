"""A kombu transport for RabbitMQ whose socket reads are buffered.

py-amqp reads each frame with separate recv() calls for exactly the bytes it
needs (header, payload, end octet): about nine system calls per message.
This transport reads up to 64 KiB at a time and serves frames from that
buffer, so one recv() serves many messages under load. Everything else is
py-amqp's.

TLS connections (amqps://, or [bus] ssl) go through this transport too, so
they keep the total content-header decoding and the undecoded bodies every
consumer relies on. Their TLS is evrouter's, not py-amqp's defaults (which
check no host name unless told which): TLS 1.2 or later, the broker's
certificate verified against the configured CA and its name against the
host being connected to, on every host of a failover list.
"""

import errno
import socket
import ssl
from collections import defaultdict
from struct import error as struct_error
from struct import pack, unpack_from

import amqp.basic_message
import amqp.channel
import amqp.method_framing
import amqp.transport
from amqp import spec
from amqp.exceptions import (
    ChannelError,
    ConsumerCancelled,
    RecoverableConnectionError,
    error_for_code,
)
from amqp.serialization import dumps
from kombu.transport import TRANSPORT_ALIASES, pyamqp

from router.bus.inbound import UNDECODABLE
from router.bus.tls import (  # noqa: F401 (BrokerCertificateRefused is imported from here)
    BrokerCertificateRefused,
    BrokerTLSError,
    explain,
    option_of,
    tls_context,
)

SCHEME = "evamqp"

_CHUNK = 65536
_CORK_LIMIT = 262144


def _buffered_frame(transport):
    """The next frame, when all of it is in the read buffer and well ended:
    one slice instead of py-amqp's three reads (header, payload, end
    octet). None otherwise, for py-amqp's read_frame (which also says what
    is wrong with a bad frame end)."""
    buf, pos = transport._buf, transport._pos
    if len(buf) - pos < 8:
        return None
    frame_type, channel, size = unpack_from(">BHI", buf, pos)
    end = pos + 7 + size
    if len(buf) <= end or buf[end] != 206:
        return None
    transport._pos = end + 1
    return frame_type, channel, buf[pos + 7:end]


class Corkable:
    """Writes gathered while corked and sent in one system call.

    py-amqp sends every method on its own (one sendall per publish). A
    connection's owner that publishes a batch corks its transport around it
    (connection.corked): the frames are kept, in order, and sent together
    when it uncorks, when they pass _CORK_LIMIT, or before any read that
    has to wait on the socket (_Connection.blocking_read: a synchronous
    call made meanwhile must not wait for a reply to a request still held
    here).
    """

    _wbuf = None            # a list while corked
    _wlen = 0

    def cork(self):
        if self._wbuf is None:
            self._wbuf, self._wlen = [], 0

    def uncork(self):
        try:
            self.flush()
        finally:
            self._wbuf = None

    def flush(self):
        wbuf = self._wbuf
        if wbuf:
            self._wbuf, self._wlen = [], 0
            self._send(b"".join(wbuf))

    def write(self, s):
        wbuf = self._wbuf
        if wbuf is None:
            return self._send(s)
        wbuf.append(bytes(s))   # py-amqp reuses the buffer s views
        self._wlen += len(s)
        if self._wlen >= _CORK_LIMIT:
            self.flush()
        return None

    def _send(self, data):
        try:
            return super().write(data)
        except socket.timeout:
            # Part of it may have gone (a TLS socket keeps the connect
            # timeout; a broker blocking publishers stops reading): the
            # stream is cut inside a frame, and nothing more may follow on
            # it. py-amqp would keep the transport as connected.
            self.connected = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            raise


class BufferedTCPTransport(Corkable, amqp.transport.TCPTransport):
    # py-amqp keeps unread bytes in _read_buffer and pushes a partial frame
    # back into it on a timeout; here the unread bytes are _buf[_pos:], so a
    # read is a slice instead of copying the rest of the buffer every time.
    _buf = b""
    _pos = 0

    @property
    def _read_buffer(self):
        return self._buf[self._pos:]

    @_read_buffer.setter
    def _read_buffer(self, value):
        self._buf = value
        self._pos = 0

    def has_unread(self):
        """Bytes read from the socket and not yet handled: a wait on the
        socket alone would not see them (connection.wait_readable)."""
        return len(self._buf) > self._pos

    def read_frame(self, unpack=None):
        return _buffered_frame(self) or super().read_frame()

    def _read(self, n, initial=False, _errnos=(errno.EAGAIN, errno.EINTR)):
        buf, pos = self._buf, self._pos
        end = pos + n
        if len(buf) >= end:
            self._pos = end
            return buf[pos:end]
        rbuf = buf[pos:]
        recv = self._quick_recv
        try:
            while len(rbuf) < n:
                try:
                    s = recv(max(n - len(rbuf), _CHUNK))
                except OSError as exc:
                    if exc.errno in _errnos:
                        if initial and self.raise_on_initial_eintr:
                            raise TimeoutError() from None
                        continue
                    raise
                if not s:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += s
        except BaseException:
            self._buf, self._pos = rbuf, 0
            raise
        self._buf, self._pos = rbuf, n
        return rbuf[:n]


class VerifiedSSLTransport(amqp.transport.SSLTransport):
    """py-amqp's TLS transport with evrouter's context and host name check.

    The name checked is the host this transport connects to, not one fixed
    in the options: kombu fills a missing server_hostname once, with the
    first host, and a failover to the next node would then check the wrong
    name. It is the name the URL gave (server_name), not kombu's rewrite of
    localhost to 127.0.0.1: a certificate names localhost.
    """

    server_name = None

    @property
    def _name(self):
        return self.server_name or self.host

    def _wrap_socket(self, sock, context=None, **sslopts):
        return tls_context(**sslopts).wrap_socket(
            sock, server_hostname=self._name, do_handshake_on_connect=False)

    def _setup_transport(self):
        try:
            super()._setup_transport()
        except ssl.SSLCertVerificationError as exc:
            raise BrokerCertificateRefused(
                f"TLS: the certificate of broker {self._name}:{self.port} was "
                f"refused: {exc.verify_message or exc.reason} (check "
                f"{option_of(self.sslopts, 'ssl_ca_file')} and that the "
                f"certificate names this host)"
            ) from exc
        except BrokerTLSError:
            raise
        except ssl.SSLError as exc:
            raise explain(exc, self._name, self.port, self.sslopts) or exc from exc


class BufferedSSLTransport(Corkable, VerifiedSSLTransport):
    """TLS with BufferedTCPTransport's reads: one SSL read serves many frames.

    An SSL read returns at most one TLS record (16 KiB); a read that would
    block raises SSLWantReadError, whose errno is ENOENT (hence py-amqp's
    list of errnos to retry).
    """

    _buf = b""
    _pos = 0
    _read_buffer = BufferedTCPTransport._read_buffer

    def has_unread(self):
        # Also TLS records decrypted by the SSL layer and not yet read.
        return len(self._buf) > self._pos or bool(self.sock.pending())

    def read_frame(self, unpack=None):
        return _buffered_frame(self) or super().read_frame()

    def _read(self, n, initial=False,
              _errnos=(errno.ENOENT, errno.EAGAIN, errno.EINTR)):
        return BufferedTCPTransport._read(self, n, initial, _errnos)


_METHOD = 1
_HEADER = 2
_BODY = 3
_FRAME_END = b"\xce"
_BASIC_PUBLISH = pack(">HHH", 60, 40, 0)   # class, method, reserved short


def _shortstr(value):
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    if len(raw) > 255:
        raise ValueError("a short string over 255 bytes")
    return bytes((len(raw),)) + raw


def _octet(value):
    return bytes((value,))


def _table(headers):
    """A field table of strings (what the router's headers are); any other
    table as py-amqp writes it."""
    parts = []
    for key, value in headers.items():
        if type(key) is not str or type(value) is not str:
            return dumps("F", (headers,))
        key = key.encode("utf-8", "surrogatepass")
        if len(key) > 255:
            return dumps("F", (headers,))
        value = value.encode("utf-8", "surrogatepass")
        parts += (bytes((len(key),)), key, b"S", pack(">I", len(value)), value)
    table = b"".join(parts)
    return pack(">I", len(table)) + table


# The basic properties publish() sets, in the wire's order: py-amqp's name,
# the flag bit, the writer.
_PROPERTIES = (("content_type", 0x8000, _shortstr),
               ("application_headers", 0x2000, _table),
               ("delivery_mode", 0x1000, _octet),
               ("message_id", 0x0080, _shortstr),
               ("user_id", 0x0010, _shortstr))


def publish(channel, exchange, routing_key, body, *, mandatory=False,
            content_type=None, headers=None, delivery_mode=None,
            message_id=None, user_id=None):
    """basic.publish on `channel`, its three frames built here and written
    at once (one system call, or none while corked).

    py-amqp builds an amqp.Message, serializes every property it knows by
    looking each one up, and formats each frame through its generic
    argument writer: about a quarter of the router's CPU per event. The
    frames are the same bytes (tests/unit/test_publish_frames.py holds
    them to py-amqp's); a body larger than one frame, or anything else
    this does not build, goes through py-amqp.
    """
    conn = channel.connection
    if conn is None:
        raise RecoverableConnectionError("basic_publish: connection closed")
    if isinstance(body, str):
        body = body.encode()
    values = (content_type, headers, delivery_mode, message_id, user_id)
    try:
        method = b"".join((_BASIC_PUBLISH, _shortstr(exchange or ""),
                           _shortstr(routing_key or ""),
                           b"\x01" if mandatory else b"\x00"))
        flags, props = 0, []
        for (_, bit, write), value in zip(_PROPERTIES, values, strict=True):
            if value is not None:
                flags |= bit
                props.append(write(value))
    except ValueError:
        big = True
    else:
        big = len(body) > conn.frame_max - 8
    if big:
        properties = {name: value for (name, _, _), value in zip(_PROPERTIES, values, strict=True)
                      if value is not None}
        channel.basic_publish(amqp.basic_message.Message(body, **properties),
                              exchange=exchange, routing_key=routing_key,
                              mandatory=mandatory)
        return
    header = pack(">HHQH", 60, 0, len(body), flags) + b"".join(props)
    cid = channel.channel_id
    frames = [pack(">BHI", _METHOD, cid, len(method)), method, _FRAME_END,
              pack(">BHI", _HEADER, cid, len(header)), header, _FRAME_END]
    if body:                    # an empty body has no body frame
        frames += (pack(">BHI", _BODY, cid, len(body)), body, _FRAME_END)
    conn.transport.write(b"".join(frames))
    conn.bytes_sent += 1


_DELIVER = spec.Basic.Deliver


def _deliver_args(payload):
    """basic.deliver's arguments (after class and method ids), as py-amqp's
    loads("sLbss") reads them: consumer tag, delivery tag, redelivered,
    exchange, routing key."""
    n = payload[4]
    consumer_tag = payload[5:5 + n].decode("utf-8", "surrogatepass")
    at = 5 + n
    delivery_tag, bits = unpack_from(">QB", payload, at)
    at += 9
    n = payload[at]
    exchange = payload[at + 1:at + 1 + n].decode("utf-8", "surrogatepass")
    at += 1 + n
    n = payload[at]
    routing_key = payload[at + 1:at + 1 + n].decode("utf-8", "surrogatepass")
    return consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key


# Methods from the broker whose strings a sender wrote: a routing key
# (deliver, get-ok, return), a reply text quoting one (channel.close).
# py-amqp decodes them as UTF-8 in the frame reader, and a key that is not
# raised there: the connection failed before any decode of evrouter's saw
# the message, and came back to it on every delivery, on every consumer.
_SENDER_TEXT = {sig: amqp.channel.Channel._METHODS[sig].args for sig in (
    spec.Basic.Deliver, spec.Basic.GetOk, spec.Basic.Return,
    spec.Channel.Close)}
_FIXED = {"o": (">B", 1), "B": (">H", 2), "l": (">I", 4), "L": (">Q", 8)}


def total_method_args(fmt, payload, offset=4):
    """py-amqp's loads(fmt, payload, offset) for the formats of
    _SENDER_TEXT, except that a short string that is not UTF-8 never
    raises: its bytes are written as backslash escapes, cut to 255 bytes.
    Returns (args, the positions of the strings so written)."""
    args, escaped = [], []
    bitcount = bits = 0
    for code in fmt:
        if code == "b":
            if not bitcount:
                bits, bitcount = payload[offset], 8
                offset += 1
            args.append(bits & 1 == 1)
            bits >>= 1
            bitcount -= 1
            continue
        bitcount = bits = 0
        if code == "s":
            n = payload[offset]
            raw = payload[offset + 1:offset + 1 + n]
            offset += 1 + n
            try:
                args.append(raw.decode("utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                text = raw.decode("utf-8", "backslashreplace")
                args.append(text.encode()[:255].decode("utf-8", "ignore"))
                escaped.append(len(args) - 1)
        else:
            form, size = _FIXED[code]
            args.append(unpack_from(form, payload, offset)[0])
            offset += size
    return args, escaped


class _TotalMessage(amqp.basic_message.Message):
    """A message whose content header always decodes.

    py-amqp raises from inside the frame reader on a property it cannot
    decode (a short string that is not UTF-8, a timestamp header out of
    range...), which kills the connection and brings the same message back
    to the next consumer forever. Here such a message arrives with only
    UNDECODABLE in its properties, and the consumer dead-letters it.
    """

    def _load_properties(self, class_id, buf, offset):
        try:
            return super()._load_properties(class_id, buf, offset)
        except Exception as exc:
            self.properties = {UNDECODABLE: f"{type(exc).__name__}: {exc}"[:200]}
            return offset


def total_frame_handler(connection, callback, unpack_from=unpack_from,
                        content_methods=amqp.method_framing._CONTENT_METHODS):
    """py-amqp's frame reader, building _TotalMessage for content frames."""
    expected_types = defaultdict(lambda: 1)
    partial_messages = {}

    def on_frame(frame):
        frame_type, channel, buf = frame
        connection.bytes_recv += 1
        if frame_type not in (expected_types[channel], 8):
            raise amqp.method_framing.UnexpectedFrame(
                f"Received frame {frame_type} while expecting type: "
                f"{expected_types[channel]}")
        if frame_type == 1:
            method_sig = unpack_from(">HH", buf, 0)
            if method_sig in content_methods:
                partial_messages[channel] = _TotalMessage(
                    frame_method=method_sig, frame_args=buf)
                expected_types[channel] = 2
                return False
            callback(channel, method_sig, buf, None)
        elif frame_type == 2:
            msg = partial_messages[channel]
            msg.inbound_header(buf)
            if not msg.ready:
                expected_types[channel] = 3
                return False
            expected_types[channel] = 1
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 3:
            msg = partial_messages[channel]
            msg.inbound_body(buf)
            if not msg.ready:
                return False
            expected_types[channel] = 1
            partial_messages.pop(channel, None)
            callback(channel, msg.frame_method, msg.frame_args, msg)
        elif frame_type == 8:
            return False
        return True

    return on_frame


class Message(pyamqp.Message):
    """kombu's message, as it arrived.

    kombu's own decompresses the body by its `compression` header: a codec
    named by whoever published. An unknown one, or a body that is not what
    it names, raised out of the consumer's callback, before evrouter's
    decode (router.bus.inbound, which dead-letters it) ever saw the message:
    the session failed, the message came back, and so on, on every router,
    while every event behind it waited. Here the body is the bytes that
    were sent (as auto_decode=False keeps them) and the decode refuses
    the header. Fields are set directly: no other work to do."""

    def __init__(self, msg, channel=None, **kwargs):
        props = msg.properties
        self.errors = []
        self.channel = channel
        self.delivery_tag = msg.delivery_tag
        self.content_type = props.get("content_type")
        self.content_encoding = props.get("content_encoding")
        self.delivery_info = msg.delivery_info or {}
        self.headers = props.get("application_headers") or {}
        self.properties = props or {}
        self._decoded_cache = None
        self._state = "RECEIVED"
        self.accept = kwargs.get("accept")
        self.body = msg.body


class Channel(pyamqp.Channel):
    Message = Message

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Bodies stay the bytes that were sent. py-amqp would otherwise
        # decode them by the sender's content_encoding label, or silently
        # not (an unknown codec), so a consumer could get either type.
        self.auto_decode = False

    def dispatch_method(self, method_sig, payload, content):
        # basic.deliver, the one method per message, decoded here: py-amqp's
        # generic argument reader costs more than the rest of the dispatch.
        if (method_sig == _DELIVER and content is not None and not self.is_closing
                and _DELIVER not in self._pending):
            listener = self._callbacks.get(_DELIVER)
            if listener is not None:
                try:
                    args = _deliver_args(payload)
                except (IndexError, struct_error):
                    pass    # py-amqp's reader says what is wrong, its way
                except UnicodeDecodeError:
                    payload = self._sender_text(method_sig, payload, content)
                else:
                    return listener(*args, content)
        elif method_sig in _SENDER_TEXT:
            payload = self._sender_text(method_sig, payload, content)
        return super().dispatch_method(method_sig, payload, content)

    @staticmethod
    def _sender_text(method_sig, payload, content):
        """`payload`, or the same arguments written again with the strings
        that are not UTF-8 escaped (total_method_args); a delivered message
        carrying one is marked undecodable, so its consumer dead-letters it
        (malformed) instead of anything trusting its routing key."""
        fmt = _SENDER_TEXT[method_sig]
        try:
            args, escaped = total_method_args(fmt, payload)
        except (IndexError, struct_error):
            return payload      # py-amqp's reader says what is wrong
        if not escaped:
            return payload
        if content is not None and method_sig != spec.Basic.Return:
            names = {spec.Basic.Deliver: ("consumer tag", None, None, "exchange",
                                          "routing key"),
                     spec.Basic.GetOk: (None, None, "exchange", "routing key",
                                        None)}[method_sig]
            what = " and ".join(names[i] or "argument" for i in escaped)
            props = content.properties if type(content.properties) is dict else {}
            props[UNDECODABLE] = (f"the {what} is not UTF-8: "
                                  f"{args[escaped[-1]][:120]}")
            content.properties = props
        return payload[:4] + dumps(fmt, args)

    # A channel's owner that handles a broker-side close itself sets this to
    # a callable(channel, exc). A soft error (404, 403, 406...) then closes
    # this channel only: it is told to the owner, not raised out of whatever
    # drain_events happened to read the frame (py-amqp raises it there,
    # from any channel's wait, and reopens the channel in place with its
    # consumers and confirm mode gone). Unset, py-amqp's behaviour stands.
    on_broker_close = None

    def _on_close(self, reply_code, reply_text, class_id, method_id):
        handler = self.on_broker_close
        if (handler is None or self._pending or self.is_closing
                or self.connection is None or self.connection.is_closing):
            # this channel's own synchronous call is waiting: it gets the
            # error, as py-amqp gives it
            return super()._on_close(reply_code, reply_text, class_id,
                                     method_id)
        self.send_method(spec.Channel.CloseOk)
        self.collect()
        handler(self, error_for_code(reply_code, reply_text,
                                     (class_id, method_id), ChannelError))

    def _on_basic_cancel(self, consumer_tag):
        # The broker cancels a consumer whose queue was deleted; py-amqp
        # raises that from drain_events as a connection error. The owner
        # who handles closes treats it as one: its channel consumes no more.
        handler = self.on_broker_close
        if handler is None or consumer_tag in self.cancel_callbacks:
            return super()._on_basic_cancel(consumer_tag)
        self._remove_tag(consumer_tag)
        handler(self, ConsumerCancelled(
            f"the broker cancelled consumer {consumer_tag} (queue deleted?)",
            spec.Basic.Cancel))


class _Connection(pyamqp.Connection):
    Channel = Channel
    SSLTransport = BufferedSSLTransport
    _tls_transport = None

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("frame_handler", total_frame_handler)
        super().__init__(*args, **kwargs)

    def blocking_read(self, timeout=None):
        # py-amqp sets the socket's timeout around every frame it reads and
        # puts it back after (drain(): a drain_events(timeout=0) per message,
        # three frames each: six settimeout system calls per message). A
        # frame already in the buffer is read without touching the socket.
        transport = self.transport
        frame = _buffered_frame(transport)
        if frame is not None:
            return self.on_inbound_frame(frame)
        if transport._wbuf:
            # before the socket's timeout is set for the read: a send
            # under a zero timeout would stop part way
            transport.flush()
        return super().blocking_read(timeout)

    def connect(self, callback=None):
        try:
            return super().connect(callback)
        except BrokerTLSError:
            raise
        except ssl.SSLError as exc:
            # With TLS 1.3 the broker judges our certificate after the
            # handshake: its refusal is an alert on the first read.
            transport = self._tls_transport
            if transport is None:
                raise
            raise explain(exc, transport._name, transport.port,
                          transport.sslopts) or exc from exc

    def Transport(self, host, connect_timeout, ssl=False, read_timeout=None,
                  write_timeout=None, socket_settings=None, **kwargs):
        if ssl:
            transport = self.SSLTransport(host, connect_timeout=connect_timeout,
                                          ssl=ssl, read_timeout=read_timeout,
                                          write_timeout=write_timeout,
                                          socket_settings=socket_settings, **kwargs)
            kombu_transport = getattr(getattr(self, "client", None), "transport", None)
            transport.server_name = getattr(kombu_transport, "asked_hostname", None)
            self._tls_transport = transport     # for connect()'s messages
            return transport
        return BufferedTCPTransport(host, connect_timeout=connect_timeout,
                                    read_timeout=read_timeout,
                                    write_timeout=write_timeout,
                                    socket_settings=socket_settings, **kwargs)


class Transport(pyamqp.Transport):
    Connection = _Connection

    # The host name of the URL being connected to, kept before kombu's
    # establish_connection replaces "localhost" with "127.0.0.1" (to avoid
    # IPv6): TLS checks the broker's certificate against this name.
    asked_hostname = None

    def establish_connection(self):
        self.asked_hostname = asked = self.client.hostname
        try:
            return super().establish_connection()
        finally:
            # and logs keep saying what the operator wrote
            self.client.hostname = asked


# kombu picks a transport by URL scheme, also when it fails over to the next
# host of a list; a scheme of our own keeps this transport across failover.
TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
