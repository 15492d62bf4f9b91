"""The compute API's per-event codes, without a broker."""

import json

from router import rest
from router.bus import contract

A = "0f5d3c1e-2b1a-4c9e-8f00-000000000001"   # placed on cmp-1
B = "0f5d3c1e-2b1a-4c9e-8f00-000000000002"   # known, no host
C = "0f5d3c1e-2b1a-4c9e-8f00-000000000003"   # unknown


def run(events):
    body = json.dumps({"events": events}).encode()
    status, doc, accepted, headers = rest.evaluate(
        body, hosts_for=lambda u: ("cmp-1",) if u == A else (),
        is_hostless=lambda u: u == B)
    assert headers == []
    return status, doc, accepted


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


# --- microversions, as nova-api applies them per event name ------------------
def test_microversion_from_either_header_default_and_latest():
    pv = rest.parse_microversion
    assert pv({}) == (2, 1)
    assert pv({"OpenStack-API-Version": "compute 2.76"}) == (2, 76)
    assert pv({"openstack-api-version": "identity 3.0, compute 2.51"}) == (2, 51)
    assert pv({"X-OpenStack-Nova-API-Version": "2.93"}) == (2, 93)
    assert pv({"OpenStack-API-Version": "compute latest"}) == rest.MAX_MICROVERSION


def test_bad_or_unsupported_microversions():
    for value, status in (("2.x", 400), ("two", 400), ("3.0", 406), ("2.999", 406),
                          ("1.9", 406)):
        try:
            rest.parse_microversion({"OpenStack-API-Version": f"compute {value}"})
        except rest.MicroversionError as exc:
            assert exc.status == status, value
        else:
            raise AssertionError(f"{value} accepted")


def versioned(name, version, tag="t1"):
    body = json.dumps({"events": [{"name": name, "server_uuid": A, "tag": tag}]})
    return rest.evaluate(body.encode(), hosts_for=lambda u: ("cmp-1",),
                         is_hostless=lambda u: False, microversion=version)[:3]


def test_event_names_need_their_microversion():
    for name, needed in rest.EVENT_MIN_MICROVERSION.items():
        below = (needed[0], needed[1] - 1)
        status, doc, accepted = versioned(name, below)
        assert status == 400 and accepted == [], name
        assert name in doc["badRequest"]["message"]
        assert versioned(name, needed)[0] == 200, name
    # Network events are fine at the minimum, as Neutron's notifier sends them.
    assert versioned("network-vif-plugged", (2, 1))[0] == 200


def call(app, method="POST", path=rest.PATH, body=b"", headers=None):
    import io
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path,
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    for k, v in (headers or {}).items():
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    got = {}

    def start_response(status, headers):
        got["status"] = int(status.split()[0])
        got["headers"] = dict(headers)

    document = json.loads(b"".join(app(environ, start_response)))
    return got["status"], document, got["headers"]


def test_wsgi_app_applies_the_microversion_header():
    seen = []

    def handle(body, microversion, trace=None):
        seen.append(microversion)
        return 200, {"events": []}

    app = rest.RestApp(handle)
    body = json.dumps({"events": [{"name": "power-update", "server_uuid": A,
                                   "tag": "POWER_ON"}]}).encode()
    status, _, headers = call(app, body=body,
                              headers={"OpenStack-API-Version": "compute 2.76"})
    assert status == 200 and seen == [(2, 76)]
    assert headers["OpenStack-API-Version"] == "compute 2.76"
    assert call(app, body=body, headers={"OpenStack-API-Version": "compute 3.1"})[0] == 406
    assert call(app, method="GET")[0] == 405
    assert call(app, path="/v2.1/servers")[0] == 404


def test_unauthenticated_beyond_loopback_is_refused_unless_allowed():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        rest.check_exposure(host, authenticated=False)
    for host in ("0.0.0.0", "", "10.0.0.5", "::", "rest.example.org"):
        try:
            rest.check_exposure(host, authenticated=False)
        except rest.InsecureListen:
            pass
        else:
            raise AssertionError(f"{host!r} served without authentication")
        rest.check_exposure(host, authenticated=True)
        rest.check_exposure(host, authenticated=False, allow_insecure=True)


def test_serve_refuses_before_binding():
    try:
        rest.serve("0.0.0.0", 0, rest.RestApp(None), authenticated=False)
    except rest.InsecureListen:
        return
    raise AssertionError("served")


def rest_conf(**values):
    from oslo_config import cfg
    conf = cfg.ConfigOpts()
    conf.register_opts(rest.OPTS, group="router")
    conf([])
    for name, value in values.items():
        conf.set_override(name, value, group="router")
    return conf


