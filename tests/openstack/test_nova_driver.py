"""Nova 34's own ComputeManager and ComputeVirtAPI.wait_for_instance_event,
in-process, with evrouter's compute driver configured as the adoption guide
says (deploy/openstack/nova-compute.conf) around Nova's fake driver, fed by
the real RabbitMQ through the router.
"""

import threading
import time
import urllib.parse
import uuid
from unittest import mock

import fixtures
from nova import context as nova_context
from nova import exception, objects, test
from nova.compute import manager as compute_manager
from nova.compute import power_state, vm_states
from nova.network import model as network_model
from oslo_context import context as oslo_context
from oslo_utils import timeutils

from compute import nova_driver
from router import journal, routing, stuck_cmd, trace_cmd
from router.bus import connection, contract
from tests.conftest import queue_depth, routed_bus
from tests.functional.waiter_harness import publish_with_kombu
from tests.openstack import deploy_config

HOST = "cmp-1"
DEST = "cmp-2"
PORT = "2b1c6f0e-5d0b-4a5e-9c1e-0f0a3c7a9d01"


def wait_until(predicate, timeout=15.0, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class NovaTestCase(test.TestCase):
    """Nova's test base (SQLite DBs, conf and policy fixtures) under pytest."""

    def _clear_attrs(self):
        # pytest puts the test method on the instance and deletes it after;
        # Nova's cleanup deletes every public instance attribute first.
        method = self.__dict__.get(self._testMethodName)
        super()._clear_attrs()
        if method is not None:
            setattr(self, self._testMethodName, method)


class _ComputeWithBus(NovaTestCase):
    """A ComputeManager with evrouter's driver as the guide configures it, on
    plain TCP to the main broker as guest: the guide's settings but its TLS
    ones (EvrouterNovaComputeOverTLSTest takes those too)."""

    def setUp(self):
        super().setUp()
        self.bus, self.router = self.routed_bus()

        conf = deploy_config.nova_compute_conf()
        nova_driver._conf()     # registers [evrouter] in Nova's CONF
        self.guide = deploy_config.load_with_oslo("nova-compute.conf", nova_driver.OPTS)
        # The guide's settings, with the fake driver for libvirt and this
        # test's slice of the broker.
        self.flags(compute_driver=conf["DEFAULT"]["compute_driver"], host=HOST)
        self.flags(compute_driver="fake.SmallFakeDriver",
                   topology_prefix=self.bus.prefix,
                   hold_seconds=self.guide.hold_seconds,
                   **self.broker_flags(), group="evrouter")
        self.context = nova_context.get_admin_context()
        self.compute = compute_manager.ComputeManager()
        self.assertIsInstance(self.compute.driver, nova_driver._BusDriver)
        self.compute.driver.init_host(HOST)
        self.addCleanup(self.compute.driver.cleanup_host, HOST)
        self.hostbus = self.compute.driver._evrouter
        wait_until(self.hostbus.consumer.ready.is_set, 15, "the host consumer")

    def routed_bus(self):
        return routed_bus([HOST], self.addCleanup)

    def broker_flags(self):
        return {"transport_url": self.bus.url}

    def _instance(self, host=HOST, vifs=()):
        flavor = objects.Flavor.get_by_name(self.context, "m1.tiny")
        inst = objects.Instance(context=self.context)
        inst.uuid = str(uuid.uuid4())
        inst.vm_state = vm_states.BUILDING
        inst.task_state = "spawning"
        inst.power_state = power_state.NOSTATE
        inst.user_id = "u"
        inst.project_id = "p"
        inst.host = host
        inst.node = host
        inst.compute_id = 1
        inst.instance_type_id = flavor.id
        inst.memory_mb = inst.vcpus = inst.root_gb = inst.ephemeral_gb = 0
        inst.flavor = flavor
        inst.launched_at = timeutils.utcnow()
        inst.system_metadata = {}
        inst.info_cache = objects.InstanceInfoCache(
            network_info=network_model.NetworkInfo(
                [network_model.VIF(id=vif, address="fa:16:3e:00:00:01")
                 for vif in vifs]))
        inst.create()
        return inst

    def _publish(self, inst, name=contract.VIF_PLUGGED, status="completed",
                 message_id=None, tag=PORT, headers=None):
        env = contract.envelope(
            contract.InstanceEvent(name, inst.uuid, tag, status, HOST),
            "neutron@test", message_id=message_id)
        publish_with_kombu(self.bus, env, headers=headers)
        return env

    def _wait_briefly(self, inst):
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=0.5):
            pass


