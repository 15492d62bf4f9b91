"""The broker of the storm benchmark: its limits, memory and CPU; a node of its own.

The machine's RabbitMQ (rabbit@localhost, 5672) runs with the soft file
descriptor limit it inherited (1024 here: 832 sockets), fewer than the
~2,000 connections of 1,000 compute hosts. It must not be restarted to
change that, so a storm that does not fit runs on a node of its own beside
it (``DedicatedNode``: same RabbitMQ, same defaults, its own name, ports and
folders, the fd limit raised to the hard limit), which is stopped and
removed afterwards. The server is started through ``setpriv`` rather than
the Debian wrapper: the wrapper's ``su`` goes through pam_limits, which
puts the soft limit back to 1024.

Every rabbitmqctl / rabbitmq-diagnostics call names its node with ``-n``.
"""

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import time

import psutil

MAIN_NODE = "rabbit@localhost"
MAIN_PORT = 5672


def _cli(tool, node, *args, timeout=60):
    out = subprocess.run([tool, "-q", "-n", node, *args], check=True, text=True,
                         capture_output=True, timeout=timeout).stdout
    return out


def status(node):
    """`rabbitmq-diagnostics status` as a dict (fd limits, pid, memory)."""
    return json.loads(_cli("rabbitmq-diagnostics", node, "status",
                           "--formatter", "json"))


def sockets(node):
    """(sockets used, sockets limit) of the node."""
    fds = status(node)["file_descriptors"]
    return fds["sockets_used"], fds["sockets_limit"]


def alarms(node):
    """The node's resource alarms (memory, disk), empty when none."""
    return status(node).get("alarms", [])


def pid(node):
    return int(status(node)["pid"])


def memory(node):
    """The node's memory breakdown, bytes per category."""
    doc = json.loads(_cli("rabbitmq-diagnostics", node, "memory_breakdown",
                          "--unit", "bytes", "--formatter", "json"))
    return {k: v["bytes"] for k, v in doc.items()}


CONNECTIONS = ("connection_readers", "connection_writers",
               "connection_channels", "connection_other")
QUEUES = ("queue_procs", "quorum_queue_procs")


def allocated(breakdown):
    """What the node allocated (the breakdown without the unused reserve)."""
    return sum(v for k, v in breakdown.items()
               if k not in ("reserved_unallocated", "allocated_unused"))


def count(node, what):
    """How many connections / queues / exchanges the node has (all vhosts)."""
    if what == "connections":
        out = _cli("rabbitmqctl", node, "list_connections", "pid")
        return len([line for line in out.splitlines() if line.strip()])
    total = 0
    for vhost in _cli("rabbitmqctl", node, "list_vhosts", "name").split():
        out = _cli("rabbitmqctl", node, f"list_{what}", "-p", vhost, "name")
        total += len([line for line in out.splitlines() if line.strip()])
    return total


class Vhost:
    """A vhost of its own for guest: deleting it removes everything in it."""

    def __init__(self, node, name):
        self.node, self.name = node, name
        _cli("rabbitmqctl", node, "add_vhost", name)
        _cli("rabbitmqctl", node, "set_permissions", "-p", name, "guest",
             ".*", ".*", ".*")

    def delete(self):
        _cli("rabbitmqctl", self.node, "delete_vhost", self.name, timeout=120)


