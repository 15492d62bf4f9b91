"""The wire contract: validation, and agreement with the JSON Schema."""

import json
import pathlib
import uuid

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.bus import contract

SCHEMA = json.loads((pathlib.Path(contract.__file__).parent / "schema" /
                     "envelope.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
UUID = "0f5d3c1e-2b1a-4c9e-8f00-123456789abc"


def instance_doc(**payload):
    p = {"name": "network-vif-plugged", "server_uuid": UUID,
         "status": "completed", "tag": "port-1"}
    p.update(payload)
    return {"version": "1.0", "id": "m1", "kind": "instance-event",
            "created_at": 1.5, "producer": "test", "payload": p}


def lifecycle_doc(**payload):
    p = {"instance_uuid": UUID, "host": "cmp-1", "transition": "STARTED",
         "event": 2, "detail": 0, "seq": 7}
    p.update(payload)
    return {"version": "1.3", "id": "m2", "kind": "lifecycle-event",
            "created_at": 2, "producer": "agent", "payload": p}


def refuse(doc, reason=contract.REASON_INVALID):
    with pytest.raises(contract.ContractError) as info:
        contract.from_document(doc)
    assert info.value.reason == reason
    assert not VALIDATOR.is_valid(doc), "schema accepts what the module refuses"
    return info.value


def test_round_trip_keeps_every_field():
    env = contract.envelope(contract.InstanceEvent(
        "network-vif-plugged", UUID, "port-1", "failed", "cmp-1", 7), "neutron")
    back = contract.decode(contract.encode(env))
    assert back == env
    assert back.payload.key == (UUID, "network-vif-plugged", "port-1")


def test_lifecycle_round_trip():
    env = contract.envelope(contract.LifecycleEvent(
        UUID, "cmp-1", "POSTCOPY_STARTED", 3, 7, 42, True), "agent")
    assert contract.decode(contract.encode(env)) == env


def test_revision_is_optional_so_older_senders_stay_valid():
    doc = instance_doc()
    assert "revision" not in doc["payload"]
    assert contract.from_document(doc).payload.revision is None
    assert VALIDATOR.is_valid(doc)
    doc["payload"]["revision"] = None
    assert contract.from_document(doc).payload.revision is None
    assert VALIDATOR.is_valid(doc)
    assert b'"revision"' not in contract.encode(contract.envelope(
        contract.InstanceEvent("network-vif-plugged", UUID), "p"))
    doc["payload"]["revision"] = -1
    assert refuse(doc).field == "payload.revision"


def test_status_defaults_to_completed_and_unknown_fields_are_ignored():
    doc = instance_doc(future_field=[1, 2])
    del doc["payload"]["status"]
    doc["also_new"] = {"x": 1}
    env = contract.from_document(doc)
    assert env.payload.status == contract.COMPLETED
    assert VALIDATOR.is_valid(doc)


@pytest.mark.parametrize("doc, field", [
    (instance_doc(name="network-vif-exploded"), "payload.name"),
    (instance_doc(status="done"), "payload.status"),
    (instance_doc(server_uuid="not-a-uuid"), "payload.server_uuid"),
    (instance_doc(server_uuid=UUID + "\n"), "payload.server_uuid"),
    (instance_doc(host="cmp 1"), "payload.host"),
    (instance_doc(host="cmp-1\n"), "payload.host"),
    (instance_doc(tag=""), "payload.tag"),
    (instance_doc(tag=5), "payload.tag"),
    (instance_doc(name="volume-extended", tag=None), "payload.tag"),
    (lifecycle_doc(seq=-1), "payload.seq"),
    (lifecycle_doc(seq=True), "payload.seq"),
    (lifecycle_doc(transition="EXPLODED"), "payload.transition"),
    (lifecycle_doc(snapshot="yes"), "payload.snapshot"),
])
def test_refusal_names_the_field(doc, field):
    err = refuse(doc)
    assert err.field == field
    assert field in str(err)


def test_missing_fields_are_named():
    doc = instance_doc()
    del doc["payload"]["server_uuid"]
    assert refuse(doc).field == "payload.server_uuid"
    doc = instance_doc()
    del doc["id"]
    assert refuse(doc).field == "id"


def test_unknown_major_version_is_refused_with_its_own_reason():
    doc = instance_doc()
    doc["version"] = "2.0"
    err = refuse(doc, contract.REASON_UNSUPPORTED_VERSION)
    assert "major version 2" in str(err)


def test_tag_is_optional_for_network_events():
    env = contract.from_document(instance_doc(name="network-changed", tag=None))
    assert env.payload.tag is None


def test_body_limits_and_non_json():
    with pytest.raises(contract.ContractError) as info:
        contract.decode(b" " * 2000, max_bytes=1000)
    assert info.value.reason == contract.REASON_TOO_LARGE
    for body in (b"{", b"\xff\xfe", b"NaN", b'{"version": Infinity}'):
        with pytest.raises(contract.ContractError) as info:
            contract.decode(body)
        assert info.value.reason == contract.REASON_MALFORMED
    with pytest.raises(contract.ContractError) as info:
        contract.decode(b"[]")
    assert info.value.reason == contract.REASON_INVALID


def test_dead_letter_reason_from_router_or_broker():
    assert contract.dead_letter_reason(
        {contract.HEADER_REASON: "no-host"}) == "no-host"
    assert contract.dead_letter_reason(
        {"x-death": [{"reason": "expired"}]}) == contract.REASON_EXPIRED
    assert contract.dead_letter_reason({}) is None


# --- the module and the JSON Schema accept and refuse the same messages -----

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))
_uuids = st.uuids().map(str)
# Free text as the contract takes it: no control character (Cc: C0, DEL,
# C1) nor line or paragraph separator; near misses carry one of those.
_text = st.text(st.characters(blacklist_categories=("Cc", "Cs"),
                              blacklist_characters="\u2028\u2029"), min_size=1)
