"""The buffered transport reads a frame already in its buffer without the socket."""

import struct

from router.bus import transport


def frame(payload, kind=1, channel=1):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def buffered(data, pos=0):
    t = transport.BufferedTCPTransport.__new__(transport.BufferedTCPTransport)
    t._buf, t._pos = data, pos
    return t


def test_only_a_whole_frame_counts_as_buffered():
    whole = frame(b"x" * 20)
    assert transport._frame_buffered(buffered(whole))
    for cut in range(len(whole)):
        assert not transport._frame_buffered(buffered(whole[:cut])), cut
    # behind bytes already read, and an empty payload
    assert transport._frame_buffered(buffered(b"junk" + whole, pos=4))
    assert not transport._frame_buffered(buffered(b"junk" + whole[:-1], pos=4))
    assert transport._frame_buffered(buffered(frame(b"")))


class NoSocket:
    def __getattr__(self, name):
        raise AssertionError(f"the socket was used: {name}")


def test_a_buffered_frame_is_read_without_setting_the_socket_timeout():
    t = buffered(frame(b"abc") + frame(b"de")[:5])
    t.sock = NoSocket()
    conn = transport._Connection.__new__(transport._Connection)
    conn.transport = t
    seen = []
    conn.on_inbound_frame = seen.append
    conn.blocking_read(timeout=0)
    assert seen == [(1, 1, b"abc")]
    assert t._buf[t._pos:] == frame(b"de")[:5]     # the partial frame waits
