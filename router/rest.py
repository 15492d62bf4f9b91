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
"""

import json
import logging
import queue
import threading

from router.bus import connection as bus_connection
from router.bus import contract, publishing, topology

LOG = logging.getLogger(__name__)
PATH = "/v2.1/os-server-external-events"
PUBLISHER = "os-server-external-events"


def _bad_request(detail):
    return 400, {"badRequest": {"code": 400, "message": detail}}, []


def evaluate(body, *, hosts_for, is_hostless, producer="rest-compat"):
    """(status, response document, envelopes to publish)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _bad_request(f"body is not JSON: {exc}")
    if type(doc) is not dict or type(doc.get("events")) is not list or not doc["events"]:
        return _bad_request("body must be {\"events\": [event, ...]} with at least one")
    answers, accepted = [], []
    for i, item in enumerate(doc["events"]):
        if type(item) is not dict:
            return _bad_request(f"events[{i}] must be an object")
        payload = {k: item[k] for k in ("name", "server_uuid", "status", "tag")
                   if k in item}
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
    if not accepted:
        return 404, {"itemNotFound": {"code": 404, "message":
                                      "No instances found for any event"},
                     "events": answers}, []
    return (200 if len(accepted) == len(answers) else 207), {"events": answers}, accepted


class RestIngress:
    """The HTTP route; publishes accepted events from one worker thread."""

    def __init__(self, transport_url, topo, placement, *, ssl_opts=False,
                 confirm_timeout=10.0):
        self._url = transport_url
        self._ssl = ssl_opts
        self._topo = topo
        self._placement = placement
        self._timeout = confirm_timeout
        self._work = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rest-ingress",
                                        daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._work.put(None)

    def routes(self):
        return {("POST", PATH): self.handle}

    def handle(self, body):
        status, document, accepted = evaluate(
            body, hosts_for=self._placement.hosts_for,
            is_hostless=self._placement.is_hostless)
        if accepted:
            done = queue.Queue(maxsize=1)
            self._work.put((accepted, done))
            try:
                error = done.get(timeout=self._timeout + 5)
            except queue.Empty:
                error = "publishing timed out"
            if error:
                LOG.error("REST events not published: %s", error)
                return 503, {"error": f"events not accepted by the bus: {error}"}
        for env in accepted:
            LOG.info("event %s %s for %s accepted over REST", env.id,
                     env.payload.name, env.payload.server_uuid)
        return status, document

    def _run(self):
        conn = None
        while True:
            item = self._work.get()
            if item is None:
                break
            accepted, done = item
            try:
                if conn is None:
                    conn = bus_connection.connect_once(bus_connection.connection(
                        self._url, ssl_opts=self._ssl))
                    publisher = publishing.BlockingPublisher(
                        conn, user_id=bus_connection.user_of(conn))
                for env in accepted:
                    publisher.publish(
                        self._topo.ingress_exchange_name,
                        topology.instance_routing_key(env.payload.name),
                        contract.encode(env), message_id=env.id,
                        headers={contract.HEADER_PUBLISHER: PUBLISHER},
                        timeout=self._timeout)
                done.put(None)
            except Exception as exc:      # answered as 503; next request reconnects
                done.put(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.release()
                conn = None
        if conn is not None:
            conn.release()
