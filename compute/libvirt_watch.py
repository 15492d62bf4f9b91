"""The libvirt side of the lifecycle agent: the event loop and the connection.

Two native threads, neither of which logs (under eventlet a native thread
must not touch green locks, and logging handlers hold some):
- ``libvirt-events``, one per process, runs ``virEventRunDefaultImpl``.
  Its callbacks turn each call into a tuple on a Handoff and return.
- a ``LibvirtWatcher`` per agent owns the connection: opens it with
  backoff (router.bus.backoff), registers the callbacks, notices its loss
  (close callback and keepalive where the driver has them, a liveness probe
  otherwise), lists the domains for snapshots, and reopens it. It reports what happens as
  tuples on the same Handoff, in the order it happens:

    ("event", position, uuid, event, detail, domain)
    ("libvirt-up", how)            how: "keepalive" or "probe"
    ("snapshot", listed_after, [(uuid, state), ...])
    ("libvirt-down", reason)
    ("libvirt-retry", cause, seconds, attempt)   after every failed open or loss
    ("watcher-stopped",)
"""

import threading
import time

import libvirt

from compute import lifecycle
from compute.handoff import native_event, native_thread
from router.bus.backoff import Backoff, reconnect_schedule

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
}

_loop_lock = threading.Lock()
_loop_thread = None


def start_event_loop():
    """libvirt's default event loop on a native thread, once per process.

    Must run before a connection that wants events is opened. The loop is
    shared by every connection of the process and outlives agents: libvirt's
    default implementation has no way to stop it, so it is a daemon thread.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        # Otherwise libvirt prints every error to stderr; callers get them
        # as libvirtError and report them once, from a thread that may log.
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = native_thread(_run_event_loop, "libvirt-events")
        _loop_thread.start()


def _ignore_error(context, error):
    pass


def _run_event_loop():
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError:
            pass    # one failed iteration; the next one may succeed


def migration_completed(domain):
    """Whether the domain's migration job completed, as OpenStack asks it.

    Blocking (a libvirt round trip): the dispatcher calls it, never the
    event thread.
    """
    try:
        job_type = domain.jobStats().get("type", lifecycle.JOB_NONE)
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        if code in (libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID):
            return True     # a transient guest that left is gone or stopped
        if code != libvirt.VIR_ERR_NO_SUPPORT:
            return False
        job_type = lifecycle.JOB_NONE
    active = None
    if job_type == lifecycle.JOB_NONE:
        try:
            active = bool(domain.isActive())
        except libvirt.libvirtError as exc:
            active = None if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN \
                else True
    return lifecycle.job_completed(job_type, active)


class LibvirtWatcher:
    def __init__(self, uri, handoff, *, keepalive_interval=5,
                 keepalive_count=3, probe_interval=5.0, reconnect_max=30.0,
                 reconnect=None, opener=libvirt.open):
        self.uri = uri
        self._handoff = handoff
        self._keepalive = (keepalive_interval, keepalive_count)
        self._probe_interval = probe_interval
        # One Backoff across losses: only a connection that stayed up for
        # the schedule's healthy_after starts the waits afresh.
        self.backoff = Backoff(reconnect or reconnect_schedule(reconnect_max))
        self._opener = opener
        self._stop = native_event()     # sleeps between attempts wait on it
        self._wake = native_event()     # the watch loop waits on it
        self._snapshot_wanted = False
        self._closed = None             # (generation, reason) from libvirt
        self._generation = 0
        self._thread = native_thread(self._run, "libvirt-watcher")

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()

    def request_snapshot(self):
        """List every domain again (reported as a "snapshot" item)."""
        self._snapshot_wanted = True
        self._wake.set()

    # --- the native thread --------------------------------------------------
    def _run(self):
        try:
            while not self._stop.is_set():
                try:
                    conn, callback_id, how = self._connect()
                except libvirt.libvirtError as exc:
                    cause, up_since = str(exc), None
                else:
                    up_since = time.monotonic()
                    try:
                        cause = self._watch(conn, how)
                    finally:
                        self._forget(conn, callback_id)
                    if cause is None:
                        break                   # stopped
                # Reported, not logged: this is a native thread.
                delay = self.backoff.failed(cause, up_since)
                self._handoff.put(("libvirt-retry", self.backoff.cause,
                                   delay, self.backoff.attempt))
                self._stop.wait(delay)
        finally:
            self._handoff.put(("watcher-stopped",))

    def _connect(self):
        conn = self._opener(self.uri)
        self._generation += 1
        generation = self._generation
        try:
            try:
                conn.registerCloseCallback(
                    lambda c, reason, opaque: self._on_close(generation,
                                                             reason), None)
            except libvirt.libvirtError:
                pass            # the driver has none; the probe will notice
            callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                self._on_lifecycle, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        how = "probe"
        interval, count = self._keepalive
        if interval > 0:
            try:
                conn.setKeepAlive(interval, count)
                how = "keepalive"
            except libvirt.libvirtError:
                pass            # local drivers (test://) have no keepalive
        return conn, callback_id, how

    def _watch(self, conn, how):
        """Until the connection is lost (returns why) or stop() (None)."""
        self._handoff.put(("libvirt-up", how))
        self._snapshot_wanted = True
        # With keepalive, libvirt itself closes a connection whose daemon
        # stopped answering. The probe is for drivers without keepalive; a
        # remote daemon that hangs would hang the probe too.
        timeout = None if how == "keepalive" else self._probe_interval
        while True:
            if self._stop.is_set():
                return
            closed = self._closed
            if closed is not None and closed[0] == self._generation:
                reason = CLOSE_REASONS.get(closed[1], f"reason {closed[1]}")
                return self._down(reason)
            if self._snapshot_wanted:
                self._snapshot_wanted = False
                error = self._snapshot(conn)
                if error:
                    return self._down(error)
            if how == "probe" and not self._alive(conn):
                return self._down("liveness probe failed")
            self._wake.wait(timeout)
            self._wake.clear()

    def _down(self, reason):
        self._handoff.put(("libvirt-down", reason))
        return reason

    def _snapshot(self, conn):
        listed_after = self._handoff.next_position()
        states = []
        try:
            for dom in conn.listAllDomains():
                try:
                    state = dom.state()[0]
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue        # undefined while we listed
                    raise
                states.append((dom.UUIDString(), state))
        except libvirt.libvirtError as exc:
            return f"listing domains failed: {exc}"
        self._handoff.put(("snapshot", listed_after, states))
        return None

    @staticmethod
    def _alive(conn):
        try:
            conn.getLibVersion()
            return True
        except libvirt.libvirtError:
            return False

    def _forget(self, conn, callback_id):
        for undo in (lambda: conn.domainEventDeregisterAny(callback_id),
                     conn.unregisterCloseCallback, conn.close):
            try:
                undo()
            except libvirt.libvirtError:
                pass            # a dead connection refuses; nothing to undo

    # --- libvirt's event thread ---------------------------------------------
    # These run inside virEventRunDefaultImpl: they turn the call into values
    # and return. No logging, no libvirt round trip (UUIDString reads the
    # handle), nothing that can block.
    def _on_lifecycle(self, conn, dom, event, detail, opaque):
        self._handoff.put(("event", self._handoff.next_position(),
                           dom.UUIDString(), event, detail, dom))

    def _on_close(self, generation, reason):
        if generation == self._generation:   # not a late one of an old conn
            self._closed = (generation, reason)
            self._wake.set()
