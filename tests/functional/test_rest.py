"""The REST compatibility endpoint, with a real HTTP client, into the real bus."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid

import kombu

from router import rest
from router.bus import contract, tracecontext
from router.bus.publishing import BlockingPublisher
from router.service import RouterService, RouterSettings
from tests.conftest import collect, single_user_policy, wait_for
from tests.functional.agent_harness import TcpProxy
from tests.functional.test_router import publish_lifecycle
from tests.functional.test_router_ops import free_port
from tests.functional.test_router_process import consumers, start_router, stop

REQUEST_ID = "req-0af76519-16cd-43dd-8448-eb211c80319c"


def post(url, document, headers=None):
    request = urllib.request.Request(url, data=json.dumps(document).encode(),
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_compute_api_body_is_answered_like_the_compute_api_and_routed(bus):
    bus.declare_central()
    bus.declare_host("cmp-rest")
    port = free_port()
    proc = start_router(bus, "r-rest", ops_listen=f"127.0.0.1:{port}",
                        extra=["--router-rest_api"])
    url = f"http://127.0.0.1:{port}/v2.1/os-server-external-events"
    try:
        wait_for(lambda: consumers(bus) == 1, what="router consuming")
        placed, gone, unknown = (str(uuid.uuid4()) for _ in range(3))
        publish_lifecycle(bus, "cmp-rest", "STARTED", placed)
        publish_lifecycle(bus, "cmp-rest", "STARTED", gone)
        publish_lifecycle(bus, "cmp-rest", "UNDEFINED", gone)

        def answer():
            status, doc = post(url, {"events": [
                {"name": "network-vif-plugged", "server_uuid": placed, "tag": "port-9"},
                {"name": "network-vif-plugged", "server_uuid": gone, "tag": "port-9"},
                {"name": "network-vif-plugged", "server_uuid": unknown, "tag": "p"},
                {"name": "power-update", "server_uuid": placed}]},
                # as novaclient sends Neutron's request id
                {"X-OpenStack-Request-ID": REQUEST_ID})
            return (status, doc) if status == 207 else None
        status, doc = wait_for(answer, what="placement learned by the router")
        assert [e["code"] for e in doc["events"]] == [200, 422, 404, 400]

        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-rest"), 1)
        event = contract.decode(m.body).payload
        assert (event.server_uuid, event.name, event.tag) == \
            (placed, "network-vif-plugged", "port-9")
        assert m.headers[contract.HEADER_PUBLISHER] == "os-server-external-events"
        # its trace is the caller's request: Neutron's log lines name it too
        assert tracecontext.trace_id_of(m.headers[tracecontext.HEADER]) == \
            REQUEST_ID[4:].replace("-", "")

        status, doc = post(url, {"events": [{"name": "network-changed",
                                             "server_uuid": unknown}]})
        assert status == 404
        status, doc = post(url, {"events": "nope"})
        assert status == 400
    finally:
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0, out


def test_the_router_serves_the_rest_listener_with_microversions(bus):
    bus.declare_central()
    bus.declare_host("cmp-rest2")
    port = free_port()
    proc = start_router(bus, "r-rest2", extra=[
        "--router-rest-listen", f"127.0.0.1:{port}",
        "--router-rest-auth-strategy", "noauth"])
    url = f"http://127.0.0.1:{port}/v2.1/os-server-external-events"
    try:
        wait_for(lambda: consumers(bus) == 1, what="router consuming")
        placed = str(uuid.uuid4())
        publish_lifecycle(bus, "cmp-rest2", "STARTED", placed)

        def post_v(version, events):
            request = urllib.request.Request(
                url, data=json.dumps({"events": events}).encode(),
                headers={"Content-Type": "application/json",
                         "OpenStack-API-Version": f"compute {version}"})
            try:
                with urllib.request.urlopen(request, timeout=15) as resp:
                    return resp.status
            except urllib.error.HTTPError as err:
                return err.code

        power = [{"name": "power-update", "server_uuid": placed, "tag": "POWER_ON"}]
        wait_for(lambda: post_v("2.76", power) == 200, what="placement learned")
        assert post_v("2.75", power) == 400
        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-rest2"), 1)
        assert contract.decode(m.body).payload.name == "power-update"
    finally:
        code, out = stop(proc, signal.SIGTERM)
    assert code == 0, out


def test_the_router_refuses_an_unauthenticated_rest_endpoint_beyond_loopback(bus):
    bus.declare_central()
    for extra in (["--router-rest-listen", f"0.0.0.0:{free_port()}",
                   "--router-rest-auth-strategy", "noauth"],
                  ["--router-rest-api", "--router-ops-listen", f"0.0.0.0:{free_port()}"]):
        proc = start_router(bus, "r-insecure", extra=extra)
        proc.wait(30)
        code, out = stop(proc)
        assert code == 2, out
        assert "without authentication" in out


def post_for_headers(url, document):
    """(status, Retry-After or None) of a POST."""
    request = urllib.request.Request(url, data=json.dumps(document).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, resp.headers.get("Retry-After")
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Retry-After")


def _snapshot(bus, host, instances):
    """What an agent answers a router's resync request with."""
    env = contract.envelope(contract.HostSnapshot(host, 1, tuple(instances)), "agent")
    with kombu.Connection(bus.url) as conn:
        BlockingPublisher(conn, user_id=conn.userid).publish(
            bus.topology.lifecycle_exchange_name, "", contract.encode(env),
            mandatory=False)


