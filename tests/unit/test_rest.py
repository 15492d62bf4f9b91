"""The compute API's per-event codes, without a broker."""

import json

from router import rest
from router.bus import contract

A = "0f5d3c1e-2b1a-4c9e-8f00-000000000001"   # placed on cmp-1
B = "0f5d3c1e-2b1a-4c9e-8f00-000000000002"   # known, no host
C = "0f5d3c1e-2b1a-4c9e-8f00-000000000003"   # unknown


def run(events):
    body = json.dumps({"events": events}).encode()
    return rest.evaluate(body, hosts_for=lambda u: ("cmp-1",) if u == A else (),
                         is_hostless=lambda u: u == B)


def test_codes_per_event_and_207_when_some_failed():
    status, doc, accepted = run([
        {"name": "network-vif-plugged", "server_uuid": A, "tag": "p1"},
        {"name": "network-vif-plugged", "server_uuid": B, "tag": "p1"},
        {"name": "network-vif-plugged", "server_uuid": C, "tag": "p1"},
        {"name": "volume-extended", "server_uuid": A},
    ])
    assert status == 207
    assert [e["code"] for e in doc["events"]] == [200, 422, 404, 400]
    assert [e["status"] for e in doc["events"]] == ["completed", "failed", "failed",
                                                    "failed"]
    [env] = accepted
    assert env.payload == contract.InstanceEvent("network-vif-plugged", A, "p1")


def test_all_accepted_is_200_none_accepted_is_404():
    status, doc, accepted = run([{"name": "network-changed", "server_uuid": A,
                                  "status": "failed"}])
    assert status == 200 and accepted[0].payload.status == "failed"
    status, doc, accepted = run([{"name": "network-changed", "server_uuid": C}])
    assert status == 404 and accepted == []
    assert doc["events"][0]["code"] == 404


def test_malformed_bodies_are_400_naming_the_field():
    assert rest.evaluate(b"{", hosts_for=None, is_hostless=None)[0] == 400
    assert run([])[0] == 400
    status, doc, _ = run([{"name": "network-vif-exploded", "server_uuid": A}])
    assert status == 400 and "name" in doc["badRequest"]["message"]
    status, doc, _ = run([{"name": "network-changed", "server_uuid": "nope"}])
    assert status == 400 and "server_uuid" in doc["badRequest"]["message"]
