"""docker-compose.yml, tested the other way round (no Docker engine here).

Each evrouter service's command from the compose file runs as a local
process with the environment and mounted configuration the file gives it,
against the local RabbitMQ, each as the broker user the file gives it
(least privilege: the users and permissions of `evrouter permissions`,
which deploy/rabbitmq/definitions.json loads into the compose broker).
What a container provides differently is adapted explicitly and only
that: the broker's host name (rabbitmq -> 127.0.0.1) and a virtual host of
the test's own (where `evrouter permissions --apply` gives the compose
file's users their rights), a unique bus prefix, compute host name and
notification names per test run (the network service's notifications go
to the test's guest vhost), and one local port per replica for the
operations endpoint. Then the health endpoints are scraped and one event
goes end to end: a network service notification -> adapter -> routers ->
the compute host's queue.
"""

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from router.bus import contract
from router.cli import COMMANDS
from tests.conftest import collect, wait_for
from tests.functional.test_network_adapter import (  # noqa: F401
    OSLO_URL,
    network_service,
    port,
)
from tests.functional.test_router_ops import free_port, get

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
EVROUTER = {name: svc for name, svc in SERVICES.items() if "build" in svc}
HEALTH_PORT = re.compile(r"127\.0\.0\.1:(\d+)/healthz")
USER = re.compile(r"^rabbit://(.+):[^:@]+@")
BROKER = "@rabbitmq:5672/"


def test_compose_file_is_consistent_with_the_code():
    assert set(EVROUTER) == {"topology", "compute-topology", "router", "agent",
                             "network-adapter"}
    assert SERVICES["router"]["deploy"]["replicas"] == 2
    assert "healthcheck" in SERVICES["rabbitmq"]
    for name, svc in EVROUTER.items():
        assert svc["command"][0] in COMMANDS, f"{name}: unknown subcommand"
        mounts = dict(v.split(":")[1::-1] for v in svc.get("volumes", [])
                      if v.startswith("./"))
        for i, arg in enumerate(svc["command"]):
            if arg == "--config-file":
                path = svc["command"][i + 1]
                assert path in mounts, f"{name}: {path} is not mounted"
                assert (ROOT / mounts[path]).is_file()
        if "healthcheck" in svc:
            # the health check asks the port the service is told to listen on
            port_ = HEALTH_PORT.search(" ".join(svc["healthcheck"]["test"])).group(1)
            listen = [v for k, v in svc.get("environment", {}).items()
                      if k.endswith("__OPS_LISTEN")]
            assert listen and listen[0].endswith(":" + port_), name
    # Every service logs in as the user of its role.
    users = {name: USER.search(svc["environment"]["OS_DEFAULT__TRANSPORT_URL"])[1]
             for name, svc in EVROUTER.items()}
    compute = "evrouter-compute-${COMPUTE_HOST:-compute-1}"
    assert users == {"topology": "evrouter-router", "router": "evrouter-router",
                     "compute-topology": compute, "agent": compute,
                     "network-adapter": "evrouter-network"}
    assert SERVICES["agent"]["environment"]["OS_AGENT__RESYNC_FROM"] == \
        "evrouter-router"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("router", "compute", "network"):
        assert f"COPY {package} {package}" in dockerfile


def local(name, svc, overrides, tmp_path, extra_env=None, *, vhost="/"):
    """The service's compose command as a local process (the broker at
    127.0.0.1, in `vhost`)."""
    mounts = {}
    for v in svc.get("volumes", []):
        src, dst = v.split(":")[:2]
        if src.startswith("./"):
            mounts[dst] = str(ROOT / src[2:])
        else:
            mounts[dst] = str(tmp_path / src.replace("/", "_"))
            os.makedirs(mounts[dst], exist_ok=True)
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (svc.get("environment") or {}).items()})
    for key, value in list(env.items()):
        for container_path, host_path in mounts.items():
            if isinstance(value, str) and value.startswith(container_path + "/"):
                env[key] = host_path + value[len(container_path):]
    env.update(overrides)
    env.update(extra_env or {})
    expand = functools.partial(re.sub, r"\$\{(\w+):-([^}]*)\}",
                               lambda m: env.get(m[1], m[2]))
    for key in svc.get("environment") or {}:
        if key not in overrides and key not in (extra_env or {}):
            env[key] = expand(env[key]).replace(BROKER, f"@127.0.0.1:5672/{vhost}")
    argv = [expand(a) for a in svc["command"]]
    argv = [mounts.get(a, a) for a in argv]
    return subprocess.Popen([sys.executable, "-m", "router.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def libvirtd_available():
    here = pathlib.Path(__file__).parent
    proc = subprocess.run(["sh", str(here / "libvirtd.sh")], capture_output=True,
                          text=True, timeout=900)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def test_broker_definitions_are_the_deployments_permissions():
    from router.permissions import Deployment, grants
    defs = json.loads((ROOT / "deploy" / "rabbitmq" / "definitions.json").read_text())
    ours = {g[0]: g[1:4] for g in grants(Deployment(hosts=("compute-1",)))}
    loaded = {p["user"]: (p["configure"], p["write"], p["read"])
              for p in defs["permissions"] if p["user"] in ours}
    assert loaded == ours
    # the topic permissions too: a host binds the hosts exchange with its
    # own name only, the network user writes instance.* only
    topics = {(g[0], exchange, write, read)
              for g in grants(Deployment(hosts=("compute-1",)))
              for exchange, write, read in g[4]}
    assert {(t["user"], t["exchange"], t["write"], t["read"])
            for t in defs["topic_permissions"] if t["user"] in ours} == topics
    assert {u["name"] for u in defs["users"]} == set(ours) | {"openstack"}
    rabbitmq = SERVICES["rabbitmq"]["volumes"]
    assert any(v.startswith("./deploy/rabbitmq/definitions.json:") for v in rabbitmq)


@pytest.fixture
def vhost():
    """A virtual host of the test's own where the compose file's users get
    their rights; users this test created go with it."""
    name = f"evt-compose-{uuid.uuid4().hex[:8]}"
    before = _users()
    yield name
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True)
    for user in _users() - before:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True)


