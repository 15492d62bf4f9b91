"""docker-compose.yml on a real Docker engine (pytest -m compose tests/compose).

The `deployment` fixture makes the machine able to run it (tests/compose/
engine.sh: Debian's docker.io and docker-compose, dockerd started if no
engine answers), builds the base images locally (tests/compose/images.sh:
there is no image registry here) and the evrouter image through the compose
file's own build, then brings the file up under a project name of its own
and takes it down again with `down -v` at the end, whatever happened.

What differs from `docker compose up -d` on an operator's machine is given
through the file's own variables only: the locally built bases, the image's
name, the broker published on a free port of 127.0.0.1 (5672 belongs to the
machine's own RabbitMQ), and the agent's libvirt URI when this machine
cannot run a libvirtd (then libvirt's test driver, inside the container).

Tests marked `compose` run only when asked for (`pytest -m compose
tests/compose`, which is what .ci/compose does, or EVROUTER_COMPOSE=1): the
main run skips them, so it never installs or starts a Docker engine.
"""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import time
import urllib.request
import uuid

import pytest

from tests.conftest import skip_stage_unless_asked

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIBVIRTD = ROOT / "tests" / "functional" / "libvirtd.sh"
PASSWORD = "evrouter-dev"     # deploy/rabbitmq/definitions.json's users
COMPUTE_HOST = "compute-1"    # the compute host definitions.json has users for
# Containers of a healthy deployment, by service.
EXPECTED = {"rabbitmq": 1, "topology": 1, "compute-topology": 1, "router": 2,
            "agent": 1, "network-adapter": 1}
ONE_SHOT = {"topology", "compute-topology"}

TIMINGS = []


def timing(what, seconds):
    line = f"{what}: {seconds:.1f} s"
    TIMINGS.append(line)
    print(f"\nCOMPOSE {line}")


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("compose deployment: timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    skip_stage_unless_asked(
        config, items, "compose", "EVROUTER_COMPOSE",
        "needs a Docker engine: "
        "pytest -m compose tests/compose (.ci/compose)")


def run(argv, *, timeout=600, check=True, env=None):
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def compose_command():
    """docker-compose 1.29 (Debian's) or the `docker compose` v2 plugin;
    EVROUTER_COMPOSE_CMD chooses. 1.29 applies deploy.replicas only with
    --compatibility."""
    chosen = os.environ.get("EVROUTER_COMPOSE_CMD")
    if chosen:
        argv = shlex.split(chosen)
    elif shutil.which("docker-compose"):
        argv = ["docker-compose"]
    else:
        argv = ["docker", "compose"]
    version = run([*argv, "version", "--short"]).stdout.strip()
    if version.lstrip("v").startswith("1."):
        argv.append("--compatibility")
    return argv, version


