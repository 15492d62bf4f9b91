"""`docker compose up` for real: docker-compose.yml on a Docker engine, its
broker booted with the least-privilege users, every service logged in as
its role's user.

In order, on one deployment (tests/compose/conftest.py): every service
healthy within 60 s of `up`; a network service's port notification through
the adapter and a router to a waiter in this process, and its four hops in
the journal (`evrouter trace` in a router container); 1,000 events with one
router container killed (`docker kill`) in the middle, none lost; `down -v`
leaving no container, network or volume behind.
"""

import json
import threading
import time
import uuid

import kombu
import oslo_messaging
import oslo_messaging.opts
import pytest
from oslo_config import cfg

from compute import waiting
from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router import journal
from router.bus import contract, topology
from tests.compose.conftest import COMPUTE_HOST, run, timing
from tests.conftest import report_fault, wait_for

# The first test also pays for the engine, the images and `compose up`.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

# deploy/evrouter.conf's [bus], which every container reads.
TOPOLOGY = topology.Topology(prefix="evrouter", queue_type="quorum", delivery_limit=5,
                             host_message_ttl_ms=600 * 1000)
HEALTHY_WITHIN = 60.0
EVENTS = 1000


@pytest.fixture(scope="module")
def waiter(deployment):
    """nova-compute's side in this process: the waiter registry fed by a
    host consumer on compute-1's queue, as that host's broker user, with
    the journal on (nova.conf's [evrouter] journal = true)."""
    registry = InstanceEvents()
    url = deployment.broker_url(f"evrouter-compute-{COMPUTE_HOST}")
    consumer = HostConsumer(HostConsumerSettings(
        host=COMPUTE_HOST, topology=TOPOLOGY, transport_url=url,
        journal=journal.JournalSettings(transport_url=url, prefix=TOPOLOGY.prefix)),
        registry.deliver)
    registry.host_consumer = consumer
    thread = threading.Thread(target=consumer.run, daemon=True, name="host-consumer")
    thread.start()
    assert consumer.ready.wait(30), "host consumer did not start"
    yield registry
    consumer.stop()
    thread.join(15)


def test_every_service_is_healthy_within_60_s(deployment):
    wait_for(deployment.ready, timeout=HEALTHY_WITHIN - (time.monotonic() -
                                                        deployment.up_started),
             interval=0.5, what=f"every service healthy: {deployment.states()}")
    timing("compose up to every service healthy", time.monotonic() - deployment.up_started)
    # The agent reached the broker and libvirt: it published its snapshot.
    [agent] = deployment.inspect(deployment.containers("agent"))
    assert deployment.metrics(agent, 9311)["evrouter_agent_snapshots_total"] >= 1


def test_the_broker_has_no_guest_and_services_use_their_users(deployment):
    [broker] = deployment.containers("rabbitmq")
    users = run(["docker", "exec", broker, "rabbitmqctl", "list_users", "-q",
                 "--no-table-headers"]).stdout
    names = {line.split("\t")[0] for line in users.splitlines() if line}
    assert "guest" not in names
    # Two routers, the agent, the adapter listening as the network
    # service's user (it publishes as evrouter-network: see below). With
    # the journal on, each router also follows it for stuck waits (a
    # connection from its start) and writes it (a connection once it has
    # written a hop): 4 to 6 router connections, every one its own user.
    users = sorted(deployment.connection_users())
    routers = users.count("evrouter-router")
    assert 4 <= routers <= 6, users
    assert [u for u in users if u != "evrouter-router"] == sorted(
        [f"evrouter-compute-{COMPUTE_HOST}", "openstack"]), users


def test_the_broker_runs_with_evrouter_s_advanced_config(deployment):
    """deploy/rabbitmq/advanced.config: a parked event the router queue
    refused is tried again after 5 s, not RabbitMQ's 180 s."""
    [broker] = deployment.containers("rabbitmq")
    got = run(["docker", "exec", broker, "rabbitmqctl", "eval",
               "application:get_env(rabbit, "
               "dead_letter_worker_publisher_confirm_timeout)."]).stdout
    assert got.strip() == "{ok,5000}", got


def _notifier(url):
    conf = cfg.ConfigOpts()
    conf([], project="evrouter-compose-test")
    for group, opts in oslo_messaging.opts.list_opts():
        if group is None:
            conf.register_opts(opts)
    conf.set_override("control_exchange", "neutron")   # the compose file's
    transport = oslo_messaging.get_notification_transport(conf, url=url)
    return transport, oslo_messaging.Notifier(
        transport, driver="messaging", topics=["notifications"],
        publisher_id="network.controller-1")