class EvrouterNovaComputeTest(_ComputeWithBus):

    def test_nova_wait_wakes_from_a_bus_event(self):
        inst = self._instance()
        started = time.monotonic()
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=20):
            self._publish(inst)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(1, self.hostbus.bridge.stats["woke_nova"])

    def test_event_before_nova_prepared_is_held_and_satisfies_the_wait(self):
        inst = self._instance()
        self._publish(inst)
        wait_until(lambda: self.hostbus.bridge.registry.held == 1, 15,
                   "the early event held")
        started = time.monotonic()
        # A timeout no bus round trip fits in: only the held event can do it.
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=0.5):
            pass
        self.assertLess(time.monotonic() - started, 0.5)
        self.assertEqual(1, self.hostbus.bridge.registry.stats["early_used"])

    def test_duplicate_never_wakes_twice(self):
        inst = self._instance()
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=20):
            env = self._publish(inst)
        # The same message again (a redelivery): not held for the next wait.
        self._publish(inst, message_id=env.id)
        wait_until(lambda: self.hostbus.bridge.registry.stats["duplicates"] == 1,
                   15, "the duplicate seen")
        self.assertEqual(0, self.hostbus.bridge.registry.held)
        self.assertRaises(
            exception.InstanceEventTimeout, self._wait_briefly, inst)
        self.assertEqual(1, self.hostbus.bridge.stats["woke_nova"])

    def test_failed_event_goes_to_novas_error_callback(self):
        inst = self._instance()
        seen = []

        def callback(event_name, instance):
            seen.append((event_name, instance.uuid))
            return False

        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=20,
                error_callback=callback):
            self._publish(inst, status="failed")
        self.assertEqual([(f"{contract.VIF_PLUGGED}-{PORT}", inst.uuid)], seen)

    def test_network_changed_reaches_novas_own_handler(self):
        inst = self._instance()
        called = threading.Event()
        with mock.patch.object(self.compute.network_api, "get_instance_nw_info",
                               side_effect=lambda *a, **kw: called.set()) as nw:
            self._publish(inst, name=contract.NETWORK_CHANGED)
            self.assertTrue(called.wait(15), "Nova's handler was not called")
        ctx, instance = nw.call_args.args
        self.assertEqual(inst.uuid, instance.uuid)
        self.assertEqual(PORT, nw.call_args.kwargs["refresh_vif_id"])
        self.assertEqual(1, self.hostbus.bridge.stats["handled_by_nova"])

    def test_vif_deleted_reaches_novas_own_handler(self):
        inst = self._instance()
        done = threading.Event()
        real = self.compute._process_instance_vif_deleted_event
        with mock.patch.object(
                self.compute, "_process_instance_vif_deleted_event",
                side_effect=lambda *a: (real(*a), done.set())) as handler:
            self._publish(inst, name=contract.VIF_DELETED)
            self.assertTrue(done.wait(15), "Nova's handler was not called")
        self.assertEqual(PORT, handler.call_args.args[2])

    def test_late_event_of_a_timed_out_nova_wait_does_not_satisfy_the_retry(self):
        inst = self._instance()
        # Nova's real waits last minutes; this one half a second.
        self.assertRaises(exception.InstanceEventTimeout, self._wait_briefly, inst)
        # The first wait's event, arriving after it timed out and before the
        # retry prepared: that late event, whatever its sender's clock says.
        env = contract.envelope(
            contract.InstanceEvent(contract.VIF_PLUGGED, inst.uuid, PORT,
                                   "completed", HOST),
            "neutron@test", created_at=time.time() + 9)
        outcome = self.hostbus.bridge.deliver(env.payload, env.id)
        self.assertEqual("stale", outcome)
        self.assertRaises(exception.InstanceEventTimeout, self._wait_briefly, inst)

    def test_novas_clear_for_an_instance_clears_evrouters_side(self):
        inst = self._instance()
        other = self._instance()
        events = self.compute.instance_events
        events.prepare_for_instance_event(inst, contract.VIF_PLUGGED, PORT)
        events.prepare_for_instance_event(other, contract.VIF_PLUGGED, PORT)
        self.assertEqual(2, self.hostbus.bridge.registry.pending)
        events.clear_events_for_instance(inst)      # what Nova does on delete
        self.assertEqual(1, self.hostbus.bridge.registry.pending)
        self.assertEqual(1, len(self.hostbus.bridge._prepared))
        with self.compute.virtapi.wait_for_instance_event(
                other, [(contract.VIF_PLUGGED, PORT)], timeout=20):
            self._publish(other)

    def test_host_queue_is_drained(self):
        inst = self._instance()
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=20):
            self._publish(inst)
        wait_until(lambda: queue_depth(
            self.bus.url, self.bus.topology.host_queue_name(HOST)) == 0, 10,
            "the host queue drained")


