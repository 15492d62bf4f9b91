"""The traceparent header: made up, taken from a context, validated."""

import pytest

from router.bus import tracecontext

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_value_parses():
    assert tracecontext.parse(GOOD) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert tracecontext.parse(GOOD.encode()) == tracecontext.parse(GOOD)
    assert tracecontext.valid(GOOD.encode()) == GOOD
    assert tracecontext.trace_id_of(GOOD) == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("bad", [
    None, 1, 1.5, [], {}, b"", "",
    GOOD + "\n", GOOD + "x", GOOD[:-1], " " + GOOD[1:],
    GOOD.upper(),                                   # hex is lower case
    "01" + GOOD[2:],                                # another version
    "00-" + "0" * 32 + "-00f067aa0ba902b7-01",      # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u0661",
    b"\xff" * 55, "x" * 10_000,
])
def test_anything_else_is_refused_and_nothing_raises(bad):
    assert tracecontext.parse(bad) is None
    assert tracecontext.valid(bad) is None
    assert tracecontext.trace_id_of(bad) is None


def test_made_up_values_are_valid_and_new():
    a, b = tracecontext.new(), tracecontext.new()
    assert tracecontext.parse(a) and tracecontext.parse(b)
    assert a[3:35] != b[3:35]


def test_a_publishing_context_keeps_its_trace_with_a_new_span():
    mine = tracecontext.for_publish(GOOD)
    assert tracecontext.parse(mine)[0] == tracecontext.parse(GOOD)[0]
    assert tracecontext.parse(mine)[1] != tracecontext.parse(GOOD)[1]
    # an invalid context is not copied: a new trace instead
    other = tracecontext.for_publish("00-garbage")
    assert tracecontext.parse(other) is not None


@pytest.mark.parametrize("request_id, trace", [
    ("req-0af76519-16cd-43dd-8448-eb211c80319c", "0af7651916cd43dd8448eb211c80319c"),
    ("req-0AF76519-16CD-43DD-8448-EB211C80319C", "0af7651916cd43dd8448eb211c80319c"),
    (b"req-0af76519-16cd-43dd-8448-eb211c80319c", "0af7651916cd43dd8448eb211c80319c"),
    ("req-00000000-0000-0000-0000-000000000000", None),
    ("req-0af76519-16cd-43dd-8448-eb211c80319c\n", None),
    ("0af76519-16cd-43dd-8448-eb211c80319c", None),
    ("req-0af7651916cd43dd8448eb211c80319c", None),
    (None, None), (42, None), ({"a": 1}, None), (b"\xff" * 40, None),
])
def test_an_openstack_request_id_names_a_trace(request_id, trace):
    assert tracecontext.trace_of_request(request_id) == trace


def test_the_current_openstack_request_is_the_publishing_context():
    from oslo_context import context
    # made the thread's current context, as Neutron's API and RPC do
    context.RequestContext(request_id="req-11111111-2222-3333-4444-555555555555")
    try:
        assert tracecontext.trace_id_of(tracecontext.for_publish()) == \
            "11111111222233334444555555555555"
        # an explicit traceparent still comes first
        assert tracecontext.trace_id_of(tracecontext.for_publish(GOOD)) == \
            tracecontext.trace_id_of(GOOD)
    finally:
        vars(context._request_store).pop("context", None)
    assert context.get_current() is None
