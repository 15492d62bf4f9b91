"""Every exchange, queue and routing key of the bus, declared in one place.

Pure: this builds kombu entity descriptions and plain dicts; nothing here
talks to a broker until ``declare`` is handed a channel.

Routing keys have a fixed number of words and bindings use ``*`` only, so they
mean the same on RabbitMQ and on kombu's memory transport (which differ on
``#`` matching zero words).
"""

import re
import uuid
from dataclasses import dataclass, field

from amqp.exceptions import AccessRefused, NotFound
from kombu import Exchange, Queue, binding

from router.bus.contract import HOST_PATTERN

HOST_QUEUE_SUFFIX = ".events"       # Topology.host_queue_name

QUEUE_TYPES = ("classic", "quorum")

# A binding to an exchange not the declarer's that cannot be made: the
# exchange not found (py-amqp's 404, which closes its channel; kombu's
# memory transport's KeyError) or the binding refused (403: the host's
# permissions from before the hosts exchange).
_UNBOUND = (NotFound, AccessRefused, KeyError)

# A quorum queue dead-letters at-most-once by default: a message expiring or
# over its delivery limit while the leader changes can vanish. at-least-once
# keeps it in the source queue until the dead-letter target confirmed it;
# RabbitMQ (3.10 to 4.x) accepts that only with the reject-publish overflow
# (no max-length here, so nothing is ever refused for it). Arguments cannot
# change on an existing queue: quorum queues declared without these must be
# drained and re-declared (see the README, "RabbitMQ cluster").
_AT_LEAST_ONCE_DEAD_LETTERING = {"x-dead-letter-strategy": "at-least-once",
                                 "x-overflow": "reject-publish"}
INSTANCE_BINDING = "instance.*"
RETRY_ROUTING_KEY = "instance.retry"


def instance_routing_key(name):
    """Routing key of an instance event, on ingress and host exchanges."""
    return "instance." + name


PREFIX_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z"


