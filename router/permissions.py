"""Broker users and permissions of a deployment. Pure: it plans, never runs.

As rabbitmqctl commands (``plan``) or as a definitions document for a
broker that loads them at boot (``definitions``).

Least privilege per role, as regular expressions on resource names
(RabbitMQ checks configure/write/read per exchange and queue):
- network user: write the ingress exchange only, and there only routing
  keys `instance.*` (topic permission);
- router: declare the central topology (`evrouter topology --declare`
  runs as this user) and its private placement queue, read ingress and
  lifecycle, write the hosts exchange, dead-letter, the control fanout
  (resync requests: only routers may ask agents for snapshots) and the
  default exchange (retry parking);
- compute host H: declare, bind and read only its own exchange and queue
  (its host consumer, or `evrouter topology --declare --host H` run as
  this user, creates them) and its agent's control queues (one per
  session, `<prefix>.agent.H.control.<32 hex digits>`), bound to the
  control fanout; bind its queue to the hosts exchange `<prefix>.hosts`
  with the key H alone (a topic permission: read `^H$`, so no host may
  bind another's name or a wildcard and take its copies); write only the
  lifecycle fanout and the dead-letter exchange. It may configure no
  central entity: its agent and consumer only check those passively.
- every user may write the journal exchange `<prefix>.journal` and those of
  its index, `<prefix>.journal.index` and `<prefix>.journal.batches` (each
  part appends its hops; router/journal.py); the router declares them and
  their streams and may read the streams (`evrouter trace`). A record says which
  broker user wrote it (the validated user_id of its batch), so a hop one
  user claims for another part is visible as such.
Why the host's entities are the compute user's to declare, not the
router's: declaring a queue with a dead-letter exchange needs read on the
queue, and nobody but H may read H's queue.
Who published an instance event is the broker-validated user_id; the
router trusts lifecycle events of compute user <prefix><host> only for
<host>.

x509 hosts (``x509_hosts``): compute users have no password at all; they
log in with the SASL EXTERNAL mechanism, the broker mapping the host's
client certificate (its CN, or a subjectAltName) to the user
<prefix><host>. ``x509_services`` does the same for the router and network
users. RabbitMQ's add_user wants a password, so the plan gives a random
throwaway one and clears it at once.

Who may write what, per message kind that names a host (the router and
the agents also check the broker-validated user_id, see router/routing.py):
- lifecycle events, snapshots, announcements (lifecycle fanout): every
  compute user may write the exchange; the router believes host H's claims
  only from <prefix>H;
- instance events with a host hint (ingress): the network user only,
  routing keys instance.* (topic permission);
- resync requests (control fanout, into each agent's control queue): the
  router user only; agents also want its user_id;
- a host's queue: only the router user writes the hosts exchange (and
  host exchanges, for routers of an earlier release and the tests' direct
  publishers: a host's queue is bound to its own exchange too), and nobody
  but the router writes the default exchange (publishing to a queue by
  name needs write on amq.default, not on the queue), so what a host
  consumer takes was routed by a router.
"""

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass

from router.bus.topology import HOST_QUEUE_SUFFIX, Topology


class Throwaway(str):
    """A random password that is cleared right after add_user: never shown."""


@dataclass(frozen=True)
class Deployment:
    prefix: str = "evrouter"
    vhost: str = "/"
    network_user: str = "evrouter-network"
    router_user: str = "evrouter-router"
    compute_user_prefix: str = "evrouter-compute-"
    hosts: tuple = ()
    x509_hosts: bool = False
    # The router and network users log in with certificates too: nobody
    # has a password (a broker with fail_if_no_peer_cert = true).
    x509_services: bool = False

    def __post_init__(self):
        topo = Topology(prefix=self.prefix)
        for host in self.hosts:
            topo.check_host(host)       # routable, and its names fit
        # Host H's exchange is <prefix>.host.H and its queue
        # <prefix>.host.H.events: a host named "b.events" would be granted
        # host b's queue as its own exchange (read, delete it). Only the
        # grants need this; the topology takes such a host.
        bad = [h for h in self.hosts if h.endswith(HOST_QUEUE_SUFFIX)]
        if bad:
            raise ValueError(f"a host name may not end in {HOST_QUEUE_SUFFIX!r}: "
                             f"{', '.join(map(repr, bad))} (host {bad[0][:-7]!r}'s "
                             f"queue would be its exchange)")

    def compute_user(self, host):
        return self.compute_user_prefix + host


def _names(prefix, *alternatives):
    return "^" + re.escape(prefix) + r"\.(" + "|".join(alternatives) + ")$"


# the journal's exchange and stream, its index's, and the exchange of
# indexed batches (router/journal.py)
JOURNAL = r"journal(\.index|\.batches)?"


