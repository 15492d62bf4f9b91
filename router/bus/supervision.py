"""Keeping a consumer loop alive: restart it with backoff when it fails.

Each service's loop already handles broker errors (its reconnect Backoff)
and bad messages (dead letters); what is left is a bug. A loop that raises
one is logged at ERROR with its traceback, reported, and started again
after a wait from the same schedule as every reconnect (router.bus.backoff):
it doubles while the loop keeps failing and starts afresh once the loop ran
for RESTART_HEALTHY: never a silent dead thread, never a hot crash loop.
"""

import logging
import time

from router.bus.backoff import Backoff, Schedule

LOG = logging.getLogger(__name__)

# What ends a thread on purpose: the process exiting, an interrupt, a
# generator or green thread closed. Anything else a loop raises, a
# BaseException too (eventlet.Timeout escaping the code that armed it, an
# embedding service's own), is a failure: restarted, never a dead loop.
FATAL = (SystemExit, KeyboardInterrupt, GeneratorExit)
try:
    from greenlet import GreenletExit
except ImportError:     # pragma: no cover (eventlet brings greenlet)
    pass
else:
    FATAL += (GreenletExit,)

RESTART_HEALTHY = 30.0
RESTART_SCHEDULE = Schedule(first=0.5, cap=30.0, healthy_after=RESTART_HEALTHY)


def run_supervised(body, stop, what, *, on_failure=None,
                   schedule=RESTART_SCHEDULE):
    """Call ``body()`` until it returns or ``stop`` (an Event) is set.

    ``on_failure(exc)`` is told of each failure before the restart; an
    error in it is logged, not raised.
    """
    restarts = Backoff(schedule)
    while not stop.is_set():
        started = time.monotonic()
        try:
            return body()
        except FATAL:
            raise
        except BaseException as exc:    # noqa: B036 (FATAL re-raised above)
            delay = restarts.failed(exc, up_since=started)
            LOG.error("%s failed; restarting in %.1fs (restart %d)", what,
                      delay, restarts.attempt, exc_info=True)
            if on_failure is not None:
                try:
                    on_failure(exc)
                except Exception:
                    LOG.exception("%s: on_failure hook raised", what)
            stop.wait(delay)
    return None
