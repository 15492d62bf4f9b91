"""REST compatibility: the compute API's os-server-external-events, on the bus.

A network service that still POSTs ``{"events": [...]}`` to the compute API
can POST it here unchanged. Each event is answered with the code the compute
API would give (200 accepted, 400 missing required tag, 404 unknown
instance, 422 instance has no host); the request answers 200, 207 when some
failed, 404 when none was accepted, 400 for a malformed body. Accepted
events are published to ingress with confirms before the answer is sent,
so a 200 means the broker has them.

``evaluate`` is pure; ``RestIngress`` owns the one connection its worker
thread publishes on (HTTP request threads hand events over through a queue).

Hardened for a real cloud (``RestApp``, ``serve``): the compute API's
microversion rules per event name (nova-api refuses, as a 400 for the whole
request, a name newer than the request's microversion: volume-extended
2.51, power-update 2.76, accelerator-request-bound 2.82, volume-reimaged
2.93; no header means 2.1, "latest" the newest), Keystone authentication by
keystonemiddleware (``[keystone_authtoken]`` of the service's config) and
the caller's roles checked by oslo.policy (default: Nova's own rule for this
API, service or admin role). ``check_exposure`` refuses an unauthenticated
listener beyond loopback unless explicitly allowed.
"""

import ipaddress
import json
import logging
import queue
import re
import socket
import threading
import time
import wsgiref.simple_server

from oslo_config import cfg

from router.bus import connection as bus_connection
from router.bus import contract, ops, publishing, topology, tracecontext
from router.bus.backoff import Backoff

LOG = logging.getLogger(__name__)
PATH = "/v2.1/os-server-external-events"
PUBLISHER = "os-server-external-events"

# nova-api's rules (nova 34: api/openstack/compute/schemas/server_external_events.py)
EVENT_MIN_MICROVERSION = {
    "volume-extended": (2, 51),
    "power-update": (2, 76),
    "accelerator-request-bound": (2, 82),
    "volume-reimaged": (2, 93),
}
MIN_MICROVERSION = (2, 1)
MAX_MICROVERSION = (2, 104)     # nova 34.0.0
POLICY_NAME = "os_compute_api:os-server-external-events:create"
POLICY_DEFAULT = "role:service or role:admin"   # Nova's rule:service_or_admin
MAX_BODY_BYTES = contract.DEFAULT_MAX_BODY_BYTES
BUS_RETRY_AFTER = 5         # seconds, when the broker refused or is away
_VERSION_RE = re.compile(r"^([1-9][0-9]*)\.(0|[1-9][0-9]*)$")


