"""A process with more than FD_SETSIZE (1,024) descriptors open, as
nova-compute or an agent can be: what is opened inside `past_fd_setsize()`
gets a descriptor number above 1,024."""

import contextlib
import gc
import os
import resource

import pytest

ABOVE = 1100


@contextlib.contextmanager
def past_fd_setsize():
    """Every free descriptor below ABOVE held (on /dev/null) while inside."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = ABOVE + 256
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-files limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    # Sockets left to the collector close when it runs: before, not inside.
    gc.collect()
    held = []
    try:
        while True:
            fd = os.open(os.devnull, os.O_RDONLY)
            held.append(fd)
            if fd >= ABOVE:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
