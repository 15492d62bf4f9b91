"""Where each instance lives, learned from the lifecycle fanout. Pure.

An instance maps to the hosts an event for it must reach:
- every host where it is live (running, paused, suspended, migrating);
- while a migration is in flight that is both source and destination, as
  the compute API sends external events to both;
- when it is live nowhere (stopped, crashed), the host that reported last,
  because a stopped instance still lives there and still gets events.
UNDEFINED removes a host, and so does STOPPED with libvirt's MIGRATED
detail (the source side of a finished migration).

Whether the table may be trusted to say "unknown" (connected, snapshots in)
is ``readiness`` (router/readiness.py); the service reports its sessions
with ``connected(window)`` and ``disconnected()``.
"""

import collections
import logging

from router.readiness import Readiness

LOG = logging.getLogger(__name__)

# A compute host's claims beyond this many instances are ignored: one host
# (compromised, or a bug) must not fill the table and push every other
# host's instances out of it (hostile review of issue 20).
DEFAULT_MAX_PER_HOST = 2000

# Values of libvirt's VIR_DOMAIN_EVENT_STOPPED_MIGRATED; kept here so the
# router does not need libvirt installed.
STOPPED_MIGRATED = 3

_NOT_LIVE = frozenset({"STOPPED", "SHUTDOWN", "CRASHED", "DEFINED"})


class PlacementTable:
    def __init__(self, max_instances=1_000_000, *, readiness=None,
                 max_per_host=DEFAULT_MAX_PER_HOST):
        # instance uuid -> {host: last transition}, most recently used last
        self._hosts = collections.OrderedDict()
        # host -> the instances it reported (for snapshots that replace it)
        self._by_host = collections.defaultdict(set)
        # instances whose last host let go: known, but on no host (bounded)
        self._hostless = collections.OrderedDict()
        self._max = max_instances
        self._per_host = max_per_host
        self.refused = 0            # claims over a host's cap, ignored
        self._over = set()          # hosts at their cap (said once each)
        self.readiness = readiness if readiness is not None else Readiness()

    def __len__(self):
        return len(self._hosts)

    # --- what the service reports, what readers ask (router/readiness.py) ---
    def connected(self, window):
        """A session consumes and asked for snapshots; warm for <= `window` s."""
        self.readiness.connected(window)

    warm_up = connected     # the old name

    def disconnected(self):
        """The session ended: "unknown" is a guess until the next one is warm."""
        self.readiness.disconnected()

    def unready(self):
        """None, or (why, retry-after seconds) an unknown instance is no answer."""
        return self.readiness.unready()

    def ready(self):
        return self.readiness.ready()

    def is_warming(self):
        """True while an unknown instance may just not be reported yet."""
        return not self.readiness.ready()

    # --- what the lifecycle fanout says ---------------------------------------
    def observe(self, event):
        """Apply one LifecycleEvent."""
        self.readiness.heard_from(event.host)
        leaving = event.transition == "UNDEFINED" or (
            event.transition == "STOPPED" and event.detail == STOPPED_MIGRATED)
        if leaving:
            self._leave(event.instance_uuid, event.host)
        else:
            self._place(event.instance_uuid, event.host, event.transition)

    def replace_host(self, host, instances):
        """Apply a host snapshot: ``instances`` ((uuid, transition), ...) is
        everything on ``host`` now; instances it no longer has let go of it."""
        self.readiness.snapshot_seen(host)
        now = {uuid: transition for uuid, transition in instances}
        for uuid in self._by_host.get(host, set()) - now.keys():
            self._leave(uuid, host)
        for uuid, transition in now.items():
            self._place(uuid, host, transition)

    def _place(self, uuid, host, transition):
        on_host = self._by_host.get(host)
        if (on_host is not None and len(on_host) >= self._per_host
                and uuid not in on_host):
            self.refused += 1
            if host not in self._over:
                self._over.add(host)
                LOG.warning("host %s claims more than %d instances: its "
                            "claims of further instances are ignored until "
                            "it has fewer (max_instances_per_host)", host,
                            self._per_host)
            return
        self._hostless.pop(uuid, None)
        hosts = self._hosts.get(uuid)
        if hosts is None:
            hosts = self._hosts[uuid] = {}
            if len(self._hosts) > self._max:
                old, old_hosts = self._hosts.popitem(last=False)
                for h in old_hosts:
                    self._by_host[h].discard(old)
        else:
            self._hosts.move_to_end(uuid)
            hosts.pop(host, None)   # keep dict order = order of last report
        hosts[host] = transition
        self._by_host[host].add(uuid)

    def _leave(self, uuid, host):
        on_host = self._by_host.get(host)
        if on_host is not None:
            on_host.discard(uuid)
            if not on_host:
                del self._by_host[host]
            if len(on_host) < self._per_host:
                self._over.discard(host)
        hosts = self._hosts.get(uuid)
        if hosts is None:
            return
        hosts.pop(host, None)
        if not hosts:
            del self._hosts[uuid]
            self._hostless[uuid] = None
            if len(self._hostless) > self._max:
                self._hostless.popitem(last=False)

    def hosts_for(self, instance_uuid):
        """The hosts an event for this instance goes to (may be empty).

        Safe to call from another thread than the one observing: the items
        are copied in one step under the GIL before they are looked at.
        """
        hosts = self._hosts.get(instance_uuid)
        if hosts is None and type(instance_uuid) is str:
            hosts = self._hosts.get(instance_uuid.lower())
        if not hosts:
            return ()
        items = list(hosts.items())
        live = tuple(h for h, t in items if t not in _NOT_LIVE)
        if live:
            return live
        return (items[-1][0],) if items else ()

    def is_hostless(self, instance_uuid):
        """Known, but every host it was on has let it go."""
        if type(instance_uuid) is str:
            instance_uuid = instance_uuid.lower()
        return instance_uuid in self._hostless