def test_a_port_notification_wakes_a_waiter(deployment, waiter):
    """A network service's port.update.end (as its own broker user) ->
    network adapter -> ingress -> a router -> compute-1's queue -> the
    waiter of this process, prepared before the port went up."""
    server, port_id = str(uuid.uuid4()), f"port-{uuid.uuid4().hex[:8]}"

    def port(status):
        return {"id": port_id, "device_id": server, "device_owner": "compute:nova",
                "status": status, "binding:host_id": COMPUTE_HOST,
                "network_id": "net-1", "fixed_ips": []}

    host_port = deployment.broker_url("x").rsplit("@", 1)[1].rstrip("/")
    transport, notifier = _notifier(f"rabbit://openstack:openstack-dev@{host_port}/")
    ctxt = {"user_id": "admin", "project_id": "p"}
    start = time.monotonic()
    try:
        with waiter.wait_for_instance_event(server, [(contract.VIF_PLUGGED, port_id)],
                                            deadline=30):
            notifier.info(ctxt, "port.create.end", {"port": port("DOWN")})
            notifier.info(ctxt, "port.update.end", {"port": port("ACTIVE")})
    finally:
        transport.cleanup()
    timing("port notification -> waiter woken", time.monotonic() - start)
    assert "evrouter-network" in deployment.connection_users()

    # The journal (deploy/evrouter.conf): the adapter, a router and the
    # host consumer wrote a hop each way, each as its own user; `evrouter
    # trace` in a router container reads them as the router user.
    assert waiter.host_consumer.journal.flushed(10)
    router = deployment.containers("router")[0]

    def traced():
        out = run(["docker", "exec", router, "evrouter", "trace", port_id, "--json",
                   "--since", "10m", "--config-file", "/etc/evrouter/evrouter.conf"],
                  timeout=60).stdout
        hops = [json.loads(line) for line in out.splitlines()]
        return hops if len(hops) >= 4 else None
    start = time.monotonic()
    hops = wait_for(traced, timeout=20, interval=0.5, what="four hops in the journal")
    timing("evrouter trace in a router container", time.monotonic() - start)
    assert [(h["hop"], h["user"]) for h in hops] == [
        ("published", "evrouter-network"), ("routed", "evrouter-router"),
        ("delivered", f"evrouter-compute-{COMPUTE_HOST}"),
        ("matched", f"evrouter-compute-{COMPUTE_HOST}")], hops
    assert len({h["mid"] for h in hops}) == 1 and hops[-1]["detail"] == "woken"
    # nobody was refused the journal
    logs = deployment.compose("logs", "--no-color", check=False, timeout=60).stdout
    assert "cannot write to evrouter.journal" not in logs, logs[-3000:]


def test_a_router_killed_mid_stream_loses_nothing(deployment, waiter):
    """1,000 events published (confirmed) as the network user while one of
    the two router containers is killed (docker kill) after the 500th: every
    event wakes its waiter, each once."""
    routers = deployment.inspect(deployment.containers("router"))
    assert len(routers) == 2
    victim, survivor = routers
    before = {r["Id"]: deployment.metrics(r, 9310)["evrouter_router_events_in_total"]
              for r in routers}
    server = str(uuid.uuid4())
    tags = [f"port-{i:04d}" for i in range(EVENTS)]
    seen_before = waiter.stats["duplicates"]
    confirmed = 0
    in_both = {}
    killed = threading.Event()

    def kill():
        # Both routers have been taking events: this one dies holding some.
        for r in routers:
            in_both[r["Id"]] = deployment.metrics(r, 9310)[
                "evrouter_router_events_in_total"] - before[r["Id"]]
        run(["docker", "kill", victim["Id"]])
        killed.set()

    publisher = InstanceEventPublisher(PublisherSettings(
        transport_url=deployment.broker_url("evrouter-network"), topology=TOPOLOGY,
        producer="network@compose-test"))
    woken_before = waiter.stats["delivered"]
    start = time.monotonic()
    try:
        with waiter.wait_for_instance_event(
                server, [(contract.VIF_PLUGGED, t) for t in tags], deadline=60):
            with publisher:
                for i, tag in enumerate(tags):
                    receipt = publisher.publish(contract.InstanceEvent(
                        contract.VIF_PLUGGED, server, tag, contract.COMPLETED,
                        COMPUTE_HOST))
                    confirmed += not receipt.spooled
                    if i == EVENTS // 2:
                        threading.Thread(target=kill, daemon=True).start()
                    # Paced so that the kill lands while events still flow.
                    time.sleep(0.004)
                published = time.monotonic() - start
    except waiting.InstanceEventTimeout:
        pass    # counted below: the lost ones are those no waiter saw
    delivered = time.monotonic() - start
    woken = waiter.stats["delivered"] - woken_before
    assert killed.wait(10)
    [state] = deployment.inspect([victim["Id"]])
    assert state["State"]["Status"] == "exited"
    assert all(n > 0 for n in in_both.values()), f"both routers routed: {in_both}"
    with kombu.Connection(deployment.broker_url("evrouter-router")) as conn:
        dead = conn.channel().queue_declare(TOPOLOGY.dead_letter_queue_name,
                                            passive=True).message_count
    duplicates = waiter.stats["duplicates"] - seen_before
    report_fault("compose: docker kill of one of two router containers mid-stream",
                 sent=EVENTS, confirmed=confirmed, delivered=woken,
                 duplicates_ignored=duplicates, dead_lettered=dead, lost=EVENTS - woken)
    timing(f"{EVENTS} events published (paced, confirmed)", published)
    timing(f"{EVENTS} events, publish of the first -> last waiter woken", delivered)
    assert (confirmed, woken, dead) == (EVENTS, EVENTS, 0)

    # The killed router comes back and takes its share again.
    run(["docker", "start", victim["Id"]])
    wait_for(deployment.ready, timeout=60, interval=0.5, what="the router back healthy")
    assert survivor["Id"] in deployment.containers("router")


def test_down_leaves_nothing_behind(deployment):
    start = time.monotonic()
    deployment.compose("down", "-v", "--remove-orphans", "--timeout", "20")
    timing("compose down -v", time.monotonic() - start)
    assert deployment.leftovers() == {"containers": [], "networks": [], "volumes": []}
