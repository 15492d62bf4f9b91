"""Nova 34's own ComputeManager and ComputeVirtAPI.wait_for_instance_event,
in-process, with evrouter's compute driver configured as the adoption guide
says (deploy/openstack/nova-compute.conf) around Nova's fake driver, fed by
the real RabbitMQ through the router.
"""

import threading
import time
import uuid
from unittest import mock

from nova import context as nova_context
from nova import exception, objects, test
from nova.compute import manager as compute_manager
from nova.compute import power_state, vm_states
from nova.network import model as network_model
from oslo_utils import timeutils

from compute import nova_driver
from router.bus import contract
from tests.conftest import queue_depth, routed_bus
from tests.functional.waiter_harness import publish_with_kombu
from tests.openstack import deploy_config

HOST = "cmp-1"
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


class EvrouterNovaComputeTest(NovaTestCase):

    def setUp(self):
        super().setUp()
        self.bus, self.router = routed_bus([HOST], self.addCleanup)

        conf = deploy_config.nova_compute_conf()
        nova_driver._conf()     # registers [evrouter] in Nova's CONF
        # The guide's settings, with the fake driver for libvirt and this
        # test's slice of the broker.
        self.flags(compute_driver=conf["DEFAULT"]["compute_driver"], host=HOST)
        self.flags(compute_driver="fake.SmallFakeDriver",
                   transport_url=conf["evrouter"]["transport_url"],
                   topology_prefix=self.bus.prefix,
                   hold_seconds=float(conf["evrouter"]["hold_seconds"]),
                   group="evrouter")
        self.context = nova_context.get_admin_context()
        self.compute = compute_manager.ComputeManager()
        self.assertIsInstance(self.compute.driver, nova_driver._BusDriver)
        self.compute.driver.init_host(HOST)
        self.addCleanup(self.compute.driver.cleanup_host, HOST)
        self.hostbus = self.compute.driver._evrouter
        wait_until(self.hostbus.consumer.ready.is_set, 15, "the host consumer")

    def _instance(self):
        flavor = objects.Flavor.get_by_name(self.context, "m1.tiny")
        inst = objects.Instance(context=self.context)
        inst.uuid = str(uuid.uuid4())
        inst.vm_state = vm_states.BUILDING
        inst.task_state = "spawning"
        inst.power_state = power_state.NOSTATE
        inst.user_id = "u"
        inst.project_id = "p"
        inst.host = HOST
        inst.node = HOST
        inst.compute_id = 1
        inst.instance_type_id = flavor.id
        inst.memory_mb = inst.vcpus = inst.root_gb = inst.ephemeral_gb = 0
        inst.flavor = flavor
        inst.launched_at = timeutils.utcnow()
        inst.system_metadata = {}
        inst.info_cache = objects.InstanceInfoCache(
            network_info=network_model.NetworkInfo([]))
        inst.create()
        return inst

    def _publish(self, inst, name=contract.VIF_PLUGGED, status="completed",
                 message_id=None, tag=PORT):
        env = contract.envelope(
            contract.InstanceEvent(name, inst.uuid, tag, status, HOST),
            "neutron@test", message_id=message_id)
        publish_with_kombu(self.bus, env)
        return env

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

    def _wait_briefly(self, inst):
        with self.compute.virtapi.wait_for_instance_event(
                inst, [(contract.VIF_PLUGGED, PORT)], timeout=0.5):
            pass

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
        self.hostbus.bridge.registry.max_clock_skew = 0.1
        began = time.time()
        self.assertRaises(exception.InstanceEventTimeout, self._wait_briefly, inst)
        # An event created during the first wait, arriving late.
        env = contract.envelope(
            contract.InstanceEvent(contract.VIF_PLUGGED, inst.uuid, PORT,
                                   "completed", HOST),
            "neutron@test", created_at=began + 0.1)
        outcome = self.hostbus.bridge.deliver(env.payload, env.id,
                                              created_at=env.created_at)
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


class EvrouterDisabledRollbackTest(NovaTestCase):
    """``[evrouter] enabled = false``: the real driver, Nova's own registry."""

    def test_disabled_driver_leaves_nova_as_it_was(self):
        nova_driver._conf()
        conf = deploy_config.nova_compute_conf()
        self.flags(compute_driver=conf["DEFAULT"]["compute_driver"], host=HOST)
        self.flags(compute_driver="fake.SmallFakeDriver", enabled=False,
                   group="evrouter")
        compute = compute_manager.ComputeManager()
        compute.driver.init_host(HOST)
        self.addCleanup(compute.driver.cleanup_host, HOST)
        self.assertIsNone(compute.driver._evrouter)
        self.assertIs(type(compute.instance_events), compute_manager.InstanceEvents)
