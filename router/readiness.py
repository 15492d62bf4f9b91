"""Whether the router's placement may answer "no such instance". Pure.

An instance the placement table does not know is unknown for sure only
while the router is connected and the agents' snapshots are in. Before
that, "not found" would be a guess (issue 19, item 5):

- **not connected** (never yet, or the connection was lost): placement is
  frozen at what the last session heard, or empty; lifecycle events of the
  outage are not arriving;
- **warming** (connected, the resync request sent): the agents are sending
  their snapshots. Warming ends when every host this router ever heard from
  has sent one since the connect, or, at the latest, ``window`` seconds
  after the connect (a host that is gone for good never answers; a router
  that never heard of any host cannot know how many will answer).

The service only reports: ``connected(window)`` when a session starts
consuming and has asked for snapshots, ``disconnected()`` when it ends; the
placement table reports the hosts it hears from. Readers (REST threads, the
routing loop) ask ``unready()``. Times are the router's monotonic clock.
"""

import math
import time

# Retry-After while not connected: the reconnect backoff is not ours to
# know, and a client retrying every few seconds costs nothing.
NOT_CONNECTED_RETRY_AFTER = 5


class Readiness:
    def __init__(self, *, clock=time.monotonic, max_hosts=100_000):
        self.clock = clock
        self.max_hosts = max_hosts
        self._connected = False
        self._until = 0.0
        self._heard = set()       # every host that ever reported (bounded)
        self._missing = set()     # of those, not yet snapshotted since connect
        self._expecting = 0

    def connected(self, window):
        """A session is consuming and has asked the agents for snapshots."""
        self._missing = set(self._heard)
        self._expecting = len(self._missing)
        self._until = self.clock() + window
        self._connected = True

    def disconnected(self):
        self._connected = False

    def heard_from(self, host):
        if len(self._heard) < self.max_hosts:
            self._heard.add(host)

    def snapshot_seen(self, host):
        self.heard_from(host)
        self._missing.discard(host)

    def unready(self):
        """None when "unknown" is the truth; else (why, retry-after seconds)."""
        if not self._connected:
            return ("the router is not connected to the broker",
                    NOT_CONNECTED_RETRY_AFTER)
        left = self._until - self.clock()
        if left <= 0 or (self._expecting and not self._missing):
            return None
        if self._expecting:
            why = (f"placement is warming up: {len(self._missing)} of "
                   f"{self._expecting} hosts have not sent their snapshot yet")
        else:
            why = "placement is warming up: the agents are sending snapshots"
        return why, max(1, math.ceil(left))

    def ready(self):
        return self.unready() is None
