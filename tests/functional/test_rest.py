"""The REST compatibility endpoint, with a real HTTP client, into the real bus."""

import json
import signal
import urllib.error
import urllib.request
import uuid

from router.bus import contract
from tests.conftest import collect, wait_for
from tests.functional.test_router import publish_lifecycle
from tests.functional.test_router_ops import free_port
from tests.functional.test_router_process import consumers, start_router, stop


def post(url, document):
    request = urllib.request.Request(url, data=json.dumps(document).encode(),
                                     headers={"Content-Type": "application/json"})
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
                {"name": "power-update", "server_uuid": placed}]})
            return (status, doc) if status == 207 else None
        status, doc = wait_for(answer, what="placement learned by the router")
        assert [e["code"] for e in doc["events"]] == [200, 422, 404, 400]

        [m] = collect(bus.url, bus.topology.host_queue_name("cmp-rest"), 1)
        event = contract.decode(m.body).payload
        assert (event.server_uuid, event.name, event.tag) == \
            (placed, "network-vif-plugged", "port-9")
        assert m.headers[contract.HEADER_PUBLISHER] == "os-server-external-events"

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
