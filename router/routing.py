"""What the router does with one ingress message. Pure.

``decide`` turns a validated envelope plus what the router knows into one of
three outcomes; the service loop carries it out. Host existence is asked
through an injected callable so this module stays free of I/O.
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
    # Broker user names allowed to publish instance events; empty: anyone.
    allowed_publishers: frozenset = frozenset()
    # Compute host H publishes lifecycle events as <prefix>H, for H only.
    compute_user_prefix: str = "evrouter-compute-"


def lifecycle_sender_ok(user_id, host, policy):
    """False when a compute host's user speaks for another host."""
    prefix = policy.compute_user_prefix
    if not (prefix and user_id and user_id.startswith(prefix)):
        return True
    return user_id[len(prefix):] == host


def decide(env, *, publisher, hosts_for, is_known_host, attempt, first_seen,
           now, policy):
    """Deliver to hosts, retry later, or dead-letter with a reason."""
    if env.kind != contract.INSTANCE_EVENT:
        return DeadLetter(contract.REASON_INVALID,
                          f"kind: {env.kind} does not belong on ingress")
    if policy.allowed_publishers and publisher not in policy.allowed_publishers:
        return DeadLetter(contract.REASON_FORBIDDEN,
                          f"publisher {publisher!r} may not send instance "
                          f"events")
    event = env.payload
    targets = []
    hint = event.host
    if hint is not None and is_known_host(hint):
        targets.append(hint)
    for host in hosts_for(event.server_uuid):
        if host not in targets and is_known_host(host):
            targets.append(host)
    if targets:
        return Deliver(tuple(targets))
    waited = now - first_seen
    if hint is not None:
        detail = f"host {hint!r} from the hint has no exchange"
        reason = contract.REASON_UNKNOWN_HOST
    else:
        detail = f"no known host for instance {event.server_uuid}"
        reason = contract.REASON_NO_HOST
    if waited < policy.no_host_timeout:
        return Retry(attempt + 1, detail)
    return DeadLetter(reason, f"{detail} after {waited:.0f}s")