@dataclass(frozen=True)
class Topology:
    """Names and arguments of the bus, under one prefix.

    Tests give each run its own prefix so they can run in parallel.
    """

    prefix: str = "evrouter"
    queue_type: str = "classic"
    # RabbitMQ 3.10 quorum queues have no delivery limit by default, so a
    # poison message would be redelivered forever.
    delivery_limit: int = 5
    host_message_ttl_ms: int = 600_000
    retry_delays_ms: tuple = field(default=(500, 1000, 2000, 4000, 8000, 16000))

    def __post_init__(self):
        # Every name is <prefix>.<something>: a prefix like a host name
        # keeps them within AMQP's 255 bytes and the permission patterns
        # exact; RabbitMQ keeps amq.* for itself (kombu skipped declaring
        # such an exchange without a word: `topology --declare` said
        # "declared" of exchanges that did not exist).
        if not (type(self.prefix) is str and re.search(PREFIX_PATTERN, self.prefix)):
            raise ValueError(
                f"not a valid bus prefix: {self.prefix!r} (letters, digits, '_', "
                f"'.', '-', beginning with a letter or digit; up to 100)")
        if self.prefix.lower().startswith("amq."):
            raise ValueError(f"bus prefix {self.prefix!r}: RabbitMQ keeps names "
                             f"beginning with 'amq.' for itself")
        if self.queue_type not in QUEUE_TYPES:
            raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, "
                             f"not {self.queue_type!r}")
        if self.delivery_limit < 1:
            raise ValueError("delivery_limit must be at least 1")

    # --- names --------------------------------------------------------------
    @property
    def ingress_exchange_name(self):
        return f"{self.prefix}.ingress"

    @property
    def router_queue_name(self):
        return f"{self.prefix}.router"

    @property
    def probation_queue_name(self):
        return f"{self.prefix}.router.probation"

    @property
    def lifecycle_exchange_name(self):
        return f"{self.prefix}.lifecycle"

    @property
    def dead_letter_exchange_name(self):
        return f"{self.prefix}.dead-letter"

    @property
    def dead_letter_queue_name(self):
        return f"{self.prefix}.dead-letter"

    @property
    def control_exchange_name(self):
        """Fanout from the routers to every agent (resync requests)."""
        return f"{self.prefix}.control"

    def agent_control_queue_name(self, host, session):
        """One per agent session: `session` is 32 hex digits (a uuid4's),
        the form router/permissions.py lets host's user declare."""
        return f"{self.prefix}.agent.{host}.control.{session}"

    @property
    def hosts_exchange_name(self):
        """The one exchange the routers publish host copies to, the host
        as routing key; each host's queue is bound to it with its own name."""
        return f"{self.prefix}.hosts"

    def host_exchange_name(self, host):
        return f"{self.prefix}.host.{host}"

    def host_queue_name(self, host):
        return f"{self.prefix}.host.{host}{HOST_QUEUE_SUFFIX}"

    def retry_queue_name(self, delay_ms):
        # Parking queues are quorum queues whatever queue_type says (see
        # retry_queue). A classic topology's had this name without the
        # suffix before, as classic queues: a queue cannot change type in
        # place, so the new ones take a new name and the old ones drain.
        suffix = "" if self.queue_type == "quorum" else ".quorum"
        return f"{self.prefix}.retry.{delay_ms}ms{suffix}"

    def retry_delay_ms(self, attempt):
        """Backoff for the n-th retry (1-based): the tiers, then the last."""
        delays = self.retry_delays_ms
        return delays[min(attempt, len(delays)) - 1]

    # --- entities -----------------------------------------------------------
    def _queue_arguments(self, **extra):
        args = {"x-queue-type": self.queue_type,
                "x-dead-letter-exchange": self.dead_letter_exchange_name}
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = self.delivery_limit
            args.update(_AT_LEAST_ONCE_DEAD_LETTERING)
        args.update(extra)
        return args

    def ingress_exchange(self):
        return Exchange(self.ingress_exchange_name, "topic", durable=True)

    def lifecycle_exchange(self):
        return Exchange(self.lifecycle_exchange_name, "fanout", durable=True)

    def dead_letter_exchange(self):
        return Exchange(self.dead_letter_exchange_name, "fanout", durable=True)

    def control_exchange(self):
        return Exchange(self.control_exchange_name, "fanout", durable=True)

    def hosts_exchange(self, declare=True):
        """A topic exchange, though every key is a whole host name: RabbitMQ
        checks topic permissions (a host's user may bind its own name only,
        router/permissions.py) on topic exchanges alone. Host names have no
        `*` or `#` (contract.HOST_PATTERN), so a binding key matches its
        host's copies and nothing else. declare=False: a host's user may
        bind to it but not declare it (the central topology's)."""
        return Exchange(self.hosts_exchange_name, "topic", durable=True,
                        no_declare=not declare)

    def host_exchange(self, host):
        return Exchange(self.host_exchange_name(host), "topic", durable=True)

    def router_queue(self):
        return Queue(self.router_queue_name, self.ingress_exchange(),
                     routing_key=INSTANCE_BINDING, durable=True,
                     queue_arguments=self._queue_arguments())

    def probation_queue(self):
        """Where redelivered ingress messages are routed one at a time.

        A message that came back unsettled (its router died) waits here,
        with its redeliveries counted, and each router takes one at a time
        (prefetch 1): if it is the one that kills routers, nothing else is
        in flight beside it to be counted with it. Fed through the default
        exchange, so it has no binding.
        """
        return Queue(self.probation_queue_name, exchange=None, durable=True,
                     queue_arguments=self._queue_arguments())

    def dead_letter_queue(self):
        return Queue(self.dead_letter_queue_name, self.dead_letter_exchange(),
                     routing_key="", durable=True,
                     queue_arguments={"x-queue-type": self.queue_type})

    def host_queue(self, host):
        """Bound to the central hosts exchange with the host's name (what
        the routers publish to: a host whose queue is not bound there is a
        return, never a channel closed), and to the host's own exchange
        with `instance.*` (whoever publishes there directly: a router of an
        earlier release, a test harness). Stale events expire into the
        dead-letter exchange instead of piling up while a host is away."""
        return Queue(self.host_queue_name(host), durable=True,
                     bindings=[binding(self.host_exchange(host),
                                       routing_key=INSTANCE_BINDING),
                               binding(self.hosts_exchange(declare=False),
                                       routing_key=host)],
                     queue_arguments=self._queue_arguments(
                         **{"x-message-ttl": self.host_message_ttl_ms}))

    def retry_queue(self, delay_ms):
        """Parking queue: nobody consumes it; on expiry the broker moves
        the message back to ingress. One queue per delay, so a short delay
        never waits behind a long one at the head of the queue.

        Always a quorum queue with at-least-once dead-lettering, because
        here dead-lettering is the delivery path: a classic queue
        dead-letters at-most-once, so a parked event that expires while the
        router queue refuses it (reject-publish at its limit, no leader in
        a failover, deleted) was silently dropped by the broker. A quorum
        source keeps it until the router queue confirms it, and tries again
        every `dead_letter_worker_publisher_confirm_timeout` (RabbitMQ's
        advanced.config; 180 s by default, deploy/rabbitmq/advanced.config
        sets 5 s). A quorum queue of one member works on a single node.
        """
        args = {"x-queue-type": "quorum",
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": self.ingress_exchange_name,
                "x-dead-letter-routing-key": RETRY_ROUTING_KEY,
                **_AT_LEAST_ONCE_DEAD_LETTERING}
        return Queue(self.retry_queue_name(delay_ms), exchange=None,
                     durable=True, queue_arguments=args)

    def placement_queue(self, consumer_id):
        """A router's private view of the lifecycle fanout (volatile)."""
        return Queue(f"{self.prefix}.placement.{consumer_id}",
                     self.lifecycle_exchange(), durable=False,
                     exclusive=True, auto_delete=True)

    def agent_control_queue(self, host, session):
        """Where one session of host's agent hears the routers' resync
        requests: exclusive, named per session, gone with its connection.

        Never shared between sessions: a session whose connection is
        half-open (the agent saw it die, the broker has not yet) still
        holds its consumer, and on a shared queue the broker hands it every
        other request, which nobody ever reads (issue 19 item 8). With a
        queue per session the fanout gives the stale queue a copy of its
        own and the live session misses nothing. (A single-active-consumer
        queue would be worse: the stale consumer stays the active one until
        the broker reaps it.) The exchange is declared by the central
        topology only; an agent's user may not configure it.
        """
        exchange = Exchange(self.control_exchange_name, "fanout",
                            durable=True, no_declare=True)
        return Queue(self.agent_control_queue_name(host, session), exchange,
                     routing_key="", durable=False, exclusive=True,
                     auto_delete=True)

    def central(self):
        """Everything the router needs, in declaration order."""
        return ([self.ingress_exchange(), self.lifecycle_exchange(),
                 self.dead_letter_exchange(), self.control_exchange(),
                 self.hosts_exchange()],
                [self.dead_letter_queue(), self.router_queue(),
                 self.probation_queue()]
                + [self.retry_queue(d) for d in sorted(set(self.retry_delays_ms))])

    def for_host(self, host):
        """A host's exchange and queue; ValueError for a host name that
        cannot have them (check_host)."""
        self.check_host(host)
        return [self.host_exchange(host)], [self.host_queue(host)]

    def check_host(self, host):
        """Raise ValueError if `host` cannot have this topology's per-host
        objects: a name the routers never route to (a `*` or `#` word would
        also bind the host's queue to every host's copies: `evrouter
        topology --declare --host '#'`), or one whose exchange, queue or
        agent control queue name would pass AMQP's 255 bytes with this
        prefix (the agent's declare failed in every session)."""
        if not (type(host) is str and re.search(HOST_PATTERN, host)):
            raise ValueError(
                f"not a valid host name: {host!r} (letters, digits, '_', '.', "
                f"'-', beginning with a letter or digit; up to 200): the "
                f"routers route to no other name (router/bus/contract.py "
                f"HOST_PATTERN)")
        longest = max((self.host_queue_name(host),
                       self.agent_control_queue_name(host, "0" * 32)),
                      key=lambda name: len(name.encode()))
        if len(longest.encode()) > 255:
            raise ValueError(
                f"host name {host!r} too long for prefix {self.prefix!r}: "
                f"{longest!r} would be {len(longest.encode())} bytes, AMQP "
                f"allows 255")

    def describe(self, hosts=()):
        """Plain rows for `evrouter topology`: (what, name, type, details)."""
        exchanges, queues = self.central()
        for host in hosts:
            e, q = self.for_host(host)
            exchanges += e
            queues += q
        rows = [("exchange", e.name, e.type, "durable") for e in exchanges]
        for q in queues:
            bound = "; ".join(f"bound to {e.name} key {key!r}"
                              for e, key in queue_bindings(q)) \
                or "default exchange"
            args = ", ".join(f"{k}={v}" for k, v in
                             sorted((q.queue_arguments or {}).items()))
            rows.append(("queue", q.name, q.queue_arguments.get(
                "x-queue-type", "classic"), f"{bound}; {args}"))
        return rows