def test_serve_from_conf_noauth_on_loopback_serves_with_microversions():
    import http.client
    server = rest.serve_from_conf(
        rest_conf(rest_listen="127.0.0.1:0", rest_auth_strategy="noauth"),
        lambda body, microversion, trace=None: (200, {"seen": list(microversion)}))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1],
                                          timeout=10)
        conn.request("POST", rest.PATH, b"{}",
                     {"OpenStack-API-Version": "compute 2.82"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"seen": [2, 82]}
        conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_serve_from_conf_refuses_noauth_beyond_loopback_and_empty_is_off():
    assert rest.serve_from_conf(rest_conf(), None) is None
    try:
        rest.serve_from_conf(rest_conf(rest_listen="0.0.0.0:0",
                                       rest_auth_strategy="noauth"), None)
    except rest.InsecureListen:
        return
    raise AssertionError("served")


def test_unknown_instances_while_placement_warms_up_are_503_not_404():
    body = json.dumps({"events": [
        {"name": "network-vif-plugged", "server_uuid": A, "tag": "p1"},
        {"name": "network-vif-plugged", "server_uuid": C, "tag": "p1"}]}).encode()
    hosts = {"hosts_for": lambda u: ("cmp-1",) if u == A else (),
             "is_hostless": lambda u: False}
    status, doc, accepted, headers = rest.evaluate(
        body, unready=lambda: ("placement is warming up", 3), **hosts)
    assert status == 503 and accepted == [] and "retry" in doc["error"]
    assert headers == [("Retry-After", "3")]
    status, doc, accepted, headers = rest.evaluate(body, unready=lambda: None, **hosts)
    assert status == 207 and len(accepted) == 1 and headers == []


def test_an_instance_on_no_host_is_503_not_422_while_not_ready():
    body = json.dumps({"events": [
        {"name": "network-vif-plugged", "server_uuid": B, "tag": "p1"}]}).encode()
    hosts = {"hosts_for": lambda u: (), "is_hostless": lambda u: u == B}
    assert rest.evaluate(body, unready=lambda: ("not connected", 5), **hosts)[0] == 503
    assert rest.evaluate(body, **hosts)[0] == 404   # 422 per event, none accepted


def test_known_instances_are_answered_while_not_ready():
    # Where the router knows an instance lives, the event is routed when it
    # connects: no reason to make the sender wait.
    body = json.dumps({"events": [
        {"name": "network-vif-plugged", "server_uuid": A, "tag": "p1"}]}).encode()
    status, _, accepted, _ = rest.evaluate(
        body, hosts_for=lambda u: ("cmp-1",), is_hostless=lambda u: False,
        unready=lambda: ("not connected", 5))
    assert status == 200 and len(accepted) == 1


def test_upper_case_server_uuids_are_found():
    status, doc, accepted = run([{"name": "network-changed", "server_uuid": A.upper()}])
    assert status == 200 and accepted[0].payload.server_uuid == A


def test_wsgi_app_sends_the_handlers_headers():
    app = rest.RestApp(lambda body, microversion, trace=None: (
        503, {"error": "not yet"}, [("Retry-After", "5")]))
    status, _, headers = call(app, body=b"{}")
    assert status == 503 and headers["Retry-After"] == "5"


def test_wsgi_app_hands_on_the_callers_trace_and_request_id():
    seen = []
    app = rest.RestApp(lambda body, microversion, trace=None: (
        seen.append(trace) or (200, {})))
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    req = "req-0af76519-16cd-43dd-8448-eb211c80319c"
    call(app, body=b"{}", headers={"traceparent": tp,
                                   "X-OpenStack-Request-ID": req})
    call(app, body=b"{}")
    assert seen == [(tp, req), (None, None)]


# --- evaluate is total: any body a client sends gets an answer, never raises --
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)
_fields = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(contract.EVENT_NAMES), _json),
    "server_uuid": st.one_of(st.sampled_from([A, B, C]), _json),
    "status": st.one_of(st.sampled_from(contract.STATUSES), _json),
    "tag": _json})


def _answer(body, microversion):
    status, doc, accepted, headers = rest.evaluate(
        body, hosts_for=lambda u: ("cmp-1",) if u == A else (),
        is_hostless=lambda u: u == B, microversion=microversion)
    assert status in (200, 207, 400, 404), (status, doc)
    json.dumps(doc)                 # answerable as it is
    return status, accepted


@settings(max_examples=400, deadline=None)
@given(events=st.one_of(_json, st.lists(st.one_of(_fields, _json), max_size=4)),
       microversion=st.one_of(st.none(), st.sampled_from([(2, 1), (2, 76), (2, 104)])))
def test_any_document_is_answered(events, microversion):
    status, accepted = _answer(json.dumps({"events": events}).encode(), microversion)
    assert (status in (200, 207)) == bool(accepted)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_answered(body):
    _answer(body, None)


def test_what_broke_the_route_is_a_400():
    # a name that cannot be a dict key, and JSON nested past the recursion
    # limit: a TypeError and a RecursionError, then a dropped connection
    for body in (b'{"events":[{"name":["x"]}]}', b'{"events":[{"name":{"a":1}}]}',
                 b"[" * 100_000, b'{"events":' + b"[" * 50_000):
        assert _answer(body, (2, 104))[0] == 400
