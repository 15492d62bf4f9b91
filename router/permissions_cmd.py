"""`evrouter permissions`: print, or apply, the deployment's broker security."""

import json
import shlex
import subprocess

from oslo_config import cfg

from router.permissions import Deployment, Throwaway, definitions, plan
from router.service_entry import fail, parse

cli_opts = [
    cfg.StrOpt("vhost", default="/", help="RabbitMQ virtual host."),
    cfg.StrOpt("network-user", default="evrouter-network",
               help="Broker user of the network side (publishes events)."),
    cfg.StrOpt("router-user", default="evrouter-router",
               help="Broker user of the router service."),
    cfg.StrOpt("compute-user-prefix", default="evrouter-compute-",
               help="Compute host H logs in as <prefix>H."),
    cfg.MultiStrOpt("host", default=[], help="A compute host (repeatable)."),
    cfg.StrOpt("password", secret=True,
               help="Also create the users with this password (development "
                    "and tests; in production create users your own way)."),
    cfg.BoolOpt("x509-hosts", default=False,
                help="Compute hosts log in with their client certificate "
                     "(TLS, [bus] ssl_login = external; the certificate names "
                     "<prefix>H in its CN or subjectAltName): their users are "
                     "created without a password."),
    cfg.BoolOpt("x509-services", default=False,
                help="The router and network users log in with client "
                     "certificates too: created without a password (a broker "
                     "with fail_if_no_peer_cert = true, no password anywhere)."),
    cfg.StrOpt("node", help="RabbitMQ node rabbitmqctl talks to with "
                            "--apply (rabbitmqctl -n; default: its own)."),
    cfg.BoolOpt("apply", default=False,
                help="Run the commands with rabbitmqctl instead of printing."),
    cfg.BoolOpt("definitions", default=False,
                help="Print a RabbitMQ definitions document (JSON, for "
                     "load_definitions) instead; needs --password."),
]


def main(argv):
    conf = parse(argv, "evrouter permissions",
                 "Print (or --apply) the RabbitMQ users, vhost permissions and "
                 "topic permissions of an evrouter deployment.", cli_opts=cli_opts)
    if not conf.vhost:
        return fail("--vhost: may not be empty (RabbitMQ's default vhost is '/')")
    try:
        deployment = Deployment(
            prefix=conf.bus.prefix, vhost=conf.vhost,
            network_user=conf.network_user, router_user=conf.router_user,
            compute_user_prefix=conf.compute_user_prefix,
            hosts=tuple(conf.host), x509_hosts=conf.x509_hosts,
            x509_services=conf.x509_services)
    except ValueError as exc:
        return fail(f"--host: {exc}")
    if conf.definitions:
        if not conf.password:
            return fail("--definitions needs --password (the users' password)")
        print(json.dumps(definitions(deployment, conf.password), indent=2))
        return 0
    commands = plan(deployment, conf.password)
    ctl = ["rabbitmqctl"] + (["-n", conf.node] if conf.node else [])
    if not conf.apply:
        for args in commands:
            if isinstance(args[-1], Throwaway):     # cleared on the next line
                print(shlex.join(ctl + ctl_args(args[:-1])) + ' "$(openssl rand -hex 24)"')
                continue
            shown = ["<password>" if a == conf.password and conf.password else a
                     for a in args]
            print(shlex.join(ctl + ctl_args(shown)))
        return 0
    existing = {"add_user": _listed(ctl, "list_users"),
                "add_vhost": _listed(ctl, "list_vhosts")}
    if None in existing.values():
        return fail("rabbitmqctl cannot list users and vhosts: is this the broker "
                    "host, and are you allowed to run rabbitmqctl?", 1)
    for args in commands:
        if args[0] in existing and args[1] in existing[args[0]]:
            continue        # users and vhosts are created once, never reset
        done = subprocess.run([*ctl, *ctl_args(args)], capture_output=True, text=True)
        if done.returncode != 0:
            return fail(f"rabbitmqctl {args[0]} failed: "
                        f"{done.stderr.strip() or done.stdout.strip()}", 1)
        shown = args[1:2] if args[0] == "add_user" else args[1:5]    # no password
        print(f"applied: rabbitmqctl {args[0]} {' '.join(shown)}")
    return 0


def ctl_args(args):
    """A plan's command as rabbitmqctl must be given it: its options first,
    then `--`, then the names, passwords and patterns. rabbitmqctl takes any
    argument that begins with '-' for an option: a random password did (1
    user in 64: `add_user` failed "Invalid options"), and so would an
    operator's password or a user name."""
    name, rest = args[0], list(args[1:])
    options = []
    if rest[:1] == ["-p"]:
        options, rest = rest[:2], rest[2:]
    if "--apply-to" in rest:
        i = rest.index("--apply-to")
        options, rest = options + rest[i:i + 2], rest[:i] + rest[i + 2:]
    return [name, *options, "--", *rest]


def _listed(ctl, what):
    done = subprocess.run([*ctl, what, "-q", "--no-table-headers"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return {line.split("\t")[0] for line in done.stdout.splitlines() if line}