_text_misses = st.sampled_from(["", "a\nforged line", "\x1b[31mred", "a\rb", "x\x85",
                                "\u2028", "\x00", "\x7f"])
_hosts = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,12}\Z")

# field -> (valid values, near misses); a document is built valid and then
# up to two fields are dropped or replaced by a near miss or any scalar.
_TOP = {
    "version": (st.sampled_from(["1.0", "1.9", "1.1234"]),
                st.sampled_from(["2.0", "1", "1.0\n", "01.2", "1.x"])),
    "id": (st.from_regex(r"\A[A-Za-z0-9_.:-]{1,20}\Z"),
           st.sampled_from(["a b", "", "x" * 129])),
    "created_at": (st.one_of(st.floats(0, 2e9), st.integers(0, 2**33)),
                   st.sampled_from([-1, 1e13])),
    "producer": (_text.filter(lambda t: len(t) <= 20),
                 st.one_of(st.sampled_from(["p" * 256]), _text_misses)),
}
_PAYLOADS = {
    "instance-event": {
        "name": (st.sampled_from(contract.EVENT_NAMES), st.just("network-x")),
        "server_uuid": (st.one_of(_uuids, _uuids.map(str.upper)),
                        _uuids.map(lambda u: u + "\n")),
        "status": (st.sampled_from(contract.STATUSES), st.just("done")),
        "tag": (st.one_of(_text.filter(lambda t: len(t) <= 255), st.none()),
                st.one_of(st.sampled_from(["t" * 256]), _text_misses)),
        "host": (st.one_of(_hosts, st.none()),
                 st.sampled_from(["a b", "h\n", "-h", "h" * 201])),
        "revision": (st.one_of(st.integers(0, 2**63), st.just(4.0), st.none()),
                     st.sampled_from([-1, 1.5, "3", True, [1]])),
    },
    "lifecycle-event": {
        "instance_uuid": (_uuids, st.just("nope")),
        "host": (_hosts, st.just("a/b")),
        "transition": (st.sampled_from(contract.TRANSITIONS),
                       st.just("started")),
        "event": (st.one_of(st.integers(0, 9), st.just(2.0)), st.just(2.5)),
        "detail": (st.integers(0, 9), st.just(-1)),
        "seq": (st.integers(0, 2**40), st.just(True)),
        "snapshot": (st.booleans(), st.just(0)),
    },
    "host-announce": {
        "host": (_hosts, st.just("")),
        "seq": (st.integers(0, 99), st.just(1.5)),
    },
    "host-snapshot": {
        "host": (_hosts, st.just("a b")),
        "seq": (st.integers(0, 99), st.just(-1)),
        "instances": (
            st.lists(st.fixed_dictionaries({
                "instance_uuid": st.one_of(_uuids, _uuids.map(str.upper)),
                "transition": st.sampled_from(contract.TRANSITIONS)}),
                max_size=3),
            st.sampled_from([{}, [1], [{"instance_uuid": "x",
                                        "transition": "STARTED"}],
                             [{"transition": "STARTED"}]])),
    },
    "resync-request": {
        "router": (_text.filter(lambda t: len(t) <= 20), _text_misses),
    },
}


