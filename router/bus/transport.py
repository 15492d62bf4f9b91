"""A kombu transport for RabbitMQ whose socket reads are buffered.

py-amqp reads each frame with separate recv() calls for exactly the bytes it
needs (header, payload, end octet): about nine system calls per message.
This transport reads up to 64 KiB at a time and serves frames from that
buffer, so one recv() serves many messages under load. Everything else is
py-amqp's; TLS connections keep py-amqp's own transport.
"""

import errno

import amqp.transport
from kombu.transport import TRANSPORT_ALIASES, pyamqp

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


class _Connection(pyamqp.Connection):
    def Transport(self, host, connect_timeout, ssl=False, read_timeout=None,
                  write_timeout=None, socket_settings=None, **kwargs):
        if ssl:
            return super().Transport(host, connect_timeout, ssl=ssl,
                                     read_timeout=read_timeout,
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