def grants(d):
    """(user, configure, write, read, topic grants [(exchange, write, read)])."""
    p = d.prefix
    # journal: the exchange of the journal of hops (router/journal.py),
    # which every part writes; the router declares it and its stream (of
    # the same name) and may read it (`evrouter trace`).
    yield (d.network_user, "^$", _names(p, "ingress", JOURNAL), "^$",
           [(f"{p}.ingress", r"^instance\.", "^$")])
    yield (d.router_user,
           _names(p, "ingress", "lifecycle", "dead-letter", "control", "hosts",
                  "router", r"router\.probation", r"retry\..*",
                  r"placement\..*", JOURNAL),
           # ingress: retry queues dead-letter into it, and declaring a queue
           # with a dead-letter exchange needs write on that exchange.
           "^(amq\\.default|" + _names(p, "ingress", "hosts", r"host\..*",
                                       "dead-letter",
                                       "control", "router",
                                       r"router\.probation", r"retry\..*",
                                       r"placement\..*", JOURNAL)[1:-1] + ")$",
           _names(p, "ingress", "router", r"router\.probation", "lifecycle",
                  "dead-letter", r"retry\..*", r"placement\..*", JOURNAL),
           [])
    for host in d.hosts:
        own = re.escape(f"host.{host}")
        # One control queue per agent session, named by a uuid4's hex;
        # the plain name is what agents before issue 19 declared (kept so
        # the permissions can be applied before the agents are upgraded).
        control = re.escape(f"agent.{host}.control") + r"(\.[0-9a-f]{32})?"
        yield (d.compute_user(host),
               _names(p, own, own + r"\.events", control),
               # binding a queue needs write on it and read on the exchange
               _names(p, own + r"\.events", control, "lifecycle",
                      "dead-letter", JOURNAL),
               _names(p, own, own + r"\.events", control, "control", "hosts"),
               # the hosts exchange: bound with its own name only
               [(f"{p}.hosts", "^$", "^" + re.escape(host) + "$")])


# The dead-letter queue is the one queue every compute user may fill (a host
# consumer dead-letters what it cannot take) and nothing consumes on its
# own: bounded, so one compromised host cannot fill the broker's memory or
# disk until its alarm blocks every publisher; the oldest go first.
DEAD_LETTER_MAX_LENGTH = 1_000_000
DEAD_LETTER_MAX_BYTES = 1 << 30


def policies(d):
    """[(name, pattern, definition)]: what the deployment's queues need."""
    return [(f"{d.prefix}-dead-letter-bound",
             "^" + re.escape(f"{d.prefix}.dead-letter") + "$",
             {"max-length": DEAD_LETTER_MAX_LENGTH,
              "max-length-bytes": DEAD_LETTER_MAX_BYTES,
              "overflow": "drop-head"})]


def _x509_users(d):
    users = {d.compute_user(h) for h in d.hosts} if d.x509_hosts else set()
    if d.x509_services:
        users |= {d.network_user, d.router_user}
    return users


def plan(d, password=None):
    """rabbitmqctl argument lists that make the broker match the deployment."""
    commands = []
    if d.vhost != "/":
        commands.append(["add_vhost", d.vhost])
    x509_users = _x509_users(d)
    for user, configure, write, read, topics in grants(d):
        if user in x509_users:
            commands.append(["add_user", user, Throwaway(secrets.token_urlsafe(24))])
            commands.append(["clear_password", user])
        elif password is not None:
            commands.append(["add_user", user, password])
        commands.append(["set_permissions", "-p", d.vhost, user,
                         configure, write, read])
        for exchange, t_write, t_read in topics:
            commands.append(["set_topic_permissions", "-p", d.vhost, user,
                             exchange, t_write, t_read])
    for name, pattern, definition in policies(d):
        commands.append(["set_policy", "-p", d.vhost, name, pattern,
                         json.dumps(definition, sort_keys=True),
                         "--apply-to", "queues"])
    return commands


def password_hash(password, salt):
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + pw))."""
    digest = hashlib.sha256(salt + password.encode()).digest()
    return base64.b64encode(salt + digest).decode()


def definitions(d, password, salt=None):
    """The deployment as a RabbitMQ definitions document (load_definitions).

    For a broker that starts with its users in place (docker-compose),
    where nobody runs rabbitmqctl. One password for every user: meant for
    development; give each user its own in production.
    """
    users, permissions, topic_permissions = [], [], []
    x509_users = _x509_users(d)
    for user, configure, write, read, topics in grants(d):
        users.append({"name": user, "tags": "",
                      "hashing_algorithm": "rabbit_password_hashing_sha256",
                      # an empty hash: no password login (x509 only)
                      "password_hash": "" if user in x509_users else password_hash(
                          password, salt if salt is not None
                          else os.urandom(4))})
        permissions.append({"user": user, "vhost": d.vhost,
                            "configure": configure, "write": write,
                            "read": read})
        for exchange, t_write, t_read in topics:
            topic_permissions.append({"user": user, "vhost": d.vhost,
                                      "exchange": exchange, "write": t_write,
                                      "read": t_read})
    return {"users": users, "vhosts": [{"name": d.vhost}],
            "permissions": permissions,
            "topic_permissions": topic_permissions,
            "policies": [{"vhost": d.vhost, "name": name, "pattern": pattern,
                          "apply-to": "queues", "definition": definition,
                          "priority": 0}
                         for name, pattern, definition in policies(d)]}
