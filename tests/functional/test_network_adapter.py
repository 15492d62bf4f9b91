"""The notification adapter on the real broker: an oslo.messaging Notifier
emits what an unmodified network service emits; events reach the host."""

import os
import signal
import subprocess
import sys
import uuid

import oslo_messaging
import oslo_messaging.opts
import pytest
from oslo_config import cfg

from network.adapter import AdapterSettings, NetworkAdapter
from network.publisher import InstanceEventPublisher, PublisherSettings
from router.bus import contract
from tests.conftest import BROKER_URL, wait_for
from tests.functional.test_network_publisher import host_events

HOST = "compute-ad"
OSLO_URL = "rabbit://guest:guest@127.0.0.1:5672/"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def network_service(bus):
    """A Notifier on a unique control exchange and topic, as the network
    service would have; its exchange and queues go at teardown."""
    names = {"exchange": f"{bus.prefix}-neutron",
             "topic": f"{bus.prefix}-notifications",
             "pool": f"{bus.prefix}-adapter"}
    bus.own(exchanges=[names["exchange"]],
            queues=[names["topic"] + ".info", names["pool"]])
    conf = cfg.ConfigOpts()
    conf([], project="evrouter-test")
    for group, opts in oslo_messaging.opts.list_opts():
        if group is None:
            conf.register_opts(opts)
    conf.set_override("control_exchange", names["exchange"])
    transport = oslo_messaging.get_notification_transport(conf, url=OSLO_URL)
    notifier = oslo_messaging.Notifier(transport, driver="messaging",
                                       topics=[names["topic"]],
                                       publisher_id="network.controller-1")
    try:
        yield notifier, names
    finally:
        transport.cleanup()


def port(server, status, **kw):
    p = {"id": "port-ad", "device_id": server, "device_owner": "compute:nova",
         "status": status, "binding:host_id": HOST, "network_id": "net-1",
         "fixed_ips": [{"subnet_id": "sub-1", "ip_address": "10.0.0.7"}]}
    p.update(kw)
    return p


def emit_lifecycle(notifier, server):
    ctxt = {"user_id": "admin", "project_id": "p"}
    notifier.info(ctxt, "port.create.end", {"port": port(server, "DOWN")})
    notifier.info(ctxt, "port.update.end", {"port": port(server, "ACTIVE")})
    notifier.info(ctxt, "network.update.end", {"network": {"id": "net-1"}})
    notifier.info(ctxt, "port.update.end", {"port": port(server, "DOWN")})
    notifier.info(ctxt, "port.delete.end",
                  {"port_id": "port-ad", "port": port(server, "DOWN")})


def expected(server):
    return [contract.InstanceEvent(name, server, "port-ad", "completed", HOST)
            for name in ("network-vif-plugged", "network-vif-unplugged",
                         "network-vif-deleted")]


def test_port_notifications_become_events_on_the_host(bus, router,
                                                      network_service):
    notifier, names = network_service
    bus.declare_host(HOST)
    server = str(uuid.uuid4())
    with InstanceEventPublisher(PublisherSettings(
            transport_url=bus.url, topology=bus.topology)) as publisher:
        adapter = NetworkAdapter(AdapterSettings(
            transport_url=OSLO_URL, exchange=names["exchange"],
            topics=(names["topic"],), pool=names["pool"]),
            publisher.publish).start()
        try:
            emit_lifecycle(notifier, server)
            wait_for(lambda: adapter.endpoint.handled == 4, timeout=15,
                     what="4 port notifications handled")
        finally:
            adapter.stop()
    events = host_events(bus, 3, HOST)
    assert [env.payload for _, env in events] == expected(server)


def test_the_network_adapter_command(bus, router, network_service, tmp_path):
    notifier, names = network_service
    bus.declare_host(HOST)
    server = str(uuid.uuid4())
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "network-adapter",
         "--transport-url", BROKER_URL, "--bus-prefix", bus.prefix,
         "--network-spool_path", str(tmp_path / "spool"),
         "--network_adapter-notification_transport_url", OSLO_URL,
         "--network_adapter-exchange", names["exchange"],
         "--network_adapter-topics", names["topic"],
         "--network_adapter-pool", names["pool"]],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The notifier's default queue is bound the moment it first sends;
        # the adapter's pool queue once it listens. Wait for the latter.
        wait_for(lambda: _queue_exists(bus, names["pool"]) or proc.poll()
                 is not None, timeout=20, what="the adapter's queue")
        assert proc.poll() is None, proc.stdout.read()
        emit_lifecycle(notifier, server)
        events = host_events(bus, 3, HOST)
        assert [env.payload for _, env in events] == expected(server)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert proc.returncode == 0, output


def _queue_exists(bus, name):
    ch = bus.conn.channel()
    try:
        ch.queue_declare(name, passive=True)
        return True
    except bus.conn.channel_errors:
        return False
    finally:
        try:
            ch.close()
        except Exception:
            pass
