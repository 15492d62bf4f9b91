"""What the router does with one ingress message. Pure.

``decide`` turns a validated envelope plus what the router knows into one of
three outcomes; the service loop carries it out. Free of I/O: placement is
asked through an injected callable.
"""

from dataclasses import dataclass

from router.bus import contract


@dataclass(frozen=True, slots=True)
class Deliver:
    hosts: tuple


@dataclass(frozen=True, slots=True)
class Retry:
    attempt: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Policy:
    no_host_timeout: float = 120.0
    # Broker user names allowed to publish instance events; empty: any
    # broker-validated user (never a message without user_id).
    allowed_publishers: frozenset = frozenset()
    # Compute host H publishes lifecycle events as <prefix>H, for H only
    # (an empty prefix: H's user is named H).
    compute_user_prefix: str = "evrouter-compute-"
    # Broker users that may speak for every host on the lifecycle fanout:
    # a development broker where every service is one user (guest). Empty
    # in a real deployment: each host speaks for itself only.
    lifecycle_trusted_users: frozenset = frozenset()


# Who may say what on the bus. RabbitMQ validates the user_id property
# (a publish claiming another user is refused 406), so a user_id is the
# sender's authenticated identity; a message without one proves nothing,
# and is refused wherever a host is claimed. The memory transport has no
# users: it runs in one trusted process (the demo), hence `authenticated`.
NO_USER = "no broker-validated user_id"


def lifecycle_refusal(user_id, host, policy, *, authenticated=True):
    """Why a lifecycle-fanout message (lifecycle event, snapshot, announce)
    claiming `host` may not be believed, or None when its sender is host's
    own compute user (or a trusted one)."""
    if not authenticated:
        return None
    if not user_id:
        return f"{NO_USER} (host {host} speaks only as its compute user)"
    if user_id in policy.lifecycle_trusted_users:
        return None
    if host is not None and user_id == policy.compute_user_prefix + host:
        return None
    return f"broker user {user_id} may not speak for host {host}"


def lifecycle_sender_ok(user_id, host, policy, *, authenticated=True):
    """False when the sender may not speak for the host (see lifecycle_refusal)."""
    return lifecycle_refusal(user_id, host, policy,
                             authenticated=authenticated) is None


def control_refusal(user_id, allowed, *, authenticated=True):
    """Why an agent ignores a resync request, or None. allowed: the broker
    users it answers; empty: any broker-validated user (the permissions let
    only the router user write the control fanout)."""
    if not authenticated:
        return None
    if not user_id:
        return NO_USER
    if allowed and user_id not in allowed:
        return f"broker user {user_id} is not one of {', '.join(sorted(allowed))}"
    return None


def decide(env, *, publisher, hosts_for, attempt, first_seen, now, policy,
           placement_ready=True, authenticated=True):
    """Deliver to hosts, retry later, or dead-letter with a reason.

    The hosts are the hint's and those placement knows, as they are: the
    router asks the broker nothing per host (issue 22). A copy for a host
    whose queue is not bound to the hosts exchange comes back as a return
    (router/delivery.py): the event's only copy has the event decided again
    after a retry tier, any other is parked for its host alone; either is
    dead-lettered `unknown-host` after no_host_timeout.

    While placement is not ready (router/readiness.py: snapshots not in
    yet), "no host" is not known to be true: retried, never dead-lettered,
    whatever the time already waited. Readiness is bounded (a window after
    the connect), so this delays a dead-letter by at most that window.

    placement_ready: a bool, or a callable asked only when no host is
    found (the routing loop passes one: most events have a host, and
    asking costs a clock read per event).

    publisher: the broker-validated user_id (or, on the router's own
    retries, the one it carried over); authenticated=False only on the
    memory transport, which has no users.
    """
    if env.kind != contract.INSTANCE_EVENT:
        return DeadLetter(contract.REASON_INVALID,
                          f"kind: {env.kind} does not belong on ingress")
    if authenticated and not publisher:
        return DeadLetter(contract.REASON_FORBIDDEN,
                          f"{NO_USER}: instance events are accepted only "
                          f"from an authenticated publisher")
    if policy.allowed_publishers and publisher not in policy.allowed_publishers:
        return DeadLetter(contract.REASON_FORBIDDEN,
                          f"publisher {publisher!r} may not send instance "
                          f"events")
    event = env.payload
    hint = event.host
    placed = hosts_for(event.server_uuid)
    if hint is not None:
        return Deliver((hint,) + tuple(h for h in placed if h != hint))
    if placed:
        return Deliver(tuple(placed))
    detail = f"no known host for instance {event.server_uuid}"
    if callable(placement_ready):
        placement_ready = placement_ready()
    if not placement_ready:
        return Retry(attempt + 1, f"{detail} (placement warming up)")
    if now - first_seen < policy.no_host_timeout:
        return Retry(attempt + 1, detail)
    return DeadLetter(contract.REASON_NO_HOST,
                      f"{detail} after {now - first_seen:.0f}s")
