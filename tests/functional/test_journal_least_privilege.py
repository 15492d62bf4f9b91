"""The journal under least privilege: each part writes it as its own user.

The users and permissions of `evrouter permissions --apply` (what the
compose deployment's broker loads: deploy/rabbitmq/definitions.json) in a
vhost of the test's own; `evrouter topology --declare` with [journal]
enabled, as the router user, declares the journal stream; then the network
publisher, the router and host a's consumer, each as its own user with the
journal on, carry an event to a waiter, and `evrouter trace` as the router
user shows all four hops and which broker user wrote each. Nobody but the
router may read the journal.
"""

import json
import logging
import threading
import uuid

import pytest

from compute.events import InstanceEvents
from compute.host_consumer import HostConsumer, HostConsumerSettings
from network.publisher import InstanceEventPublisher, PublisherSettings
from router import journal
from router.bus import contract
from router.routing import Policy
from tests.conftest import RunningRouter
from tests.functional.test_security import secure  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_every_part_writes_the_journal_as_its_own_user(secure, caplog):  # noqa: F811
    d = secure
    out = d.evrouter("permissions", "--apply", "--vhost", d.vhost,
                     "--bus-prefix", d.prefix, "--network-user", d.network,
                     "--router-user", d.router_user,
                     "--compute-user-prefix", d.compute_prefix,
                     "--host", "a", "--password", d.password)
    assert out.returncode == 0, out.stderr
    name = journal.stream_name(d.prefix)
    whole = sorted({*journal.names(d.prefix)[0], *journal.names(d.prefix)[1]})
    for user, args, says in (
            (d.router_user, (), "declared"),
            (d.compute_prefix + "a", ("--host", "a"),
             "exists (not this user's to declare)")):
        out = d.evrouter("topology", "--declare", "--journal-enabled",
                         "--bus-prefix", d.prefix, "--transport-url",
                         d.url(user).replace("amqp://", "rabbit://"), *args)
        assert out.returncode == 0, out.stdout + out.stderr
        for entity in whole:     # the index too, not only the stream
            assert f"{entity}: {says}" in out.stdout.splitlines(), out.stdout

    def settings(user):
        return journal.JournalSettings(transport_url=d.url(user),
                                       prefix=d.prefix, batch_seconds=0.05)

    caplog.set_level(logging.WARNING, logger="router.journal")

    class Bus:
        url = d.url(d.router_user)
        topology = d.topology
        prefix = d.prefix
    # The parts that may not declare write first, before any router ran:
    # what `topology --declare` made is the whole journal, its index bound
    # (not exchanges a router's writer binds later: a publish returned).
    events = InstanceEvents()
    consumer = HostConsumer(HostConsumerSettings(
        host="a", transport_url=d.url(d.compute_prefix + "a"),
        topology=d.topology, journal=settings(d.compute_prefix + "a")),
        events.deliver)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    publisher = InstanceEventPublisher(PublisherSettings(
        transport_url=d.url(d.network), topology=d.topology,
        producer="network-test", journal=settings(d.network))).start()
    router = None
    try:
        assert consumer.ready.wait(15), "host consumer did not start"
        assert consumer.journal.flushed(10), consumer.journal.stats
        server, port = str(uuid.uuid4()), f"port-{uuid.uuid4().hex[:8]}"
        with events.wait_for_instance_event(
                server, [(contract.VIF_PLUGGED, port)], deadline=15):
            receipt = publisher.publish(contract.InstanceEvent(
                contract.VIF_PLUGGED, server, port, host="a"), timeout=15)
            assert publisher.journal.flushed(10), publisher.journal.stats
            # through the index, at the first try
            assert publisher.journal.stats["index_messages"] >= 1, \
                publisher.journal.stats
            assert publisher.journal.stats["failures"] == 0, \
                publisher.journal.stats
            assert not [r.getMessage() for r in caplog.records
                        if r.levelno >= logging.WARNING], \
                "a journal writer found the journal half-built"
            router = RunningRouter(
                Bus, journal=settings(d.router_user), policy=Policy(
                    allowed_publishers=frozenset({d.network}),
                    compute_user_prefix=d.compute_prefix))
        journals = (publisher.journal, router.service.journal,
                    consumer.journal)
        for j in journals:
            assert j.flushed(10), f"{j.service}: {j.stats}"
    finally:
        publisher.close()
        consumer.stop()
        thread.join(15)
        if router is not None:
            router.stop()
    # only the router may declare it; the others write what is there
    assert router.service.journal.stats["declare_refused"] == 0
    assert publisher.journal.stats["declare_refused"] >= 1
    assert consumer.journal.stats["declare_refused"] >= 1
    assert not [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING], "a journal was refused"

    def trace(user):
        return d.evrouter("trace", port, "--json", "--since", "10m",
                          "--timeout", "20", "--bus-prefix", d.prefix,
                          "--transport-url",
                          d.url(user).replace("amqp://", "rabbit://"))
    out = trace(d.router_user)
    assert out.returncode == 0, out.stderr
    hops = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(h["hop"], h["user"]) for h in hops] == [
        (journal.PUBLISHED, d.network), (journal.ROUTED, d.router_user),
        (journal.DELIVERED, d.compute_prefix + "a"),
        (journal.MATCHED, d.compute_prefix + "a")], hops
    assert {h["mid"] for h in hops} == {receipt.message_id}
    assert hops[-1]["detail"] == "woken"
    # the others may write the journal, not read it
    for user in (d.network, d.compute_prefix + "a"):
        out = trace(user)
        assert out.returncode == 1, out.stdout
        assert f"cannot read {name}" in out.stderr and "ACCESS_REFUSED" in \
            out.stderr, out.stderr
