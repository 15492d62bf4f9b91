"""Keeping a consumer loop alive: restart it with backoff when it fails.

Each service's loop already handles broker errors (reconnecting) and bad
messages (dead letters); what is left is a bug. A loop that raises one is
logged at ERROR with its traceback, reported, and started again after a
delay that doubles while it keeps failing and starts afresh once it ran
for a while: never a silent dead thread, never a hot crash loop.
"""

import logging
import time

LOG = logging.getLogger(__name__)

RESTART_DELAY = 0.5
RESTART_MAX = 30.0


def run_supervised(body, stop, what, *, on_failure=None):
    """Call ``body()`` until it returns or ``stop`` (an Event) is set.

    ``on_failure(exc)`` is told of each failure before the restart; an
    error in it is logged, not raised.
    """
    delay = RESTART_DELAY
    while not stop.is_set():
        started = time.monotonic()
        try:
            return body()
        except Exception as exc:
            LOG.error("%s failed; restarting in %.1fs", what, delay,
                      exc_info=True)
            if on_failure is not None:
                try:
                    on_failure(exc)
                except Exception:
                    LOG.exception("%s: on_failure hook raised", what)
            if time.monotonic() - started > RESTART_MAX:
                delay = RESTART_DELAY       # it had been running fine
            stop.wait(delay)
            delay = min(delay * 2, RESTART_MAX)
    return None