class MicroversionError(ValueError):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_microversion(headers):
    """(major, minor) asked for by ``headers`` (a dict, case-insensitive keys)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    value = None
    for item in (lowered.get("openstack-api-version") or "").split(","):
        service, _, version = item.strip().partition(" ")
        if service.lower() == "compute":
            value = version.strip()
    if value is None:
        value = lowered.get("x-openstack-nova-api-version")
    if value is None or not value.strip():
        return MIN_MICROVERSION
    value = value.strip()
    if value.lower() == "latest":
        return MAX_MICROVERSION
    match = _VERSION_RE.match(value)
    if not match:
        raise MicroversionError(400, f"Invalid API version request string: {value}")
    version = (int(match[1]), int(match[2]))
    if not MIN_MICROVERSION <= version <= MAX_MICROVERSION:
        raise MicroversionError(
            406, f"Version {value} is not supported by the API. Minimum is "
                 f"{_fmt(MIN_MICROVERSION)} and maximum is {_fmt(MAX_MICROVERSION)}.")
    return version


def _fmt(version):
    return f"{version[0]}.{version[1]}"


def _bad_request(detail):
    return 400, {"badRequest": {"code": 400, "message": detail}}, [], []


def evaluate(body, *, hosts_for, is_hostless, producer="rest-compat",
             microversion=None, unready=lambda: None):
    """(status, response document, envelopes to publish, headers).

    With a `microversion`, an event name newer than it is refused as nova-api
    refuses it: 400 for the whole request. While placement cannot answer
    "unknown" (`unready()` gives (why, seconds): the router is not connected,
    or has just connected and waits for the agents' snapshots), an instance
    it does not know, or knows on no host, may just not be reported yet: the
    whole request is answered 503 with Retry-After instead of 404 or 422.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _bad_request(f"body is not JSON: {exc}")
    except RecursionError:
        return _bad_request("body is not JSON we take: nested too deep")
    if type(doc) is not dict or type(doc.get("events")) is not list or not doc["events"]:
        return _bad_request("body must be {\"events\": [event, ...]} with at least one")
    answers, accepted = [], []
    for i, item in enumerate(doc["events"]):
        if type(item) is not dict:
            return _bad_request(f"events[{i}] must be an object")
        payload = {k: item[k] for k in ("name", "server_uuid", "status", "tag")
                   if k in item}
        name = payload.get("name")
        # a name that is a list or an object is the contract's to refuse
        # (below), not a key to look up (unhashable: TypeError)
        needed = EVENT_MIN_MICROVERSION.get(name) if type(name) is str else None
        if microversion is not None and needed and microversion < needed:
            return _bad_request(
                f"Invalid input for field/attribute name. Value: "
                f"{payload['name']}. {payload['name']!r} needs microversion "
                f"{_fmt(needed)} or later (request: {_fmt(microversion)})")
        tag_missing = payload.get("name") in contract.TAG_REQUIRED and not payload.get("tag")
        if not tag_missing:
            try:
                event = contract.from_document({
                    "version": contract.SCHEMA_VERSION, "id": "rest", "kind":
                    contract.INSTANCE_EVENT, "created_at": 0, "producer": producer,
                    "payload": payload}).payload
            except contract.ContractError as exc:
                return _bad_request(f"events[{i}].{exc.field.split('.')[-1]}: {exc.detail}")
        answer = dict(payload, status=payload.get("status", contract.COMPLETED))
        if tag_missing:
            answer.update(code=400, status=contract.FAILED)
        elif hosts_for(event.server_uuid):
            answer["code"] = 200
            accepted.append(contract.envelope(event, producer))
        elif is_hostless(event.server_uuid):
            answer.update(code=422, status=contract.FAILED)
        else:
            answer.update(code=404, status=contract.FAILED)
        answers.append(answer)
    if any(a["code"] in (404, 422) for a in answers):
        not_yet = unready()
        if not_yet is not None:
            why, seconds = not_yet
            return 503, {"error": f"{why}; retry in {seconds}s"}, [], [
                ("Retry-After", str(seconds))]
    if not accepted:
        return 404, {"itemNotFound": {"code": 404, "message":
                                      "No instances found for any event"},
                     "events": answers}, [], []
    return ((200 if len(accepted) == len(answers) else 207),
            {"events": answers}, accepted, [])


class RestIngress:
    """The HTTP route; publishes accepted events from one worker thread."""

    def __init__(self, transport_url, topo, placement, *, ssl_opts=False,
                 confirm_timeout=10.0, reconnect=None):
        self._url = transport_url
        self._ssl = ssl_opts
        self._topo = topo
        self._placement = placement
        self._timeout = confirm_timeout
        # The worker connects when a request needs it; after a failed
        # session, requests get 503 at once until the backoff ran out
        # (one connect per backoff, not one per request).
        self.backoff = Backoff(reconnect)
        self._work = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rest-ingress",
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._work.put(None)

    def routes(self):
        """For the ops endpoint: handler(body, headers)."""
        return {("POST", PATH): lambda body, headers: self.handle(
            body, trace=(headers.get("traceparent"),
                         headers.get("X-OpenStack-Request-ID")))}

    def handle(self, body, microversion=None, trace=(None, None)):
        """(status, document, headers) for one request body. `trace`: the
        request's (traceparent, X-OpenStack-Request-ID) headers, each event
        a span of that trace (tracecontext.for_publish).

        The answer says what happened on the bus, never more or less: 503
        (retry) only when none of the events was published (a request that
        waited too long in line is withdrawn before any is); 207 naming
        the ones that were not when the broker failed part way; 502 for an
        event sent and not confirmed (see _partly); else the evaluation's
        answer. A retry after a 503 publishes nothing twice."""
        status, document, accepted, headers = evaluate(
            body, hosts_for=self._placement.hosts_for,
            is_hostless=self._placement.is_hostless, microversion=microversion,
            unready=self._placement.unready)
        if accepted:
            job = _Job(accepted, trace)
            self._work.put(job)
            published, error, unknown = job.outcome(self._timeout + 5,
                                                    self._timeout + _STARTED_GRACE)
            if published < len(accepted):
                LOG.error("REST events not published: %s (%d of %d were%s)", error,
                          published, len(accepted),
                          "; the next may have been" if unknown else "")
                if not published and not unknown:
                    return 503, {"error": f"events not accepted by the bus: {error}"}, [
                        ("Retry-After", str(BUS_RETRY_AFTER))]
                status, document = _partly(document, accepted[published:], error,
                                           unknown)
            accepted = accepted[:published]
        for env in accepted:
            LOG.info("event %s %s for %s accepted over REST", env.id,
                     env.payload.name, env.payload.server_uuid)
        return status, document, headers

    def _run(self):
        self._conn, self._up_since, self._reconnect_at = None, None, 0.0
        next_check = float("inf")
        while True:
            try:
                job = self._work.get(timeout=max(0.0, next_check - time.monotonic())
                                     if self._conn is not None else None)
            except queue.Empty:
                next_check = self._keep_alive()
                continue
            if job is None:
                break
            if not job.start():
                continue            # withdrawn by its request: it waited too long
            try:
                job.finish(None, self._publish_all(job))
            except _Failed as failed:
                job.finish(failed.error, failed.published, failed.unknown)
            if self._conn is not None:
                next_check = time.monotonic() + bus_connection.heartbeat_every(self._conn)
        if self._conn is not None:
            self._conn.release()

    def _keep_alive(self):
        """An idle connection answers the broker's heartbeats, or is dropped
        now (quietly: the next request connects afresh), not found dead by
        the next request. Returns when to look again."""
        try:
            try:
                self._conn.drain_events(timeout=0)
            except socket.timeout:
                pass
            self._conn.heartbeat_check()
        except Exception as exc:       # noqa: BLE001 (any end of an idle connection)
            LOG.info("REST ingress: idle broker connection ended (%s); the next "
                     "request connects again", exc)
            self._drop()
            return float("inf")
        return time.monotonic() + bus_connection.heartbeat_every(self._conn)

    def _publish_all(self, job):
        """Publish the job's events; the number published. A connection
        found dead on its first use after a quiet spell is replaced once at
        once (the same envelopes again: a copy the dead one delivered has
        the same id, which the waiter drops); other failures raise _Failed."""
        done, retried = 0, False
        deadline = time.monotonic() + self._timeout
        given, request_id = job.trace
        while True:
            # a connection from before this request: it may have died idle
            idle = self._conn is not None
            sending = False         # an event handed to the broker, unconfirmed
            try:
                publisher = self._session()
                for env in job.accepted[done:]:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Failed("publishing timed out", done)
                    sending = True
                    publisher.publish(
                        self._topo.ingress_exchange_name,
                        topology.instance_routing_key(env.payload.name),
                        contract.encode(env), message_id=env.id,
                        # the request's trace (its traceparent, else
                        # Neutron's request id), a span per event
                        headers={contract.HEADER_PUBLISHER: PUBLISHER,
                                 tracecontext.HEADER: tracecontext.for_publish(
                                     given, request_id)},
                        timeout=left)
                    done += 1
                    sending = idle = False
                return done
            except _Failed as failed:
                failed.published = done
                raise
            except Exception as exc:      # answered as 503, 207 or 502
                # A connection that died while idle fails its first use with
                # a connection error: replaced once (the same envelopes, the
                # same ids: a copy it did deliver is one the waiter drops).
                # A confirm that did not come is not that: the event may be
                # on the bus, and the answer must say so.
                dead = idle and isinstance(exc, tuple(self._conn.connection_errors))
                if dead and not retried:
                    retried = True
                    self._drop()
                    LOG.info("REST ingress: broker connection found dead (%s); "
                             "connecting again", exc)
                    continue
                self._drop(exc)
                # sent and not confirmed: the outcome of that one is unknown
                raise _Failed(f"{type(exc).__name__}: {exc}", done,
                              unknown=sending) from exc

    def _session(self):
        if self._conn is None:
            wait = self._reconnect_at - time.monotonic()
            if wait > 0:
                raise _Failed(f"reconnecting to the broker in {wait:.1f}s "
                              f"after: {self.backoff.cause}", 0)
            self._conn = bus_connection.connect_once(bus_connection.connection(
                self._url, ssl_opts=self._ssl))
            self._up_since = time.monotonic()
            self._publisher = publishing.BlockingPublisher(
                self._conn, user_id=bus_connection.user_of(self._conn))
        return self._publisher

    def _drop(self, failure=None):
        """Forget the connection; after a `failure`, the next connect waits
        for the backoff (one connect per backoff, not one per request).
        Without a close handshake: on a path that swallows bytes it blocked
        the worker, and every request behind it, until TCP gave up."""
        if self._conn is not None:
            try:
                self._conn.collect()
            except Exception:       # noqa: BLE001, S110 (a dead connection's close)
                pass
        if failure is not None:
            self._reconnect_at = time.monotonic() + self.backoff.retry_in(
                "REST ingress", failure, self._up_since)
        self._conn = self._up_since = None


# A request whose publishing started waits this much longer than the
# publishing's own deadline for its outcome (the worker ends the job by
# then: each publish is bounded by what is left of the deadline).
_STARTED_GRACE = 30.0


class _Failed(Exception):
    def __init__(self, error, published, *, unknown=False):
        super().__init__(error)
        self.error = error
        self.published = published
        # the event after the published ones was sent and not confirmed
        self.unknown = unknown


class _Job:
    """One request's events between its HTTP thread and the worker: queued,
    started, done; or withdrawn while still queued (then never published)."""

    QUEUED, STARTED, DONE, WITHDRAWN = range(4)

    def __init__(self, accepted, trace):
        self.accepted = accepted
        self.trace = trace
        self.state = self.QUEUED
        self.published = 0
        self.error = None
        self.unknown = False
        self._cond = threading.Condition()

    def start(self):
        """The worker takes it; False if it was withdrawn."""
        with self._cond:
            if self.state == self.WITHDRAWN:
                return False
            self.state = self.STARTED
            return True

    def finish(self, error, published, unknown=False):
        with self._cond:
            self.state, self.error, self.published = self.DONE, error, published
            self.unknown = unknown
            self._cond.notify_all()

    def outcome(self, queued_for, started_for):
        """(published, error, unknown): waits `queued_for` seconds; a job
        still in line then is withdrawn (nothing published, known); a
        started one is waited for up to `started_for` more (its publishing
        is bounded by then). `unknown`: the event after the published ones
        may be on the bus."""
        with self._cond:
            if self._cond.wait_for(lambda: self.state == self.DONE, queued_for):
                return self.published, self.error, self.unknown
            if self.state == self.QUEUED:
                self.state = self.WITHDRAWN
                return 0, "publishing timed out (waited in line; nothing published)", False
            if self._cond.wait_for(lambda: self.state == self.DONE, started_for):
                return self.published, self.error, self.unknown
            return self.published, "publishing timed out; the outcome is unknown", True


def _partly(document, unpublished, error, unknown=False):
    """The events the bus did not take are failed, with the reason. They
    are the last of the accepted ones, whose answers are the last with
    code 200 (evaluate answers every event, in order). With `unknown`, the
    first of them was sent and not confirmed: code 502, and the whole
    answer 502 when nothing was confirmed (a 503 says retry, and a retry
    would send that one twice under a new id)."""
    answers = [a for a in document["events"] if a.get("code") == 200]
    failed = answers[len(answers) - len(unpublished):]
    for i, answer in enumerate(failed):
        answer.update(code=502 if unknown and i == 0 else 503,
                      status=contract.FAILED,
                      error=("not confirmed by the broker: it may have the event; "
                             if unknown and i == 0 else "") + error)
    if unknown and len(failed) == len(answers):
        document["error"] = f"the broker did not confirm: {error}"
        return 502, document
    return 207, document


# --- the hardened HTTP side ----------------------------------------------------
class RestApp:
    """WSGI application of the endpoint: microversions and the policy check.

    `handle(body, microversion)` answers (status, document[, headers])
    (RestIngress.handle).
    `enforcer`: an oslo.policy Enforcer (``policy_enforcer``), or None for no
    policy check (only sensible behind loopback, see check_exposure).
    """

    def __init__(self, handle, enforcer=None):
        self._handle = handle
        self._enforcer = enforcer

    def __call__(self, environ, start_response):
        try:
            status, document, headers = self._respond(environ)
        except Exception:       # never a traceback to the caller
            LOG.exception("REST request failed")
            status, document, headers = 500, {"computeFault": {
                "code": 500, "message": "internal error"}}, []
        body = json.dumps(document).encode()
        start_response(f"{status} {_REASONS.get(status, 'Status')}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), *headers])
        return [body]

    def _respond(self, environ):
        if environ.get("PATH_INFO", "").rstrip("/") != PATH:
            return 404, {"itemNotFound": {"code": 404, "message": "Not found"}}, []
        if environ.get("REQUEST_METHOD") != "POST":
            return 405, {"error": "method not allowed"}, [("Allow", "POST")]
        if self._enforcer is not None:
            refused = self._authorize(environ)
            if refused:
                return refused
        headers = {k[5:].replace("_", "-"): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        try:
            version = parse_microversion(headers)
        except MicroversionError as exc:
            code = "badRequest" if exc.status == 400 else "notAcceptable"
            return exc.status, {code: {"code": exc.status, "message": str(exc)}}, []
        length, refused = ops.request_length(environ.get("CONTENT_LENGTH"),
                                             MAX_BODY_BYTES)
        if refused is not None:
            return refused, {"badRequest": {
                "code": refused, "message": "bad or too large Content-Length"}}, []
        body = environ["wsgi.input"].read(length) if length else b""
        # novaclient sends the caller's request id (Neutron's req-...)
        trace = (environ.get("HTTP_TRACEPARENT"),
                 environ.get("HTTP_X_OPENSTACK_REQUEST_ID"))
        status, document, *extra = self._handle(body, microversion=version,
                                                trace=trace)
        return status, document, [*(extra[0] if extra else ()),
            ("OpenStack-API-Version", f"compute {_fmt(version)}"),
            ("X-OpenStack-Nova-API-Version", _fmt(version)),
            ("Vary", "OpenStack-API-Version, X-OpenStack-Nova-API-Version")]

    def _authorize(self, environ):
        from oslo_policy import policy

        if environ.get("HTTP_X_IDENTITY_STATUS") != "Confirmed":
            return 401, {"error": {"code": 401, "message": "authentication required"}}, []
        creds = {
            "roles": [r.strip().lower() for r in
                      environ.get("HTTP_X_ROLES", "").split(",") if r.strip()],
            "user_id": environ.get("HTTP_X_USER_ID"),
            "project_id": environ.get("HTTP_X_PROJECT_ID"),
            "service_roles": [r.strip().lower() for r in
                              environ.get("HTTP_X_SERVICE_ROLES", "").split(",")
                              if r.strip()],
        }
        try:
            self._enforcer.authorize(POLICY_NAME, {}, creds, do_raise=True)
        except policy.PolicyNotAuthorized:
            LOG.warning("REST request refused by policy %s: user %s, roles %s",
                        POLICY_NAME, creds["user_id"], ",".join(creds["roles"]))
            return 403, {"forbidden": {"code": 403, "message":
                         f"Policy doesn't allow {POLICY_NAME} to be performed."}}, []
        return None


_REASONS = {200: "OK", 207: "Multi-Status", 400: "Bad Request",
            401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 406: "Not Acceptable",
            413: "Request Entity Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}


def policy_enforcer(conf, rule=POLICY_DEFAULT):
    """An oslo.policy Enforcer with this endpoint's rule as its default.

    Operators override it in the policy file of `conf` ([oslo_policy]), under
    Nova's own name for the API.
    """
    from oslo_policy import policy

    enforcer = policy.Enforcer(conf)
    enforcer.register_default(policy.RuleDefault(
        POLICY_NAME, rule, description="Send external events to compute hosts"))
    return enforcer


def keystone_protected(app, conf):
    """``app`` behind keystonemiddleware's auth_token, configured from the
    ``[keystone_authtoken]`` section of `conf` (an oslo.config ConfigOpts)."""
    from keystonemiddleware import auth_token

    return auth_token.AuthProtocol(app, {"oslo_config_config": conf})


class InsecureListen(ValueError):
    """Unauthenticated beyond loopback, and not explicitly allowed."""


def is_loopback(host):
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host, *, authenticated, allow_insecure=False):
    """Refuse an unauthenticated endpoint reachable beyond this machine."""
    if authenticated or is_loopback(host) or allow_insecure:
        return
    raise InsecureListen(
        f"refusing to serve {PATH} without authentication on {host!r}: "
        f"enable Keystone authentication, listen on loopback, or allow it "
        f"explicitly (insecure)")


class _Server(ops.BoundedThreading, wsgiref.simple_server.WSGIServer):
    pass


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    timeout = ops.REQUEST_TIMEOUT

    def log_message(self, fmt, *args):
        LOG.debug("REST %s", fmt % args)


def serve(host, port, app, *, authenticated, allow_insecure=False):
    """Serve `app` on (host, port) from a thread; returns the server.

    ``server.server_address`` tells the port when 0 was asked for;
    ``server.shutdown()`` stops it. Raises InsecureListen (see check_exposure).
    """
    check_exposure(host, authenticated=authenticated, allow_insecure=allow_insecure)
    server_class, family = _Server, ops.address_family(host)
    if family != _Server.address_family:
        server_class = type("_Server6", (_Server,), {"address_family": family})
    server = wsgiref.simple_server.make_server(
        host, port, app, server_class=server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="rest-endpoint",
                     daemon=True).start()
    LOG.info("REST compatibility endpoint on %s (%s)",
             ops.display_address(server.server_address),
             "Keystone authentication" if authenticated else "no authentication")
    return server


# --- configuration (group [router]), parsed at the service's edge ------------
OPTS = [
    cfg.StrOpt("rest_listen", default="",
               help="host:port of the REST compatibility endpoint with "
                    "Keystone authentication, policy and microversions "
                    "(needs the 'keystone' extra). Empty: none."),
    cfg.StrOpt("rest_auth_strategy", default="keystone",
               choices=["keystone", "noauth"],
               help="keystone: tokens validated by keystonemiddleware "
                    "([keystone_authtoken]) and the caller's roles checked "
                    "against the policy os_compute_api:os-server-external-"
                    "events:create (default: service or admin role). noauth: "
                    "refused beyond loopback unless rest_allow_insecure."),
    cfg.BoolOpt("rest_allow_insecure", default=False,
                help="Serve the REST endpoint without authentication on a "
                     "non-loopback address (insecure: anyone who reaches it "
                     "can wake or fail any instance's waits)."),
]


def list_opts():
    return [("router", OPTS)]


def parse_host_port(listen):
    return ops.parse_listen(listen)


def serve_from_conf(conf, handle):
    """The endpoint as [router] rest_* configure it; None if rest_listen is empty.

    `handle` is RestIngress.handle. Raises InsecureListen, or ValueError for a
    bad rest_listen.
    """
    opts = conf.router
    if not opts.rest_listen:
        return None
    host, port = parse_host_port(opts.rest_listen)
    authenticated = opts.rest_auth_strategy == "keystone"
    check_exposure(host, authenticated=authenticated,
                   allow_insecure=opts.rest_allow_insecure)
    app = RestApp(handle, policy_enforcer(conf) if authenticated else None)
    if authenticated:
        app = keystone_protected(app, conf)
    return serve(host, port, app, authenticated=authenticated,
                 allow_insecure=opts.rest_allow_insecure)
