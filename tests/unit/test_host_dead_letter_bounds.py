"""A host consumer's dead-letter copies and redelivery ledger, without a broker.

The copy property: whatever the original's body and headers, the copy's
content header fits a frame of the negotiated frame_max (with every other
property at its largest), its body fits the broker's max message size, and
the consumer's own headers (the reason) are never what is cut.
"""

import amqp
from hypothesis import given, settings
from hypothesis import strategies as st

from compute.dead_letters import HEADER_TRUNCATED_BODY, bounded_copy
from compute.delivery_ledger import DeliveryLedger
from router.bus import contract, inbound
from router.bus.inbound import header_budget

OURS = {contract.HEADER_REASON: "malformed", contract.HEADER_DETAIL: "d" * 1000,
        "x-evrouter-host": "cmp-1"}


def _header_frame_payload(headers):
    longest = "s" * 255
    message = amqp.Message(
        b"", application_headers=headers, content_type=longest,
        content_encoding=longest, message_id=longest, correlation_id=longest,
        reply_to=longest, expiration=longest, type=longest, user_id=longest,
        app_id=longest, cluster_id=longest, delivery_mode=2, priority=9,
        timestamp=1)
    return 12 + len(message._serialize_properties())


def test_a_copy_within_bounds_is_the_original():
    body, headers, cut = bounded_copy(b"{bad", OURS, {"a": 1}, 131_072, 1 << 24)
    assert body == b"{bad" and headers == {**OURS, "a": 1} and cut is None


def test_our_headers_win_over_the_originals_and_come_first():
    theirs = {contract.HEADER_REASON: "forged", "pad": "A" * 130_950}
    _, headers, cut = bounded_copy(b"", OURS, theirs, 131_072, 1 << 24)
    assert headers[contract.HEADER_REASON] == "malformed"
    assert "pad" not in headers and "pad" in headers[inbound.HEADER_CUT]


def test_the_budget_fits_a_content_header_frame_with_every_property_at_its_largest():
    # The frame RabbitMQ measures: at most frame_max - 8 bytes of payload
    # (frame_too_large above that), 12 of them before the properties.
    budget = header_budget(131_072)
    headers = {"pad": "A" * (budget - 4 - 1 - 3 - 5)}
    assert inbound.encoded_size(headers) == budget
    assert _header_frame_payload(headers) == 131_072 - 8


def test_a_body_over_the_max_message_size_is_truncated_with_a_marker():
    body, headers, _ = bounded_copy(b"x" * 2_000_000, OURS, {}, 131_072,
                                    1_048_576)
    assert len(body) == 1_048_576 - 131_072
    assert headers[HEADER_TRUNCATED_BODY] == \
        "2000000 bytes; the first 917504 kept"


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.binary(max_size=10), st.text(max_size=10),
              st.just(object()), st.datetimes(),
              st.integers(0, 140_000).map(lambda n: "A" * n),
              st.integers(0, 40_000).map(lambda n: [1] * n)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner,
                                            max_size=3)),
    max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(theirs=st.one_of(st.dictionaries(st.text(max_size=20), _values,
                                        max_size=6), _values),
       body_size=st.integers(0, 300_000),
       frame_max=st.sampled_from([4096, 8192, 131_072, 1 << 20]),
       max_message=st.integers(1 << 17, 1 << 19))
def test_any_copy_fits_a_frame_and_the_max_message_size(theirs, body_size,
                                                        frame_max, max_message):
    body, headers, _ = bounded_copy(b"x" * body_size, OURS, theirs,
                                    frame_max, max_message)
    assert _header_frame_payload(headers) <= frame_max - 8
    assert len(body) <= max_message
    assert headers[contract.HEADER_REASON] == "malformed"


def test_the_ledger_counts_unsettled_redeliveries_and_forgets_settled_ones():
    ledger = DeliveryLedger(size=2)
    assert ledger.delivered("a", redelivered=False) == 0
    assert ledger.delivered("a", redelivered=True) == 1
    assert ledger.delivered("a", redelivered=True) == 2
    assert ledger.delivered("a", redelivered=True, broker_count=7) == 7
    ledger.settled("a")
    assert ledger.delivered("a", redelivered=True) == 1
    ledger.delivered("b", redelivered=True)
    ledger.delivered("c", redelivered=True)
    assert len(ledger) == 2            # the oldest ("a") went first
    assert ledger.delivered("a", redelivered=True) == 1


@settings(max_examples=150, deadline=None)
@given(theirs=st.one_of(st.dictionaries(st.text(max_size=20), _values,
                                        max_size=6), _values),
       frame_max=st.sampled_from([4096, 8192, 131_072, 1 << 20]))
def test_any_router_copy_fits_a_frame_and_keeps_its_own_headers(theirs,
                                                                frame_max):
    """The router's retry, probation and dead-letter copies are bounded by
    the same function (inbound.bounded_beside) as the host consumer's."""
    ours = {contract.HEADER_ATTEMPT: 3, contract.HEADER_FIRST_SEEN: 1.5e9,
            contract.HEADER_PUBLISHER: "evrouter-network",
            contract.HEADER_REASON: "poison"}
    headers, _ = inbound.bounded_beside(theirs, ours, frame_max)
    assert _header_frame_payload(headers) <= frame_max - 8
    assert {k: headers[k] for k in ours} == ours