class EvrouterNovaJournalTest(_ComputeWithBus):
    """[evrouter] journal = true: Nova's waits and their outcomes are in the
    journal, a Nova timeout is one `evrouter stuck` from its cause, and
    Nova's lines about an event carry its trace id (issue 23, item 4)."""

    GIVEN = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def broker_flags(self):
        self.bus.own(queues=[journal.stream_name(self.bus.prefix)],
                     exchanges=[journal.stream_name(self.bus.prefix)])
        return {"transport_url": self.bus.url, "journal": True,
                "stuck_after": 1.0}

    def _records(self, wanted):
        consumer = self.hostbus.consumer
        self.assertTrue(consumer.journal.flushed(10))
        found, _ = trace_cmd.read(self.bus.url, self.bus.prefix, wanted, 600,
                                  timeout=20)
        return found

    def test_novas_wait_and_its_outcome_are_in_the_journal(self):
        inst = self._instance()
        passed = []
        real = self.compute.external_instance_event

        def handed(context, instances, events):
            # Nova's current context while it handles the event: the one
            # oslo.log puts on Nova's own lines
            passed.append((context.request_id, getattr(
                oslo_context.get_current(), "request_id", None)))
            return real(context, instances, events)
        self.useFixture(fixtures.MonkeyPatch(
            "nova.compute.manager.ComputeManager.external_instance_event",
            lambda _self, *a: handed(*a)))
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=20):
            env = self._publish(inst, headers={"traceparent": self.GIVEN})
        trace = self.GIVEN[3:35]
        request = f"req-{uuid.UUID(hex=trace)}"
        self.assertEqual([(request, request)], passed)
        # and the thread's context is what it was before that event: the
        # next event's lines do not carry this one's request id
        self.assertIsNone(self.hostbus.consumer.current_trace)
        before = []
        self.hostbus.bridge.trace_of = lambda: before.append(
            oslo_context.get_current()) or None
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, "port-2")], timeout=20):
            self._publish(inst, tag="port-2")
        self.assertEqual(1, len(before))
        self.assertNotEqual(request, getattr(before[0], "request_id", None))
        # handed to Nova under the bridge's own context, not the last trace's
        self.assertEqual(2, len(passed))
        self.assertNotIn(request, passed[1])
        self.assertIn(f"trace {trace}, Nova request {request}",
                      self.stdlog.logger.output)
        wait_until(lambda: self.hostbus.consumer.journal.stats["written"] >= 8,
                   10, "the host's records written")
        hops = [(r["hop"], r["svc"]) for r in self._records(PORT)]
        svc = f"host:{HOST}"
        # in the order they happened: taken from the queue before the
        # waiter woke, the match said after
        self.assertEqual([(journal.WAIT_STARTED, svc), (journal.DELIVERED, svc),
                          (journal.WAIT_ENDED, svc), (journal.MATCHED, svc)],
                         hops)
        ended = [r for r in self._records(PORT)
                 if r["hop"] == journal.WAIT_ENDED][0]
        self.assertTrue(ended["detail"].startswith(f"woken by {env.id}"),
                        ended["detail"])

    def test_a_nova_timeout_is_one_query_from_its_cause(self):
        inst = self._instance()
        self.assertRaises(
            exception.InstanceEventTimeout, self._wait, inst, 1.6)
        wait_until(lambda: self.hostbus.consumer.waits.stats["stuck"] == 1, 5,
                   "the wait recorded stuck")
        self.assertTrue(self.hostbus.consumer.journal.flushed(10))
        trusted = routing.Policy(lifecycle_trusted_users=frozenset({"guest"}))
        waits, _ = stuck_cmd.find(self.bus.url, self.bus.prefix, 600,
                                  policy=trusted, include_ended=True,
                                  timeout=20)
        self.assertEqual(1, len(waits))
        w = waits[0]
        self.assertEqual((HOST, inst.uuid, PORT), (w.host, w.instance, w.port))
        self.assertTrue(w.ended.startswith("was stuck; Nova's wait timed out"),
                        w.ended)
        self.assertEqual(stuck_cmd.NEVER_PUBLISHED, w.kind)
        # and it is no longer current
        self.assertEqual([], stuck_cmd.find(self.bus.url, self.bus.prefix, 600,
                                            policy=trusted, timeout=20)[0])

    def _wait(self, inst, timeout):
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=timeout):
            pass