def test_unknown_is_503_with_retry_after_until_the_router_can_know(bus):
    """Issue 19, item 5: with the broker away the router knows nothing, and
    right after connecting it knows only what the snapshots have told it."""
    bus.declare_central()
    bus.declare_host("cmp-ready")
    proxy = TcpProxy()
    proxy.cut()                         # the broker is away from the start
    svc = RouterService(RouterSettings(transport_url=proxy.url,
                                       topology=bus.topology, resync_window=2.0,
                                       policy=single_user_policy()))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    ingress = rest.RestIngress(proxy.url, bus.topology, svc.placement).start()
    server = rest.serve("127.0.0.1", 0, rest.RestApp(ingress.handle),
                        authenticated=False)
    url = f"http://127.0.0.1:{server.server_address[1]}{rest.PATH}"
    placed, unknown = str(uuid.uuid4()), str(uuid.uuid4())

    def events(server_uuid):
        return {"events": [{"name": "network-vif-plugged",
                            "server_uuid": server_uuid, "tag": "port-1"}]}
    try:
        # The whole outage, twice the window: 503, never 404.
        answers = []
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            answers.append(post_for_headers(url, events(unknown)))
            time.sleep(0.1)             # pacing the samples, not waiting for a state
        assert len(answers) >= 10
        assert {status for status, _ in answers} == {503}, answers
        assert all(int(retry_after) >= 1 for _, retry_after in answers)

        proxy.restore()
        wait_for(svc.ready.is_set, 30, what="the router connected")
        _snapshot(bus, "cmp-ready", [(placed, "STARTED")])
        wait_for(lambda: post_for_headers(url, events(placed))[0] == 200, 15,
                 what="the snapshot's instance accepted")
        wait_for(lambda: post_for_headers(url, events(unknown))[0] == 404, 15,
                 what="an unknown instance answered 404 once warm")
        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-ready"), 1)
        assert contract.decode(m.body).payload.server_uuid == placed

        # The connection is lost: what it knows may be stale, what it does not
        # know may have appeared meanwhile.
        proxy.cut()
        wait_for(lambda: not svc.ready.is_set(), 15, what="the loss noticed")
        status, retry_after = post_for_headers(url, events(unknown))
        assert status == 503 and int(retry_after) >= 1
        proxy.restore()
        wait_for(svc.ready.is_set, 30, what="the router reconnected")
        _snapshot(bus, "cmp-ready", [(placed, "STARTED")])
        wait_for(lambda: post_for_headers(url, events(unknown))[0] == 404, 15,
                 what="404 again once the known host's snapshot is in")
    finally:
        server.shutdown()
        server.server_close()
        ingress.stop()
        svc.stop()
        thread.join(20)
        proxy.close()
    assert not thread.is_alive()


class _Placed:
    """Placement that knows every instance on one host."""

    def hosts_for(self, server_uuid):
        return ("cmp-rest-x",)

    def is_hostless(self, server_uuid):
        return False

    def unready(self):
        return None


def _one_event():
    return json.dumps({"events": [{"name": "network-vif-plugged",
                                   "server_uuid": str(uuid.uuid4()),
                                   "tag": "port-1"}]}).encode()