def queue_bindings(queue):
    """[(exchange, routing key)] a kombu Queue is bound with: its own
    exchange's, or each of its `bindings`."""
    if queue.bindings:
        return sorted(((b.exchange, b.routing_key or "") for b in queue.bindings),
                      key=lambda bound: (bound[0].name, bound[1]))
    if queue.exchange is not None and queue.exchange.name:
        return [(queue.exchange, queue.routing_key or "")]
    return []


def declare(channel, exchanges, queues):
    """Declare entities idempotently (same arguments: no-op on the broker).

    A queue's binding to an exchange not the declarer's to declare
    (``no_declare``: the central hosts exchange, for a host's user) is made
    if it can be. If that exchange does not exist, or the binding is refused
    (403: permissions applied before the hosts exchange), the binding is
    returned rather than raised, and the channel the error closed is
    replaced: a host started before the central topology (or its new
    permissions) consumes what reaches its own exchange and is bound by its
    queue watch (router/bus/consuming.py) once it can be. Returns
    [(queue name, exchange name, key, why)] not bound.
    """
    for exchange in exchanges:
        exchange(channel).declare()
    missing = []
    for queue in queues:
        theirs = [b for b in queue.bindings if b.exchange.no_declare]
        if not theirs:
            queue(channel).declare()
            continue
        bound = queue(channel)      # a copy: its bindings are its own to set
        bound.bindings = {b for b in queue.bindings if not b.exchange.no_declare}
        bound.declare()
        for b in theirs:
            try:
                channel.queue_bind(queue=queue.name, exchange=b.exchange.name,
                                   routing_key=b.routing_key or "")
            except _UNBOUND as exc:
                why = ("it does not exist" if isinstance(exc, (NotFound, KeyError))
                       else f"refused: {exc}")
                missing.append((queue.name, b.exchange.name, b.routing_key, why))
                if not isinstance(exc, KeyError):   # py-amqp: closed by it
                    channel = channel.connection.channel()
    return missing


