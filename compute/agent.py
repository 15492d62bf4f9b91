"""The lifecycle agent: libvirt lifecycle events onto the lifecycle fanout.

One agent per compute host. Who does what, top to bottom:

    libvirt-events  (native thread)  lifecycle callbacks ─┐
    libvirt-watcher (native thread)  up, down, snapshots ─┤
                                        Handoff (deque + self-pipe)
                                                          │
    dispatcher (the caller of run())  maps, debounces, numbers, logs
                                                          │
                                                Outbox (bounded)
                                                          │
    lifecycle-publisher (thread)  owns the broker connection, confirms

The native threads only hand values over (see compute.handoff). The
dispatcher and the publisher are plain threads, or green threads in a
process that eventlet monkey-patched before importing this module.

A snapshot of the host (one host-snapshot message, which replaces what
consumers knew of the host) goes out when libvirt connects, after a broker
reconnect, every ``snapshot_interval`` and when a router asks for one: a
router publishes a resync request on the control fanout whenever its
session starts, each agent hears it on a control queue of its current
broker session's own (Topology.agent_control_queue) and answers, at most
once per ``resync_min_interval`` (requests in between coalesce into one
later snapshot).

Health: ``healthy`` is False until libvirt and the broker are both
connected, and whenever either is lost. On stop, events still held back
are published rather than cancelled: the domain did stop, and nobody is
left to see the STARTED that would have cancelled them.
"""

import collections
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from compute import libvirt_watch
from compute.handoff import Handoff, blocking_call
from compute.lifecycle import LifecycleTranslator, SnapshotPacer
from compute.lifecycle_publisher import LifecyclePublisher, Outbox, Outgoing
from router import routing
from router.bus import connection as bus_connection
from router.bus import contract, inbound
from router.bus.topology import Topology

LOG = logging.getLogger(__name__)

_WATCHER_STOP_TIMEOUT = 5.0
# Nothing due: wake anyway after this (a bound, not a poll).
_IDLE_WAIT_MAX = 60.0


@dataclass
class AgentSettings:
    host: str
    libvirt_uri: str = "qemu:///system"
    transport_url: str = bus_connection.DEFAULT_URL
    topology: Topology = field(default_factory=Topology)
    stopped_delay: float = 15.0
    keepalive_interval: int = 5
    keepalive_count: int = 3
    probe_interval: float = 5.0
    reconnect_max: float = 30.0
    outbox_limit: int = 10_000
    drain_timeout: float = 10.0
    confirm_timeout: float = 10.0
    heartbeat: int = 30
    ssl: object = False
    health_file: Optional[str] = None
    # A router that starts later learns placement from these (0: only on
    # start, reconnects and resync requests).
    snapshot_interval: float = 300.0
    # Answer routers' resync requests (a snapshot), at most one per this
    # many seconds; requests in between are coalesced.
    resync_min_interval: float = 1.0
    # Broker users whose resync requests are answered; empty: any user
    # that may write the control exchange (by the deployment's permissions,
    # only the router user). A request without a user_id never is.
    resync_from: tuple = ()