def _router_queue_ids(bus, expected):
    got = collect(bus.url, bus.topology.router_queue_name, expected, timeout=10)
    extra = collect(bus.url, bus.topology.router_queue_name, 1, timeout=0.5)
    return [m.properties["message_id"] for m in got + extra]


def test_a_request_answered_503_publishes_nothing_later(bus):
    """A request that waited in line past its time is withdrawn, not
    published after its 503 (its caller retries: the events would go twice,
    under new ids the waiter cannot tell apart)."""
    bus.declare_central()
    ingress = rest.RestIngress(bus.url, bus.topology, _Placed(),
                               confirm_timeout=0.2).start()

    class Slow(rest._Job):          # the worker busy, as with a slow publish
        def __init__(self):
            super().__init__([], (None, None))
            self.release = threading.Event()

        def start(self):
            self.release.wait(30)
            return False

    slow = Slow()
    try:
        ingress._work.put(slow)
        status, doc, headers = ingress.handle(_one_event())
        assert status == 503 and "nothing published" in doc["error"]
        assert ("Retry-After", str(rest.BUS_RETRY_AFTER)) in headers
        slow.release.set()
        status, doc, _ = ingress.handle(_one_event())
        assert status == 200
        assert len(_router_queue_ids(bus, 1)) == 1      # the second only
    finally:
        slow.release.set()
        ingress.stop()


def test_the_first_request_after_the_connection_died_idle_is_accepted(bus):
    """Cinder and Cyborg call rarely and do not retry: a broker connection
    that ended while idle is replaced at once, not answered 503 twice."""
    bus.declare_central()
    proxy = TcpProxy()
    ingress = rest.RestIngress(proxy.url, bus.topology, _Placed()).start()
    try:
        assert ingress.handle(_one_event())[0] == 200
        proxy.drop()                # the idle connection is gone
        status, doc, _ = ingress.handle(_one_event())
        assert status == 200, doc
        assert ingress.handle(_one_event())[0] == 200
        assert len(set(_router_queue_ids(bus, 3))) == 3
    finally:
        ingress.stop()
        proxy.close()


class _HoldingProxy:
    """127.0.0.1:port -> the broker; hold() keeps every byte where it is
    (neither side hears from the other: a path that swallows packets)."""

    def __init__(self):
        import select
        import socket
        self._select = select.select
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.held = threading.Event()
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _accept(self):
        import socket
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5672))
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, a, b):
        try:
            while not self.closed.is_set():
                ready, _, _ = self._select([a, b], [], [], 0.05)
                if self.held.is_set():
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def close(self):
        import socket
        self.closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)    # wakes accept()
        except OSError:
            pass
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


def _event_body(server):
    return json.dumps({"events": [{"name": "network-vif-plugged",
                                   "server_uuid": server, "tag": "port-1"}]}).encode()


def test_a_confirm_that_never_came_is_not_a_503(bus):
    """An event sent and not confirmed may be on the bus: 502, never the 503
    that tells the caller to send it again (under a new id). And the worker
    does not block on closing a connection whose path swallows bytes: the
    next request is answered at once (503: nothing of it was sent)."""
    bus.declare_central()
    proxy = _HoldingProxy()
    ingress = rest.RestIngress(proxy.url, bus.topology, _Placed(),
                               confirm_timeout=1.0).start()
    servers = [str(uuid.uuid4()) for _ in range(4)]
    try:
        assert ingress.handle(_event_body(servers[0]))[0] == 200
        proxy.held.set()
        started = time.monotonic()
        status, doc, headers = ingress.handle(_event_body(servers[1]))
        assert status == 502, doc
        assert doc["events"][0]["code"] == 502 and "may have the event" in \
            doc["events"][0]["error"]
        assert not any(name == "Retry-After" for name, _ in headers)
        status, doc, _ = ingress.handle(_event_body(servers[2]))
        assert status == 503 and time.monotonic() - started < 15, (status, doc)
        proxy.held.clear()
        wait_for(lambda: ingress.handle(_event_body(servers[3]))[0] == 200, 60,
                 what="accepted once the path is back")
        got = collect(bus.url, bus.topology.router_queue_name, 3, timeout=5)
        on_bus = {contract.decode(m.body).payload.server_uuid for m in got}
        assert servers[0] in on_bus and servers[3] in on_bus
        assert servers[2] not in on_bus            # its 503 was the truth
    finally:
        ingress.stop()
        proxy.close()