class EvrouterNovaComputeOverTLSTest(EvrouterNovaComputeTest):
    """Every test above again, with deploy/openstack/nova-compute.conf's TLS
    settings as written (the test's CA, certificate and broker address in
    place of the example's): the host consumer logs in to the TLS node by
    its certificate, with no password in nova.conf; the router is its own
    x509 user."""

    def routed_bus(self):
        from tests.tls.nodes import routed_tls_bus
        bus, router, self.tls = routed_tls_bus([HOST], self.addCleanup)
        return bus, router

    def broker_flags(self):
        d, guide = self.tls, self.guide
        cert, key = d.node.client(d.compute(HOST))
        parsed = urllib.parse.urlsplit(guide.transport_url)
        self.assertIsNone(parsed.password)
        return {"transport_url": d.url(d.compute(HOST)), "ssl": guide.ssl,
                "ssl_login": guide.ssl_login,
                "ssl_cert_login_from": guide.ssl_cert_login_from,
                "ssl_ca_file": d.node.ca, "ssl_cert_file": cert, "ssl_key_file": key}

    def test_the_host_consumer_is_the_hosts_x509_user_over_tls(self):
        conn = self.hostbus.consumer.connection
        self.assertEqual(self.tls.compute(HOST), connection.user_of(conn))
        self.assertEqual("EXTERNAL", conn.login_method)
        self.assertIn(conn.connection.transport.sock.version(), ("TLSv1.2", "TLSv1.3"))
        self.assertNotIn("@", nova_driver._conf().evrouter.transport_url)
        # the broker's side: that user, by EXTERNAL, over TLS
        listed = self.tls.node.ctl("list_connections", "-p", self.tls.vhost, "user",
                                   "auth_mechanism", "ssl").stdout
        self.assertIn(f"{self.tls.compute(HOST)}\tEXTERNAL\ttrue", listed)

    def test_a_missing_certificate_file_stops_init_host_in_one_line(self):
        self.compute.driver.cleanup_host(HOST)
        self.flags(ssl_cert_file="/nonexistent/compute.pem", group="evrouter")
        with self.assertRaises(ValueError) as caught:
            self.compute.driver.init_host(HOST)
        self.assertEqual("[evrouter] ssl_cert_file = /nonexistent/compute.pem: "
                         "No such file or directory", str(caught.exception))