def _listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class DedicatedNode:
    """A single RabbitMQ node beside the main broker, with a raised fd limit."""

    def __init__(self, name="evrouter-storm", port=5690, base=None, conf=()):
        self.node = f"{name}@localhost"
        if self.node == MAIN_NODE:
            raise ValueError("the main broker is never started or stopped here")
        self.conf = tuple(conf)     # extra rabbitmq.conf lines
        self.port = port
        self.base = base or f"/tmp/{name}-broker"
        self.url = f"rabbit://guest:guest@127.0.0.1:{port}/"

    def start(self, timeout=120):
        if _listening(self.port):
            raise RuntimeError(f"something already listens on {self.port}")
        shutil.rmtree(self.base, ignore_errors=True)
        for sub in ("mnesia", "log"):
            os.makedirs(os.path.join(self.base, sub))
        with open(os.path.join(self.base, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
                    "loopback_users = none\n" + "".join(f"{c}\n" for c in self.conf))
        with open(os.path.join(self.base, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", self.base], check=True)
        env = dict(os.environ, HOME="/var/lib/rabbitmq",
                   RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                   RABBITMQ_DIST_PORT=str(self.port + 20000),
                   RABBITMQ_MNESIA_BASE=f"{self.base}/mnesia",
                   RABBITMQ_LOG_BASE=f"{self.base}/log",
                   RABBITMQ_CONFIG_FILE=f"{self.base}/rabbitmq.conf",
                   RABBITMQ_PID_FILE=f"{self.base}/pid",
                   RABBITMQ_ENABLED_PLUGINS_FILE=f"{self.base}/enabled_plugins")
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def raise_fds():
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        subprocess.run(["setpriv", "--reuid", "rabbitmq", "--regid", "rabbitmq",
                        "--init-groups", "/usr/lib/rabbitmq/bin/rabbitmq-server",
                        "-detached"], env=env, preexec_fn=raise_fds, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                _cli("rabbitmqctl", self.node, "await_startup", "--timeout", "10")
                if _listening(self.port):
                    return self
            except subprocess.SubprocessError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node} did not start")
            time.sleep(0.5)

    def stop(self):
        try:
            _cli("rabbitmqctl", self.node, "stop", timeout=120)
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)


def cpu_seconds(process):
    """A psutil.Process's CPU time so far, user and system."""
    t = process.cpu_times()
    return t.user + t.system


class Broker:
    """The node a benchmark runs on: where to reach it, what it costs."""

    def __init__(self, node, port):
        self.node, self.port = node, port
        self.url = f"rabbit://guest:guest@127.0.0.1:{port}/"
        self.process = psutil.Process(pid(node))

    def cpu(self):
        return cpu_seconds(self.process)

    def memory(self):
        """The breakdown, plus the process's resident set as "os_rss": the
        breakdown's `binary` counts each socket's buffer as allocated (3.75
        MiB a connection here) though the kernel has not backed most of it."""
        return dict(memory(self.node), os_rss=self.process.memory_info().rss)

    def connections(self):
        return count(self.node, "connections")


def add_arguments(parser, *, auto=False):
    """--broker and --broker-conf, as every benchmark takes them."""
    choices = ("auto", "main", "dedicated") if auto else ("main", "dedicated")
    parser.add_argument(
        "--broker", choices=choices, default=choices[0],
        help="dedicated: a RabbitMQ node of its own with the fd limit raised, "
             "as the README's deployment notes ask for thousands of host "
             "queues, removed afterwards" + ("; auto: that node only if the "
                                             "load's connections do not fit "
                                             "the main broker's" if auto else ""))
    parser.add_argument("--broker-conf", action="append", default=[],
                        metavar="LINE",
                        help="a rabbitmq.conf line for the dedicated node, e.g. "
                             "'classic_queue.default_version = 2'")


@contextlib.contextmanager
def chosen(choice, *, needed=0, conf=(), name="evrouter-storm", port=5690):
    """A Broker: the main one, or a DedicatedNode (`name`, `port`) started
    here and stopped and removed on the way out. auto: the main broker if
    `needed` connections fit in its fd limit."""
    if choice == "auto":
        used, limit = sockets(MAIN_NODE)
        fits = needed + 50 <= limit - used
        print(f"main broker {MAIN_NODE}: {used} of {limit} sockets in use; the "
              f"load needs about {needed} connections: "
              f"{'fits' if fits else 'does NOT fit'}", flush=True)
        choice = "main" if fits else "dedicated"
    if choice == "main":
        yield Broker(MAIN_NODE, MAIN_PORT)
        return
    node = DedicatedNode(name=name, port=port, conf=conf)
    started = time.monotonic()
    try:
        node.start()
        limit = status(node.node)["file_descriptors"]["total_limit"]
        print(f"dedicated node {node.node} on 127.0.0.1:{node.port} started in "
              f"{time.monotonic() - started:.0f} s, fd limit {limit}: "
              f"{list(conf) or 'defaults'}", flush=True)
        yield Broker(node.node, node.port)
    finally:
        node.stop()
