"""docker-compose.yml, tested the other way round (no Docker engine here).

Each evrouter service's command from the compose file runs as a local
process with the environment and mounted configuration the file gives it,
against the local RabbitMQ. What a container provides differently is
adapted explicitly and only that: the broker's host name (rabbitmq ->
127.0.0.1), a unique bus prefix and notification names per test run, and
one local port per replica for the operations endpoint. Then the health
endpoints are scraped and one event goes end to end: a network service
notification -> adapter -> routers -> the compute host's queue.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import uuid

import yaml

from router.bus import contract
from router.cli import COMMANDS
from tests.conftest import collect, wait_for
from tests.functional.test_network_adapter import network_service, port  # noqa: F401
from tests.functional.test_router_ops import free_port, get

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
EVROUTER = {name: svc for name, svc in SERVICES.items() if "build" in svc}
HEALTH_PORT = re.compile(r"127\.0\.0\.1:(\d+)/healthz")


def test_compose_file_is_consistent_with_the_code():
    assert set(EVROUTER) == {"topology", "router", "agent", "network-adapter"}
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
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("router", "compute", "network"):
        assert f"COPY {package} {package}" in dockerfile


def local(name, svc, overrides, tmp_path, extra_env=None):
    """The service's compose command as a local process."""
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
    argv = [re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), a)
            for a in svc["command"]]
    argv = [mounts.get(a, a) for a in argv]
    return subprocess.Popen([sys.executable, "-m", "router.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def libvirtd_available():
    here = pathlib.Path(__file__).parent
    proc = subprocess.run(["sh", str(here / "libvirtd.sh")], capture_output=True,
                          text=True, timeout=900)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def test_compose_services_run_as_local_processes(bus, network_service,  # noqa: F811
                                                 tmp_path):
    notifier, names = network_service
    host = f"compose-{uuid.uuid4().hex[:6]}"
    bus.own(exchanges=[bus.topology.host_exchange_name(host)],
            queues=[bus.topology.host_queue_name(host)])
    overrides = {
        "OS_DEFAULT__TRANSPORT_URL": "rabbit://guest:guest@127.0.0.1:5672/",
        "OS_BUS__PREFIX": bus.prefix,
        "OS_NETWORK_ADAPTER__EXCHANGE": names["exchange"],
        "OS_NETWORK_ADAPTER__TOPICS": names["topic"],
        "OS_NETWORK_ADAPTER__POOL": names["pool"],
        "COMPUTE_HOST": host,
    }
    conf = (ROOT / "deploy" / "evrouter.conf").read_text()
    assert "transport_url = rabbit://guest:guest@rabbitmq:5672/" in conf
    procs = []
    try:
        setup = local("topology", EVROUTER["topology"], overrides, tmp_path)
        out, _ = setup.communicate(timeout=60)
        assert setup.returncode == 0, out
        # the compute host's queue (the waiter's consumer declares it in production)
        bus.declare_host(host)

        router_ports = [free_port() for _ in range(SERVICES["router"]["deploy"]["replicas"])]
        for p in router_ports:
            procs.append(local("router", EVROUTER["router"], overrides, tmp_path,
                               {"OS_ROUTER__OPS_LISTEN": f"127.0.0.1:{p}"}))
        procs.append(local("network-adapter", EVROUTER["network-adapter"], overrides,
                           tmp_path))
        health = [f"http://127.0.0.1:{p}/healthz" for p in router_ports]
        available, why = libvirtd_available()
        if available:
            agent_port = free_port()
            procs.append(local("agent", EVROUTER["agent"], overrides, tmp_path,
                               {"OS_AGENT__OPS_LISTEN": f"127.0.0.1:{agent_port}"}))
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
        [m] = collect(bus.url, bus.topology.host_queue_name(host), 1, timeout=30)
        event = contract.decode(m.body).payload
        assert (event.name, event.server_uuid, event.host) == \
            ("network-vif-plugged", server, host)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