class LifecycleAgent:
    def __init__(self, settings, *, opener=None):
        s = self.settings = settings
        self.stats = collections.Counter()
        self.failure = None
        self._handoff = Handoff()
        self._translator = LifecycleTranslator(s.host, s.stopped_delay)
        self._pacer = SnapshotPacer(s.resync_min_interval)
        self._producer = f"evrouter-agent/{s.host}"
        self._libvirt = "connecting"
        self._broker = "connecting"
        self._healthy = False
        self._dropping = False
        watcher_args = {"opener": opener} if opener is not None else {}
        self._watcher = libvirt_watch.LibvirtWatcher(
            s.libvirt_uri, self._handoff,
            keepalive_interval=s.keepalive_interval,
            keepalive_count=s.keepalive_count,
            probe_interval=s.probe_interval, reconnect_max=s.reconnect_max,
            **watcher_args)
        self.outbox = Outbox(s.outbox_limit)
        self._publisher = LifecyclePublisher(
            self.outbox, s.topology,
            lambda up, detail: self._handoff.put(("broker", up, detail)),
            transport_url=s.transport_url, heartbeat=s.heartbeat, ssl=s.ssl,
            confirm_timeout=s.confirm_timeout, reconnect_max=s.reconnect_max,
            control_host=s.host,
            on_control=lambda *message: self._handoff.put(
                ("resync", *message)))

    @property
    def healthy(self):
        return self._libvirt == "up" and self._broker == "up"

    @property
    def health(self):
        text = f"libvirt {self._libvirt}, broker {self._broker}"
        for part, state, backoff in (
                ("libvirt", self._libvirt, self._watcher.backoff),
                ("broker", self._broker, self._publisher.backoff)):
            if state.startswith("down") and backoff.attempt:
                text += f"; {part} {backoff.status()}"
        return text

    @property
    def published(self):
        """Messages the broker confirmed so far."""
        return self._publisher.published

    @property
    def control_queue(self):
        """The control queue of the current broker session (None before)."""
        return self._publisher.control_queue

    @property
    def held(self):
        """How many domains have events held back right now (reboots?)."""
        return len(self._translator.debounce)

    def stop(self):
        """Ask run() to stop cleanly. Safe from a signal handler."""
        self._handoff.put(("stop",))

    def run(self):
        """Watch libvirt and publish until stop(); returns when all is done."""
        s = self.settings
        libvirt_watch.start_event_loop()    # before the connection opens
        self._publisher.start()
        self._watcher.start()
        LOG.info("lifecycle agent for host %s watching %s, publishing to %s",
                 s.host, s.libvirt_uri, s.topology.lifecycle_exchange_name)
        self._write_health()
        watcher_stopped = self._dispatch()
        held = self._translator.release_all()
        if held:
            LOG.info("stopping: publishing %d held STOPPED event(s)",
                     len(held))
            self._queue(held)
        if not self._publisher.finish(s.drain_timeout):
            LOG.error("stopping: %d lifecycle message(s) left unpublished "
                      "(broker %s)", len(self.outbox), self._broker)
        if watcher_stopped:
            self._handoff.close()
        self._libvirt = self._broker = "stopped"
        self._write_health()
        LOG.info("lifecycle agent for host %s stopped (%d published)",
                 s.host, self._publisher.published)

    # --- the dispatcher -----------------------------------------------------
    def _dispatch(self):
        """Hand-overs in, outbox out, until the watcher stopped."""
        stop_by = None
        interval = self.settings.snapshot_interval
        next_snapshot = time.monotonic() + interval if interval > 0 else None
        while True:
            if next_snapshot is not None and time.monotonic() >= next_snapshot:
                self._snapshot_now()
                next_snapshot = time.monotonic() + interval
            if self._pacer.due():
                self._snapshot_now()
            for item in self._handoff.take(self._idle_wait(next_snapshot,
                                                           stop_by)):
                kind = item[0]
                if kind == "stop":
                    if stop_by is None:
                        LOG.info("stopping: closing the libvirt connection")
                        self._watcher.stop()
                        stop_by = time.monotonic() + _WATCHER_STOP_TIMEOUT
                elif kind == "watcher-stopped":
                    if stop_by is None:
                        self.failure = "libvirt watcher ended unexpectedly"
                        LOG.error("%s; stopping", self.failure)
                    return True
                else:
                    getattr(self, "_on_" + kind.replace("-", "_"))(*item[1:])
            self._queue(self._translator.due())
            if stop_by is not None and time.monotonic() > stop_by:
                LOG.warning("stopping: libvirt watcher did not stop within "
                            "%.0fs", _WATCHER_STOP_TIMEOUT)
                return False

    def _idle_wait(self, next_snapshot, stop_by):
        """Until the next thing due: a held event, a paced or periodic
        snapshot, the watcher's stop deadline. Hand-overs (events, stop())
        end the wait at once, so nothing here polls: an idle agent costs
        no measurable CPU (issue 22)."""
        now = time.monotonic()
        due = [self._translator.seconds_until_due(),
               self._pacer.seconds_until_due(),
               None if next_snapshot is None else next_snapshot - now,
               None if stop_by is None else stop_by - now]
        return min((max(0.0, w) for w in due if w is not None),
                   default=_IDLE_WAIT_MAX)

    def _on_event(self, position, domain, event, detail, handle):
        self.stats["events"] += 1
        payloads, transition, cancelled = self._translator.event(
            domain, event, detail, position=position,
            migration_completed=lambda: blocking_call(
                libvirt_watch.migration_completed, handle))
        if transition is None:
            self.stats["unknown"] += 1
            LOG.warning("libvirt event %d (detail %d) of %s has no "
                        "transition; ignored", event, detail, domain)
            return
        if cancelled:
            self.stats["stopped_cancelled"] += 1
            LOG.info("%s of %s cancelled by %s", ", ".join(
                t for _, t, _, _ in cancelled), domain, transition)
        if not payloads:
            self.stats["held"] += 1
            LOG.info("%s of %s (detail %d) held for up to %.1fs",
                     transition, domain, detail, self.settings.stopped_delay)
        self._queue(payloads)

    def _on_snapshot(self, listed_after, states):
        snapshot, deferred = self._translator.snapshot(
            states, listed_after=listed_after)
        self._pacer.taken()
        self.stats["snapshots"] += 1
        LOG.info("host %s: snapshot of %d domain(s)%s", self.settings.host,
                 len(snapshot.instances),
                 f" ({deferred} as last published: newer or held events)"
                 if deferred else "")
        self._queue([snapshot])

    def _on_resync(self, body, properties):
        try:
            self._resync_requested(body, properties)
        except Exception:
            # Anyone who can reach the control queue must not stop the agent.
            self.stats["resync_invalid"] += 1
            LOG.exception("control message %s: unexpected error; ignored",
                          inbound.loggable(properties.get("message_id")))

    def _resync_requested(self, body, properties):
        user_id = properties.get("user_id")
        message_id = inbound.loggable(properties.get("message_id"))
        try:
            env = inbound.decode_message(body, properties)
        except contract.ContractError as exc:
            self.stats["resync_invalid"] += 1
            LOG.warning("control message %s ignored (%s): %s", message_id,
                        exc.reason, exc)
            return
        if env.kind != contract.RESYNC_REQUEST:
            self.stats["resync_invalid"] += 1
            LOG.warning("control message %s ignored: kind %s", env.id,
                        env.kind)
            return
        # Only the router user may write the control fanout (permissions);
        # the user_id says who did, and without one the broker vouched for
        # nothing: refused, whatever resync_from says.
        refusal = routing.control_refusal(user_id, self.settings.resync_from)
        if refusal is not None:
            self.stats["resync_refused"] += 1
            self.stats[f"forbidden:{env.kind}"] += 1
            LOG.warning("resync request %s from router %s ignored: %s", env.id,
                        env.payload.router, refusal)
            return
        self.stats["resync_requests"] += 1
        if self._pacer.request():
            LOG.info("resync requested by router %s: snapshot",
                     env.payload.router)
            self._snapshot_now()
        else:
            LOG.info("resync requested by router %s: snapshot within %.1fs "
                     "(rate limit)", env.payload.router,
                     self._pacer.seconds_until_due() or 0.0)

    def _snapshot_now(self):
        # Without libvirt there is nothing to list; the reconnect snapshots.
        if self._libvirt == "up":
            self._watcher.request_snapshot()

    def _on_libvirt_up(self, how):
        LOG.info("libvirt %s connected (loss noticed by %s)",
                 self.settings.libvirt_uri, how)
        self._set_health(libvirt="up")

    def _on_libvirt_down(self, reason):
        # Logged with its reconnect attempt (libvirt-retry follows).
        self._set_health(libvirt=f"down ({reason})")

    def _on_libvirt_retry(self, cause, seconds, attempt):
        LOG.warning("libvirt %s: %s; reconnect attempt %d in %.2fs",
                    self.settings.libvirt_uri, cause, attempt, seconds)
        if not self._libvirt.startswith("down"):   # keep why it was lost
            self._set_health(libvirt=f"down ({cause})")

    def _on_broker(self, up, detail):
        if up:
            LOG.info("broker connected (%s); %d message(s) waiting", detail,
                     len(self.outbox))
            self._dropping = False
            self._set_health(broker="up")
            if detail == "again":
                # Consumers may have missed what the outbox had to drop.
                self._watcher.request_snapshot()
        elif self._broker == "up" or self._broker == "connecting":
            LOG.warning("broker lost (%s); keeping up to %d message(s)",
                        detail, self.outbox.limit)
            self._set_health(broker=f"down ({detail})")

    # --- helpers ------------------------------------------------------------
    def _queue(self, payloads):
        for payload in payloads:
            env = contract.envelope(payload, self._producer)
            if type(payload) is contract.HostSnapshot:
                label = (f"snapshot of {payload.host} seq {payload.seq} "
                         f"({len(payload.instances)} domain(s))")
            else:
                label = (f"{payload.transition} {payload.instance_uuid} "
                         f"seq {payload.seq}")
                if not payload.snapshot:
                    LOG.info("%s (event %d detail %d)", label, payload.event,
                             payload.detail)
            dropped = self.outbox.put(Outgoing(env.id, contract.encode(env),
                                               label))
            if dropped is not None:
                self.stats["dropped"] += 1
                if not self._dropping:
                    self._dropping = True
                    LOG.warning("outbox full (%d): dropping the oldest "
                                "messages, first %s; the snapshot after the "
                                "reconnect resyncs consumers",
                                self.outbox.limit, dropped.label)

    def _set_health(self, *, libvirt=None, broker=None):
        self._libvirt = libvirt or self._libvirt
        self._broker = broker or self._broker
        if self.healthy != self._healthy:
            self._healthy = self.healthy
            log = LOG.info if self._healthy else LOG.warning
            log("agent %s: %s", "healthy" if self._healthy else "unhealthy",
                self.health)
            self._write_health()

    def _write_health(self):
        path = self.settings.health_file
        if not path:
            return
        state = "ok" if self.healthy else "unhealthy"
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{state}: {self.health}\n")
        os.replace(tmp, path)
