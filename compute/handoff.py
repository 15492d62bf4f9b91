"""Handing values from native threads to the dispatcher, with or without eventlet.

libvirt calls back on a native OS thread. Under eventlet the dispatcher is
a green thread, and a native thread must not touch anything green (locks,
queues, logging handlers): it would switch hubs or deadlock. So the native
side only appends to a deque (no lock involved) and writes a byte to a
self-pipe through the unpatched ``os.write``; the dispatcher waits on the
pipe with poll, or with ``select.select`` where eventlet's monkey-patching
has made it green (router.bus.connection.wait_fds).
With plain threads the same code is an ordinary thread-safe queue.

Nothing here monkey-patches: the process that imports it decides.
"""

import collections
import importlib
import itertools
import os
import sys

from router.bus import connection as bus_connection


def _original(name):
    """The module as it was before eventlet patched it (if it did)."""
    if "eventlet" in sys.modules:
        from eventlet import patcher
        return patcher.original(name)
    return importlib.import_module(name)


def green():
    """Whether eventlet has monkey-patched threads in this process."""
    if "eventlet" not in sys.modules:
        return False
    from eventlet import patcher
    return patcher.is_monkey_patched("thread")


def native_thread(target, name):
    """A real OS thread, even in a monkey-patched process."""
    return _original("threading").Thread(target=target, name=name,
                                         daemon=True)


def native_event():
    return _original("threading").Event()


def blocking_call(fn, *args):
    """Call a blocking C function without stalling the eventlet hub."""
    if green():
        from eventlet import tpool
        return tpool.execute(fn, *args)
    return fn(*args)


class Handoff:
    """An ordered hand-over of values from any thread to one reader.

    ``put`` never blocks, takes no lock and never logs, so it is safe from
    libvirt's event thread and from signal handlers.
    """

    def __init__(self):
        self._items = collections.deque()
        self._positions = itertools.count(1)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        native_os = _original("os")
        self._write, self._read = native_os.write, native_os.read

    def next_position(self):
        """An increasing number to order items by (any thread)."""
        return next(self._positions)

    def put(self, item):
        self._items.append(item)
        fd = self._write_fd
        if fd is None:
            return      # closed: nobody reads any more
        try:
            self._write(fd, b"\0")
        except BlockingIOError:
            pass    # the pipe is full: the reader is already due to wake

    def take(self, timeout):
        """Everything handed over so far, waiting up to `timeout` for some."""
        if not self._items:
            bus_connection.wait_fds((self._read_fd,), timeout)
        try:
            self._read(self._read_fd, 65536)
        except BlockingIOError:
            pass
        items = []
        while self._items:
            items.append(self._items.popleft())
        return items

    def close(self):
        write_fd, self._write_fd = self._write_fd, None
        os.close(write_fd)
        os.close(self._read_fd)
