"""When a service tries the broker again: the one reconnect schedule.

Every reconnect loop of every service (router, host consumer, lifecycle
publisher, libvirt watcher, network publisher, REST ingress, network
adapter, supervision) waits by this schedule. Its rules:

- Every session that ends is a failure: a refused connect, a 403 on the
  first declare, consume or publish, a connection lost a moment after it
  came up. Each failure in a row doubles the wait's ceiling, from
  ``first`` up to ``cap``.
- The count starts afresh only after a session ran *healthy* for
  ``healthy_after`` seconds: up (consuming, publishing: whatever the
  service counts as doing its work) and not lost for that long. A connect
  that dies at once is not a success. Without this rule a broker user that
  may connect but not publish reconnected 352 times in 10 s, and a router
  whose session died right after connecting 18 times a second: on 1,000
  hosts, a thundering herd.
- Jitter: the wait is drawn uniformly from the upper ``jitter`` fraction
  of the ceiling, [ceiling * (1 - jitter), ceiling]. 1,000 hosts that lost
  the broker together spread over half the window instead of arriving at
  once, and, unlike full jitter ([0, ceiling]), no wait is ever close to
  zero: one client whose sessions keep dying young connects at most
  about log2(T / first) + 1 times in T seconds, a bound, not an average.

Pure apart from its injectable clock and random source; sleeping is the
caller's (``wait`` sleeps on the service's stop Event, so SIGTERM ends a
wait at once).
"""

import logging
import random
import threading
import time
from dataclasses import dataclass

LOG = logging.getLogger(__name__)


# A copy the broker refused (nack, reject-publish) is published again after
# this, per refusal in a row: 0.25 s doubling up to 5 s. One schedule for
# every such copy: the router's (router/delivery.py) and the host
# consumer's dead letters (compute/dead_letters.py). Each gives up after
# its `patience`.
REFUSED_FIRST = 0.25
REFUSED_CAP = 5.0


def refused_copy_delay(refusals):
    """Seconds before publishing again a copy refused `refusals` times."""
    return min(REFUSED_FIRST * 2 ** (refusals - 1), REFUSED_CAP)


@dataclass(frozen=True)
class Schedule:
    """How long to wait before each attempt (seconds)."""

    first: float = 0.5          # ceiling of the first wait: 0.25-0.5 s
    cap: float = 30.0           # no wait is longer
    healthy_after: float = 10.0  # up this long: the next loss starts afresh
    jitter: float = 0.5         # random fraction of each ceiling

    def __post_init__(self):
        if not (self.first >= 0 and self.cap >= 0 and self.healthy_after >= 0
                and 0 <= self.jitter <= 1):
            raise ValueError(f"bad reconnect schedule {self}")

    def ceiling(self, attempt):
        """The longest wait before attempt `attempt` (1: the first retry)."""
        first = min(self.first, self.cap)
        # min() before the power would overflow for a long outage's count
        return min(self.cap, first * 2.0 ** min(attempt - 1, 64))


def reconnect_schedule(cap=30.0, healthy_after=10.0):
    """The default schedule with another cap (a service's reconnect_max)."""
    return Schedule(first=min(Schedule.first, cap), cap=cap,
                    healthy_after=healthy_after)


class Backoff:
    """One reconnect loop's state: failures in a row since a healthy run.

    Not thread-safe, and need not be: one loop owns it. Health checks on
    other threads only read ``attempt``, ``delay`` and ``cause``.
    """

    def __init__(self, schedule=None, *, clock=time.monotonic,
                 rand=random.random):
        self.schedule = schedule or Schedule()
        self.attempt = 0        # failed sessions in a row
        self.delay = 0.0        # the wait before the current attempt
        self.cause = None       # why the last session ended, for people
        self.resets = 0         # healthy runs that restarted the count
        self._clock = clock
        self._rand = rand

    def failed(self, cause, up_since=None):
        """A session ended; the seconds to wait before the next one.

        ``up_since``: the clock() when that session came up (started doing
        its work), None if it never did. Only a session up for
        ``healthy_after`` resets the count.
        """
        s = self.schedule
        if up_since is not None and self._clock() - up_since >= s.healthy_after:
            if self.attempt:
                self.resets += 1
            self.attempt = 0
        self.attempt += 1
        ceiling = s.ceiling(self.attempt)
        self.delay = ceiling * (1.0 - s.jitter * self._rand())
        self.cause = describe(cause)
        return self.delay

    def retry_in(self, what, cause, up_since=None, conn=None):
        """failed(), plus this attempt's one log line: its delay and cause.
        With `conn`, a refused login names the user and the broker."""
        delay = self.failed(cause, up_since)
        if conn is not None and login_refused(cause):
            from router.bus.connection import connect_error
            self.cause = connect_error(conn, cause)[:300]
        if up_since is None:
            how = "could not connect"
        else:
            how = f"session lost after {self._clock() - up_since:.1f}s up"
        LOG.warning("%s: %s (%s); reconnect attempt %d in %.2fs", what, how,
                    self.cause, self.attempt, delay)
        return delay

    def wait(self, stop, what, cause, up_since=None, conn=None):
        """retry_in(), then sleep on the Event `stop`.

        False if `stop` is set (before or during the wait): the caller
        ends quietly, a requested stop is not a broker error.
        """
        if stop.is_set():
            return False
        return not stop.wait(self.retry_in(what, cause, up_since, conn))

    def status(self):
        """For a health text: '' before the first failure."""
        if not self.attempt:
            return ""
        return (f"reconnect attempt {self.attempt} after a {self.delay:.1f}s "
                f"backoff (last: {self.cause})")


class Ready(threading.Event):
    """A service's "session is up" Event that remembers since when.

    ``since`` is the monotonic time of the set() that made it set, None
    while it is clear: what Backoff.failed wants as up_since.
    """

    def __init__(self):
        super().__init__()
        self.since = None

    def set(self):
        if not self.is_set():
            self.since = time.monotonic()
        super().set()

    def clear(self):
        super().clear()
        self.since = None


def login_refused(exc):
    """The broker refused the login itself (connection.close 403 while
    opening, no method), not an operation on a channel."""
    return (getattr(exc, "reply_code", None) == 403
            and tuple(getattr(exc, "method_sig", None) or (0, 0)) == (0, 0))


def describe(cause, limit=300):
    """An exception (or a reason string) as one short line."""
    if isinstance(cause, BaseException):
        text = f"{type(cause).__name__}: {cause}" if str(cause) \
            else type(cause).__name__
    else:
        text = str(cause)
    return text[:limit]