class Deployment:
    """One compose project of docker-compose.yml on the engine."""

    def __init__(self, project, env, compose):
        self.project = project
        self.env = env
        self._compose = compose

    def compose(self, *args, timeout=300, check=True):
        return run([*self._compose, "-p", self.project, "-f",
                    str(ROOT / "docker-compose.yml"), *args],
                   timeout=timeout, check=check, env=self.env)

    def _label(self, service=None):
        f = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            f += ["--filter", f"label=com.docker.compose.service={service}"]
        return f

    def containers(self, service=None):
        out = run(["docker", "ps", "-a", "-q", "--no-trunc", *self._label(service)])
        return sorted(out.stdout.split())

    def inspect(self, ids):
        if not ids:
            return []
        return json.loads(run(["docker", "inspect", *ids]).stdout)

    def leftovers(self):
        """Containers, networks and volumes of this project still there."""
        found = {"containers": self.containers()}
        for kind in ("network", "volume"):
            out = run(["docker", kind, "ls", "-q", *self._label()])
            found[kind + "s"] = out.stdout.split()
        return found

    def states(self):
        """service -> list of (state, health) of its containers."""
        got = {}
        for c in self.inspect(self.containers()):
            service = c["Config"]["Labels"]["com.docker.compose.service"]
            state = c["State"]
            got.setdefault(service, []).append(
                (state["Status"], state.get("Health", {}).get("Status"),
                 state.get("ExitCode"), c["RestartCount"]))
        return got

    def ready(self):
        """Every service as a healthy deployment has it: one-shots exited 0,
        the others running, never restarted (a crash loop looks running
        between two crashes), and healthy where they have a health check."""
        states = self.states()
        for service, count in EXPECTED.items():
            got = states.get(service, [])
            if len(got) != count:
                return False
            for status, health, code, restarts in got:
                if service in ONE_SHOT:
                    if status != "exited" or code != 0:
                        return False
                elif (status != "running" or restarts
                      or health not in (None, "healthy")):
                    return False
        return True

    def address(self, container):
        nets = container["NetworkSettings"]["Networks"]
        return next(n["IPAddress"] for n in nets.values() if n["IPAddress"])

    def metrics(self, container, port):
        """The service's Prometheus metrics, by the container's address on
        the project network (the host reaches it; nothing is published)."""
        url = f"http://{self.address(container)}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def broker_url(self, user):
        """An AMQP URL of the compose broker, from this machine, as `user`."""
        host_port = self.compose("port", "rabbitmq", "5672").stdout.strip()
        return f"amqp://{user}:{PASSWORD}@{host_port}//"

    def connection_users(self):
        """The broker user of every client connection, as the broker sees it."""
        [broker] = self.containers("rabbitmq")
        out = run(["docker", "exec", broker, "rabbitmqctl", "list_connections",
                   "-q", "--no-table-headers", "user"]).stdout
        return out.split()

    def logs(self):
        return self.compose("logs", "--no-color", "--tail", "40", check=False,
                            timeout=60).stdout


def _script(path):
    proc = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="session")
def engine():
    code, out, err = _script(HERE / "engine.sh")
    if code == 3:
        pytest.fail(out.strip())
    assert code == 0, out + err
    compose, version = compose_command()
    print(f"\n{err.strip()}; compose command: {shlex.join(compose)} ({version})")
    return compose


@pytest.fixture(scope="session")
def libvirt_uri():
    """qemu:///system of a libvirtd on this machine, shared with the agent
    container through its socket (/var/run/libvirt is bind-mounted), as on a
    compute host. Where none can run, libvirt's test driver inside the
    container: the agent then still connects, publishes its snapshot and
    reports healthy, but watches no real hypervisor."""
    code, out, err = _script(LIBVIRTD)
    if code == 0:
        return "qemu:///system"
    print(f"\nCOMPOSE AGENT ON test:///default: {out.strip()} {err.strip()}")
    return "test:///default"


@pytest.fixture(scope="session")
def images(engine):
    """The variables that point the compose file at locally built bases."""
    start = time.monotonic()
    code, out, err = _script(HERE / "images.sh")
    assert code == 0, out + err
    timing("base images and wheels (images.sh)", time.monotonic() - start)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def deployment(engine, images, libvirt_uri):
    project = f"evrcompose{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env.update(images)
    env.update({
        "EVROUTER_IMAGE": "evrouter-test/evrouter:latest",
        # any free port of 127.0.0.1: 5672 is the machine's own RabbitMQ
        "EVROUTER_AMQP_PUBLISH": "127.0.0.1:",
        "EVROUTER_MANAGEMENT_PUBLISH": "127.0.0.1:",
        "EVROUTER_LIBVIRT_URI": libvirt_uri,
        "COMPUTE_HOST": COMPUTE_HOST,
    })
    d = Deployment(project, env, engine)
    start = time.monotonic()
    d.compose("build", "--force-rm", timeout=900)
    timing("evrouter image (compose build)", time.monotonic() - start)
    d.up_started = time.monotonic()
    try:
        d.compose("up", "-d", timeout=300)
        yield d
    finally:
        if d.containers():
            print("\n" + d.logs())
        d.compose("down", "-v", "--remove-orphans", "--timeout", "20",
                  check=False, timeout=300)
