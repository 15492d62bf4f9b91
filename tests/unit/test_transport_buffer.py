"""The buffered transport reads a frame already in its buffer without the socket."""

import struct

import pytest
from amqp.exceptions import UnexpectedFrame
from hypothesis import given
from hypothesis import strategies as st

from router.bus import transport


def frame(payload, kind=1, channel=1):
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def buffered(data, pos=0):
    t = transport.BufferedTCPTransport.__new__(transport.BufferedTCPTransport)
    t._buf, t._pos = data, pos
    return t


def test_only_a_whole_frame_counts_as_buffered():
    whole = frame(b"x" * 20)
    assert transport._buffered_frame(buffered(whole)) == (1, 1, b"x" * 20)
    for cut in range(len(whole)):
        t = buffered(whole[:cut])
        assert transport._buffered_frame(t) is None, cut
        assert t._pos == 0                          # nothing taken
    # behind bytes already read, and an empty payload
    assert transport._buffered_frame(buffered(b"junk" + whole, pos=4)) == (1, 1, b"x" * 20)
    assert transport._buffered_frame(buffered(b"junk" + whole[:-1], pos=4)) is None
    assert transport._buffered_frame(buffered(frame(b""))) == (1, 1, b"")


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


# --- whole frames read from the buffer (transport._buffered_frame) ----------

class Chunks:
    """A socket that hands its stream over in the given pieces."""

    def __init__(self, data, sizes):
        self.pieces = []
        for size in sizes:
            if data:
                self.pieces.append(data[:size])
                data = data[size:]
        if data:
            self.pieces.append(data)

    def recv(self, n):
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


frames = st.lists(st.tuples(st.sampled_from([1, 2, 3, 8]), st.integers(0, 65535),
                            st.binary(max_size=3000)), min_size=1, max_size=30)


@given(frames, st.lists(st.integers(1, 5000), max_size=40))
def test_frames_come_out_as_sent_however_the_stream_is_cut(sent, sizes):
    data = b"".join(frame(payload, kind, channel) for kind, channel, payload in sent)
    t = buffered(b"")
    t._quick_recv = Chunks(data, sizes).recv
    got = [t.read_frame() for _ in sent]
    assert got == [(kind, channel, payload) for kind, channel, payload in sent]
    assert not t.has_unread()


@given(st.binary(max_size=100), st.integers(0, 255).filter(lambda b: b != 0xCE))
def test_a_frame_with_a_bad_end_is_refused_as_py_amqp_refuses_it(payload, end):
    bad = frame(payload)[:-1] + bytes((end,))
    t = buffered(bad + frame(b"next"))
    with pytest.raises(UnexpectedFrame):
        t.read_frame()
