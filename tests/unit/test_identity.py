"""Who may claim what on the bus (router/routing.py): pure, no broker.

The failure class: a message believed for what it says about a host rather
than for who (by the broker's user_id) sent it. The properties below walk
every combination of sender, claimed host, prefix and trust list.
"""

from hypothesis import given
from hypothesis import strategies as st

from router import routing
from router.bus import contract

hosts = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,12}\Z")
prefixes = st.sampled_from(["evrouter-compute-", "", "cmp."])
users = st.one_of(st.none(), st.just(""), st.text(max_size=20))


@given(host=hosts, other=hosts, prefix=prefixes, user=users)
def test_no_host_speaks_for_another_and_nobody_speaks_anonymously(
        host, other, prefix, user):
    policy = routing.Policy(compute_user_prefix=prefix)
    # b's own user, for a: refused unless a and b are one host
    refusal = routing.lifecycle_refusal(prefix + other, host, policy)
    assert (refusal is None) == (other == host)
    # no user_id at all: refused, whatever the host and the prefix
    for missing in (None, ""):
        assert "no broker-validated user_id" in routing.lifecycle_refusal(
            missing, host, policy)
    # any sender is believed for host only as host's own compute user
    assert (routing.lifecycle_refusal(user, host, policy) is None) == (
        user == prefix + host)


@given(host=hosts, user=users)
def test_only_listed_users_speak_for_every_host(host, user):
    policy = routing.Policy(lifecycle_trusted_users=frozenset({"guest"}))
    accepted = routing.lifecycle_refusal(user, host, policy) is None
    assert accepted == (user in ("guest", policy.compute_user_prefix + host))


def test_the_memory_transport_has_no_users_and_one_trusted_process():
    policy = routing.Policy()
    assert routing.lifecycle_refusal(None, "a", policy, authenticated=False) is None
    assert routing.control_refusal(None, (), authenticated=False) is None


@given(user=users, allowed=st.frozensets(st.text(min_size=1, max_size=8), max_size=3))
def test_resync_requests_need_a_user_and_one_of_the_allowed(user, allowed):
    refusal = routing.control_refusal(user, allowed)
    assert (refusal is None) == (bool(user) and (not allowed or user in allowed))


@given(user=users)
def test_instance_events_without_a_user_id_are_forbidden_even_with_no_list(user):
    env = contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, "9ed3bb9a-0c57-4a53-8e0f-1f3f7a4c0d11", "p", host="a"), "t")

    def decide(publisher, authenticated=True):
        return routing.decide(env, publisher=publisher, hosts_for=lambda u: (),
                              attempt=0, first_seen=0, now=0,
                              policy=routing.Policy(),
                              authenticated=authenticated)

    outcome = decide(user)
    if user:
        assert outcome == routing.Deliver(("a",))
    else:
        assert outcome.reason == contract.REASON_FORBIDDEN
        assert "user_id" in outcome.detail
    assert decide(None, authenticated=False) == routing.Deliver(("a",))


def test_forbidden_claims_are_one_metric_by_kind():
    from router.metrics import forbidden_family
    family = forbidden_family({"forbidden:host-snapshot": 2,
                               "forbidden:lifecycle-event": 3,
                               "dead_lettered:forbidden": 4, "in": 9})
    got = {s.labels["kind"]: s.value for s in family.samples}
    assert family.name == "evrouter_forbidden"
    assert got == {"host-snapshot": 2, "lifecycle-event": 3, "instance-event": 4}
