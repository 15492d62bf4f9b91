"""Broker users and permissions of a deployment. Pure: it plans, never runs.

As rabbitmqctl commands (``plan``) or as a definitions document for a
broker that loads them at boot (``definitions``).

Least privilege per role, as regular expressions on resource names
(RabbitMQ checks configure/write/read per exchange and queue):
- network user: write the ingress exchange only, and there only routing
  keys `instance.*` (topic permission);
- router: declare the central topology (`evrouter topology --declare`
  runs as this user) and its private placement queue, read ingress and
  lifecycle, write host exchanges, dead-letter, the control fanout
  (resync requests: only routers may ask agents for snapshots) and the
  default exchange (retry parking);
- compute host H: declare, bind and read only its own exchange and queue
  (its host consumer, or `evrouter topology --declare --host H` run as
  this user, creates them) and its agent's control queue, bound to the
  control fanout; write only the lifecycle fanout and the dead-letter
  exchange. It may configure no central entity: its agent and consumer
  only check those passively.
Why the host's entities are the compute user's to declare, not the
router's: declaring a queue with a dead-letter exchange needs read on the
queue, and nobody but H may read H's queue.
Who published an instance event is the broker-validated user_id; the
router trusts lifecycle events of compute user <prefix><host> only for
<host>.

x509 hosts (``x509_hosts``): compute users have no password at all; they
log in with the SASL EXTERNAL mechanism, the broker mapping the CN of the
host's client certificate (CN = <prefix><host>) to the user. RabbitMQ's
add_user wants a password, so the plan gives a random throwaway one and
clears it at once.
"""

import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass


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

    def compute_user(self, host):
        return self.compute_user_prefix + host


def _names(prefix, *alternatives):
    return "^" + re.escape(prefix) + r"\.(" + "|".join(alternatives) + ")$"


def grants(d):
    """(user, configure, write, read, topic grants [(exchange, write, read)])."""
    p = d.prefix
    yield (d.network_user, "^$", _names(p, "ingress"), "^$",
           [(f"{p}.ingress", r"^instance\.", "^$")])
    yield (d.router_user,
           _names(p, "ingress", "lifecycle", "dead-letter", "control",
                  "router", r"router\.probation", r"retry\..*",
                  r"placement\..*"),
           # ingress: retry queues dead-letter into it, and declaring a queue
           # with a dead-letter exchange needs write on that exchange.
           "^(amq\\.default|" + _names(p, "ingress", r"host\..*", "dead-letter",
                                       "control", "router",
                                       r"router\.probation", r"retry\..*",
                                       r"placement\..*")[1:-1] + ")$",
           _names(p, "ingress", "router", r"router\.probation", "lifecycle",
                  "dead-letter", r"retry\..*", r"placement\..*"),
           [])
    for host in d.hosts:
        own = re.escape(f"host.{host}")
        control = re.escape(f"agent.{host}.control")
        yield (d.compute_user(host),
               _names(p, own, own + r"\.events", control),
               # binding a queue needs write on it and read on the exchange
               _names(p, own + r"\.events", control, "lifecycle",
                      "dead-letter"),
               _names(p, own, own + r"\.events", control, "control"),
               [])


def plan(d, password=None):
    """rabbitmqctl argument lists that make the broker match the deployment."""
    commands = []
    if d.vhost != "/":
        commands.append(["add_vhost", d.vhost])
    x509_users = {d.compute_user(h) for h in d.hosts} if d.x509_hosts else set()
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
    x509_users = {d.compute_user(h) for h in d.hosts} if d.x509_hosts else set()
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
            "topic_permissions": topic_permissions}
