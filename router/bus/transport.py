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
import ssl
from collections import defaultdict
from struct import unpack_from

import amqp.basic_message
import amqp.method_framing
import amqp.transport
from kombu.transport import TRANSPORT_ALIASES, pyamqp

from router.bus.inbound import UNDECODABLE

SCHEME = "evamqp"

_CHUNK = 65536


class BufferedTCPTransport(amqp.transport.TCPTransport):
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


class BrokerCertificateRefused(ssl.SSLCertVerificationError):
    """The broker's certificate did not verify: wrong CA, expired, wrong name.

    Still an OSError, so services keep retrying (an operator may fix the CA
    file or the DNS name); the message says which broker and why.
    """

    def __str__(self):
        # SSLError's own __str__ shows the args tuple
        return str(self.args[0]) if self.args else super().__str__()


def tls_context(ca_certs=None, certfile=None, keyfile=None, **_ignored):
    """The client TLS context: TLS 1.2+, CA-verified, host name checked.

    ca_certs absent: the system's trust store. certfile/keyfile: the client
    certificate (x509 identity with the EXTERNAL mechanism). Options py-amqp
    would accept but that could only weaken this (cert_reqs, ssl_version)
    are ignored on purpose.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=ca_certs)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


class VerifiedSSLTransport(amqp.transport.SSLTransport):
    """py-amqp's TLS transport with evrouter's context and host name check.

    The name checked is the host this transport connects to, not one fixed
    in the options: kombu fills a missing server_hostname once, with the
    first host, and a failover to the next node would then check the wrong
    name.
    """

    def _wrap_socket(self, sock, context=None, **sslopts):
        return tls_context(**sslopts).wrap_socket(
            sock, server_hostname=self.host, do_handshake_on_connect=False)

    def _setup_transport(self):
        try:
            super()._setup_transport()
        except ssl.SSLCertVerificationError as exc:
            raise BrokerCertificateRefused(
                f"TLS: the certificate of broker {self.host}:{self.port} was "
                f"refused: {exc.verify_message or exc.reason} (check [bus] "
                f"ssl_ca_file and that the certificate names this host)"
            ) from exc


class BufferedSSLTransport(VerifiedSSLTransport):
    """TLS with BufferedTCPTransport's reads: one SSL read serves many frames.

    An SSL read returns at most one TLS record (16 KiB); a read that would
    block raises SSLWantReadError, whose errno is ENOENT (hence py-amqp's
    list of errnos to retry).
    """

    _buf = b""
    _pos = 0
    _read_buffer = BufferedTCPTransport._read_buffer

    def _read(self, n, initial=False,
              _errnos=(errno.ENOENT, errno.EAGAIN, errno.EINTR)):
        return BufferedTCPTransport._read(self, n, initial, _errnos)


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


class _Channel(pyamqp.Channel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Bodies stay the bytes that were sent. py-amqp would otherwise
        # decode them by the sender's content_encoding label, or silently
        # not (an unknown codec), so a consumer could get either type.
        self.auto_decode = False


class _Connection(pyamqp.Connection):
    Channel = _Channel
    SSLTransport = BufferedSSLTransport

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("frame_handler", total_frame_handler)
        super().__init__(*args, **kwargs)

    def Transport(self, host, connect_timeout, ssl=False, read_timeout=None,
                  write_timeout=None, socket_settings=None, **kwargs):
        if ssl:
            return self.SSLTransport(host, connect_timeout=connect_timeout,
                                     ssl=ssl, read_timeout=read_timeout,
                                     write_timeout=write_timeout,
                                     socket_settings=socket_settings, **kwargs)
        return BufferedTCPTransport(host, connect_timeout=connect_timeout,
                                    read_timeout=read_timeout,
                                    write_timeout=write_timeout,
                                    socket_settings=socket_settings, **kwargs)


class Transport(pyamqp.Transport):
    Connection = _Connection


# kombu picks a transport by URL scheme, also when it fails over to the next
# host of a list; a scheme of our own keeps this transport across failover.
TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