@st.composite
def _documents(draw):
    kind = draw(st.sampled_from(contract.KINDS))
    doc = {k: draw(valid) for k, (valid, _) in _TOP.items()}
    doc["kind"] = kind
    fields = _PAYLOADS[kind]
    doc["payload"] = {k: draw(valid) for k, (valid, _) in fields.items()}
    if draw(st.booleans()):
        doc["payload"]["unknown"] = draw(_scalars)
    for _ in range(draw(st.integers(0, 2))):
        where = draw(st.sampled_from(["top", "payload", "kind"]))
        if where == "kind":
            doc["kind"] = draw(st.sampled_from(contract.KINDS + ("other",)))
            continue
        target, table = ((doc, _TOP) if where == "top"
                         else (doc["payload"], fields))
        key = draw(st.sampled_from(sorted(table)))
        action = draw(st.sampled_from(["drop", "near", "scalar"]))
        if action == "drop":
            target.pop(key, None)
        elif action == "near":
            target[key] = draw(table[key][1])
        else:
            target[key] = draw(_scalars)
    if draw(st.integers(0, 20)) == 0:
        doc["payload"] = draw(_scalars)
    return doc


def _module_accepts(doc):
    try:
        contract.from_document(doc)
        return True
    except contract.ContractError:
        return False


@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(_documents())
def test_module_and_schema_agree(doc):
    assert _module_accepts(doc) == VALIDATOR.is_valid(doc), doc


def test_generated_documents_are_both_valid_and_invalid():
    # Guard against the agreement test passing vacuously on one side only.
    seen = []

    # Derandomized: a proportion of a few hundred examples is a statistic,
    # and hypothesis' example database skews later runs towards the
    # failures it kept (seen here: 35 valid of 300 in one CI run).
    @settings(max_examples=300, deadline=None, derandomize=True,
              database=None)
    @given(_documents())
    def sample(doc):
        seen.append(VALIDATOR.is_valid(doc))

    sample()
    assert 0.2 < sum(seen) / len(seen) < 0.8, sum(seen)


@given(st.builds(contract.InstanceEvent, st.sampled_from(contract.EVENT_NAMES),
                 _uuids, _text.filter(lambda t: len(t) <= 255),
                 st.sampled_from(contract.STATUSES), st.one_of(st.none(), _hosts),
                 st.one_of(st.none(), st.integers(0, 2**63))))
def test_every_event_the_module_builds_passes_the_schema(event):
    env = contract.envelope(event, "p", message_id=uuid.uuid4().hex)
    doc = json.loads(contract.encode(env))
    assert VALIDATOR.is_valid(doc)
    assert contract.from_document(doc) == env


def test_version_with_a_leading_zero_is_refused_like_the_schema_does():
    # found by test_module_and_schema_agree: int("01") is 1, the schema says no
    doc = instance_doc()
    doc["version"] = "01.2"
    refuse(doc)