class EvrouterLiveMigrationTest(_ComputeWithBus):
    """The source's wait in Nova 34's own _do_pre_live_migration_from_source
    is woken by the destination's plug as Neutron's notifier on the bus sends
    it (network/neutron_transport.py: the ACTIVE binding's host, the source,
    as hint); events for an instance that left this host are not current."""

    def _live_migrate_from_here(self, inst, plug):
        from nova.objects import migrate_data as migrate_data_obj
        migration = objects.Migration(
            context=self.context, source_compute=HOST, dest_compute=DEST,
            instance_uuid=inst.uuid, migration_type="live-migration",
            status="preparing")
        migration.create()

        def pre_live_migration_on_dest(ctxt, instance, block_migration, disk,
                                       host, migrate_data):
            self.assertEqual(DEST, host)
            if plug:      # the destination's agent wires the port
                self._publish(instance)
            migrate_data.wait_for_vif_plugged = True
            return migrate_data

        self.useFixture(fixtures.MockPatchObject(
            self.compute.compute_rpcapi, "pre_live_migration",
            side_effect=pre_live_migration_on_dest))
        cleanup = self.useFixture(fixtures.MockPatchObject(
            self.compute, "_cleanup_pre_live_migration")).mock
        result = self.compute._do_pre_live_migration_from_source(
            self.context, DEST, inst, False, migration,
            migrate_data_obj.LibvirtLiveMigrateData(), source_bdms=[])
        return result, cleanup

    def test_source_wait_is_woken_by_the_destinations_plug(self):
        self.flags(vif_plugging_timeout=20, vif_plugging_is_fatal=True)
        inst = self._instance(vifs=[PORT])
        started = time.monotonic()
        result, cleanup = self._live_migrate_from_here(inst, plug=True)
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(result.wait_for_vif_plugged)
        cleanup.assert_not_called()
        self.assertEqual(1, self.hostbus.bridge.stats["woke_nova"])

    def test_without_the_plug_the_source_times_out_as_nova_does(self):
        self.flags(vif_plugging_timeout=1, vif_plugging_is_fatal=True)
        inst = self._instance(vifs=[PORT])
        self.assertRaises(exception.MigrationError,
                          self._live_migrate_from_here, inst, False)

    def test_event_for_an_instance_that_left_this_host_is_not_held(self):
        inst = self._instance(host=DEST)        # migrated away, no migration now
        self._publish(inst)
        wait_until(lambda: self.hostbus.bridge.stats["not_here"] == 1, 15,
                   "the event judged")
        self.assertEqual(0, self.hostbus.bridge.registry.held)
        # It comes back later and waits: that old event must not answer.
        inst.host = HOST
        inst.save()
        self.assertRaises(exception.InstanceEventTimeout, self._wait_briefly, inst)

    def test_event_for_an_instance_migrating_to_this_host_is_held(self):
        inst = self._instance(host=DEST)
        migration = objects.Migration(
            context=self.context, source_compute=DEST, dest_compute=HOST,
            instance_uuid=inst.uuid, migration_type="resize", status="pre-migrating")
        migration.create()
        inst.migration_context = objects.MigrationContext(
            instance_uuid=inst.uuid, migration_id=migration.id)
        inst.save()
        self._publish(inst)
        wait_until(lambda: self.hostbus.bridge.registry.held == 1, 15,
                   "the event held")
        self.assertEqual(0, self.hostbus.bridge.stats["not_here"])

    def test_network_changed_for_an_instance_that_left_is_not_handed_to_nova(self):
        inst = self._instance(host=DEST)
        with mock.patch.object(self.compute.network_api,
                               "get_instance_nw_info") as nw:
            self._publish(inst, name=contract.NETWORK_CHANGED)
            wait_until(lambda: self.hostbus.bridge.stats["not_here"] == 1, 15,
                       "the event judged")
        nw.assert_not_called()


class ConcurrencyModeTest(NovaTestCase):
    """The mode .ci/openstack asked for is the one Nova runs in."""

    def test_nova_runs_in_the_mode_asked_for(self):
        import os

        from nova import utils
        eventlet = os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] == "0"
        self.assertEqual(not eventlet, utils.concurrency_mode_threading())
        if eventlet:
            import eventlet.patcher
            self.assertTrue(eventlet.patcher.is_monkey_patched("thread"))


class EvrouterDisabledRollbackTest(NovaTestCase):
    """``[evrouter] enabled = false``: the README's rollback, "the driver is
    then exactly the real one": the real class, Nova's own registry, no
    evrouter thread."""

    def test_disabled_driver_is_exactly_the_real_one(self):
        from nova.virt import fake
        nova_driver._conf()
        conf = deploy_config.nova_compute_conf()
        self.flags(compute_driver=conf["DEFAULT"]["compute_driver"], host=HOST)
        self.flags(compute_driver="fake.SmallFakeDriver", enabled=False,
                   group="evrouter")
        threads_before = set(threading.enumerate())
        compute = compute_manager.ComputeManager()
        compute.driver.init_host(HOST)
        self.addCleanup(compute.driver.cleanup_host, HOST)
        self.assertIs(type(compute.driver), fake.SmallFakeDriver)
        self.assertNotIsInstance(compute.driver, nova_driver._BusDriver)
        self.assertIs(type(compute.instance_events), compute_manager.InstanceEvents)
        self.assertFalse([t for t in set(threading.enumerate()) - threads_before
                          if t.name.startswith("evrouter")])