def _users():
    done = subprocess.run(["rabbitmqctl", "list_users", "-q", "--no-table-headers"],
                          capture_output=True, text=True, check=True)
    return {line.split("\t")[0] for line in done.stdout.splitlines() if line}


def test_compose_services_run_as_local_processes(bus, network_service,  # noqa: F811
                                                 vhost, tmp_path):
    notifier, names = network_service
    host = f"compose-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "permissions", "--apply", "--vhost", vhost,
         "--bus-prefix", bus.prefix, "--host", host, "--password", "evrouter-dev"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    overrides = {
        # the network service's own bus: the test's guest vhost
        "OS_NETWORK_ADAPTER__NOTIFICATION_TRANSPORT_URL": OSLO_URL,
        "OS_BUS__PREFIX": bus.prefix,
        "OS_NETWORK_ADAPTER__EXCHANGE": names["exchange"],
        "OS_NETWORK_ADAPTER__TOPICS": names["topic"],
        "OS_NETWORK_ADAPTER__POOL": names["pool"],
        "COMPUTE_HOST": host,
    }
    procs = []
    try:
        for name in ("topology", "compute-topology"):
            setup = local(name, EVROUTER[name], overrides, tmp_path, vhost=vhost)
            out, _ = setup.communicate(timeout=60)
            assert setup.returncode == 0, out

        router_ports = [free_port() for _ in range(SERVICES["router"]["deploy"]["replicas"])]
        for p in router_ports:
            procs.append(local("router", EVROUTER["router"], overrides, tmp_path,
                               {"OS_ROUTER__OPS_LISTEN": f"127.0.0.1:{p}"}, vhost=vhost))
        procs.append(local("network-adapter", EVROUTER["network-adapter"], overrides,
                           tmp_path, vhost=vhost))
        health = [f"http://127.0.0.1:{p}/healthz" for p in router_ports]
        available, why = libvirtd_available()
        if available:
            agent_port = free_port()
            procs.append(local("agent", EVROUTER["agent"], overrides, tmp_path,
                               {"OS_AGENT__OPS_LISTEN": f"127.0.0.1:{agent_port}"},
                               vhost=vhost))
            health.append(f"http://127.0.0.1:{agent_port}/healthz")
        else:
            print(f"\nCOMPOSE AGENT NOT STARTED: no libvirtd here ({why})")
        for url in health:
            wait_for(lambda url=url: get(url)[0] == 200, timeout=30,
                     what=f"{url} healthy")

        def adapter_listening():
            import kombu
            with kombu.Connection(bus.url) as conn:
                try:
                    conn.channel().queue_declare(names["pool"], passive=True)
                    return True
                except conn.channel_errors:
                    return False
        wait_for(adapter_listening, timeout=30, what="the adapter's notification queue")

        server = str(uuid.uuid4())
        ctxt = {"user_id": "admin", "project_id": "p"}
        down, active = (dict(port(server, s), **{"binding:host_id": host})
                        for s in ("DOWN", "ACTIVE"))
        notifier.info(ctxt, "port.create.end", {"port": down})
        notifier.info(ctxt, "port.update.end", {"port": active})
        compute_url = f"amqp://evrouter-compute-{host}:evrouter-dev@127.0.0.1:5672/{vhost}"
        [m] = collect(compute_url, bus.topology.host_queue_name(host), 1, timeout=30)
        event = contract.decode(m.body).payload
        assert (event.name, event.server_uuid, event.host) == \
            ("network-vif-plugged", server, host)
        # deploy/evrouter.conf turns the journal on: the adapter and a
        # router wrote their hops, each as its own user; the router user
        # reads them (`evrouter trace`, as in a router container)
        trace = [sys.executable, "-m", "router.cli", "trace", server, "--json",
                 "--since", "10m", "--config-file", str(ROOT / "deploy" / "evrouter.conf"),
                 "--bus-prefix", bus.prefix, "--transport-url",
                 f"rabbit://evrouter-router:evrouter-dev@127.0.0.1:5672/{vhost}"]

        def traced():
            done = subprocess.run(trace, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            hops = [json.loads(line) for line in done.stdout.splitlines()]
            return hops if len(hops) >= 2 else None
        hops = wait_for(traced, timeout=20, interval=0.2,
                        what="the adapter's and a router's hops in the journal")
        assert [(h["hop"], h["user"], h["mid"]) for h in hops] == [
            ("published", "evrouter-network", m.properties["message_id"]),
            ("routed", "evrouter-router", m.properties["message_id"])], hops
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
        assert "cannot write to" not in output, output     # the journal