def parking_refusal(conn, topo):
    """None if the broker dead-letters the parking queues at-least-once;
    otherwise why it may not (a sentence for the operator).

    RabbitMQ 3.10 to 3.13 falls back to at-most-once, with one line in its
    own log and nothing a client can see, when its stream_queue feature
    flag is off (a broker first created before 3.9 and never told
    `rabbitmqctl enable_feature_flag all`). No AMQP method reads a feature
    flag, but declaring a stream queue fails exactly when it is off. On a
    connection of its own (`conn` is cloned): the broker may answer with a
    connection error. The probe's name is under the retry queues', which
    the router user may configure.
    """
    probe = conn.clone()
    name = f"{topo.prefix}.retry.probe-{uuid.uuid4().hex[:12]}"
    try:
        probe.connect()
        channel = probe.channel()
        channel.queue_declare(name, durable=True, auto_delete=False,
                              arguments={"x-queue-type": "stream",
                                         # one member: on a cluster, no
                                         # replicas to place or wait for
                                         "x-initial-cluster-size": 1})
        channel.queue_delete(name)
        return None
    except probe.connection_errors + probe.channel_errors as exc:
        return (f"declaring a stream queue failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}): if the broker's stream_queue feature flag "
                f"is off, it dead-letters the parking queues at-most-once and "
                f"a parked event that expires while the router queue refuses "
                f"it is lost; run `rabbitmqctl enable_feature_flag all`")
    finally:
        probe.release()
