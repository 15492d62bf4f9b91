"""Neutron 29's own nova notifier carried by the bus ([evrouter]
replace_nova_notifier = true): every event Neutron sends Nova, by every
door -- ML2's flush listeners, update_device_up from a host the port is not
bound to (live migration), OVN's set_port_status_up/down, the API's
network-changed and network-vif-deleted -- reaches the host's queue through
the real router, at once, and nothing reaches nova-api's REST (any HTTP
request is recorded). A control runs the stock notifier under the same
recorder: it POSTs, the second event of a burst 2 s after the first.
"""

import time
from unittest import mock

import requests_mock
from keystoneauth1 import noauth
from keystoneauth1 import session as ks_session
from neutron.db import models_v2
from neutron.notifiers import nova as nova_notifier
from neutron.plugins.ml2 import rpc as ml2_rpc
from neutron.plugins.ml2.drivers.ovn.mech_driver import mech_driver as ovn_mech
from neutron.tests.unit.plugins.ml2 import test_plugin as ml2_test
from neutron_lib import context as n_context
from neutron_lib.db import api as db_api
from neutron_lib.plugins import directory
from oslo_config import cfg
from sqlalchemy import event as sa_event

from network import neutron_options, neutron_transport
from router.bus import contract
from tests.conftest import collect, routed_bus
from tests.openstack import deploy_config
from tests.openstack.test_neutron_plugin import RecordingPublisher

SOURCE = "host-ovs-no_filter"     # hosts ML2's test mechanism driver binds
DEST = "host-bridge-filter"
SERVER = "9ed3bb9a-0c57-4a53-8e0f-1f3f7a4c0d11"
NOVA = "http://nova.test:8774/v2.1"
EVENTS_URL = f"{NOVA}/os-server-external-events"


class Boom(Exception):
    pass


class _NotifierTest(ml2_test.Ml2PluginV2TestCase):
    replace = True

    def get_additional_service_plugins(self):
        return {"evrouter": deploy_config.neutron_service_plugin_name()}

    def setUp(self):
        if "evrouter" not in cfg.CONF:
            neutron_options.register_opts(cfg.CONF)
        step3 = deploy_config.neutron_bus_notifier_conf()
        self.assertEqual("true", step3["DEFAULT"]["notify_nova_on_port_status_changes"])
        replace = self.replace and step3.getboolean("evrouter", "replace_nova_notifier")
        cfg.CONF.set_override("replace_nova_notifier", replace, group="evrouter")
        self.addCleanup(cfg.CONF.clear_override, "replace_nova_notifier",
                        group="evrouter")
        # A notifier of this test's own (Neutron keeps one per process).
        nova_notifier.Notifier._instance = None
        self.addCleanup(setattr, nova_notifier.Notifier, "_instance", None)
        # Every HTTP request anyone makes, recorded; nova-api's answer faked.
        self.http = requests_mock.Mocker()
        self.http.start()
        self.addCleanup(self.http.stop)
        self.answered = []
        self.http.register_uri(requests_mock.ANY, requests_mock.ANY, json=self._answer)
        # Neutron's test base turns its nova notifier off and stubs the batch
        # sender; production has both on (notify_nova_on_port_status_changes
        # defaults to true), and ML2 calls notify_port_active_direct only then.
        real_set_override = cfg.CONF.set_override

        def keep_the_notifier(name, override, group=None):
            if name != "notify_nova_on_port_status_changes":
                real_set_override(name, override, group)

        with mock.patch.object(cfg.CONF, "set_override", keep_the_notifier):
            super().setUp()
        self.patch_notifier.stop()
        self.assertTrue(cfg.CONF.notify_nova_on_port_status_changes)
        self.bus, self.router = routed_bus([SOURCE, DEST], self.addCleanup)
        self.evr = directory.get_plugin("evrouter")
        self.evr.conf.set_override("topology_prefix", self.bus.prefix, group="evrouter")
        # On plain TCP to the main broker as guest, not the guide's TLS (the
        # TLS variants of the plugin's transport are test_neutron_plugin's).
        self.evr.conf.set_override("transport_url", self.bus.url, group="evrouter")
        self.addCleanup(self.evr.conf.clear_override, "transport_url", group="evrouter")
        self.recorder = None
        real_factory = self.evr._new_publisher

        def factory():
            self.recorder = RecordingPublisher(real_factory())
            return self.recorder

        self.evr._publisher_factory = factory
        self.addCleanup(self.evr.stop)
        self.notifier = self.plugin.nova_notifier
        self.notifier.session = ks_session.Session(auth=noauth.NoAuth(endpoint=NOVA))
        self.ctx = n_context.get_admin_context()

    def _answer(self, request, context):
        self.answered.append(time.monotonic())
        return {"events": [{"code": 200, "status": "completed"}]}

    def _compute_port(self, host=SOURCE):
        net = self._make_network(self.fmt, "net", True)
        self._make_subnet(self.fmt, net, "10.0.0.1", "10.0.0.0/24")
        return self._make_port(
            self.fmt, net["network"]["id"], as_admin=True,
            arg_list=("device_owner", "device_id", "binding:host_id"),
            device_owner="compute:nova", device_id=SERVER,
            **{"binding:host_id": host})["port"]

    def _device_up(self, port, host):
        ml2_rpc.RpcCallbacks(None, None).update_device_up(
            self.ctx, agent_id=f"ovs-agent-{host}", device=port["id"], host=host)

    def _published(self):
        return [] if self.recorder is None else [e for e, _ in self.recorder.published]

    def _queue(self, host, count, timeout=15):
        return [contract.decode(m.body).payload for m in collect(
            self.bus.url, self.bus.topology.host_queue_name(host), count, timeout)]

    def rest_posts(self):
        return [r for r in self.http.request_history if r.method == "POST"]


class BusCarriesNeutronsNotifierTest(_NotifierTest):

    def test_device_up_is_on_the_bus_at_once_and_nothing_over_rest(self):
        ports = [self._compute_port() for _ in range(2)]
        for i, port in enumerate(ports):
            self._device_up(port, SOURCE)
            # Published (confirmed) before the agent's RPC returned: no batch.
            self.assertEqual(i + 1, len(self._published()))
        got = self._queue(SOURCE, 2)
        self.assertEqual({(contract.VIF_PLUGGED, p["id"], "completed", SOURCE)
                          for p in ports},
                         {(e.name, e.tag, e.status, e.host) for e in got})
        self.assertEqual([], self.http.request_history)
        self.assertEqual(0, self.evr.carrier.stats["rest_refused"])

    def test_live_migration_destination_plug_goes_to_the_source(self):
        port = self._compute_port()
        self._device_up(port, SOURCE)
        # Nova's pre-live-migration: an inactive binding on the destination.
        self.plugin.create_port_binding(self.ctx, port["id"], {"binding": {
            "host": DEST}})
        before = len(self._published())
        # The destination's agent wires it: ML2's update_device_up finds the
        # port not bound there and calls notify_port_active_direct.
        with mock.patch.object(self.notifier, "notify_port_active_direct",
                               wraps=self.notifier.notify_port_active_direct) as direct:
            self._device_up(port, DEST)
        direct.assert_called_once()
        event = self._published()[before]
        self.assertEqual((contract.VIF_PLUGGED, SERVER, port["id"], "completed", SOURCE),
                         (event.name, event.server_uuid, event.tag, event.status,
                          event.host))
        on_source = self._queue(SOURCE, 2)
        self.assertEqual([SOURCE, SOURCE], [e.host for e in on_source])
        self.assertEqual([], self._queue(DEST, 1, timeout=1))
        self.assertEqual([], self.http.request_history)

    def _ovn(self):
        """OVN's mechanism driver methods on a stand-in for its OVSDB side."""
        driver = mock.Mock()
        driver._plugin = self.plugin
        driver._update_dnat_entry_if_needed = lambda *a, **kw: None
        for name in ("_should_notify_nova", "_insert_port_provisioning_block"):
            setattr(driver, name, getattr(ovn_mech.OVNMechanismDriver, name)
                    .__get__(driver))
        return driver

    def test_ovn_status_up_of_an_active_port_and_status_down(self):
        port = self._compute_port()
        self._device_up(port, SOURCE)
        driver = self._ovn()
        # OVN's PortBindingChassisUpdateEvent path for an already ACTIVE port.
        ovn_mech.OVNMechanismDriver.set_port_status_up(driver, port["id"])
        ovn_mech.OVNMechanismDriver.set_port_status_down(driver, port["id"])
        names = [e.name for e in self._published()]
        self.assertEqual([contract.VIF_PLUGGED, contract.VIF_PLUGGED],
                         names[:2])
        self.assertIn(contract.VIF_UNPLUGGED, names[2:])
        self.assertEqual(len(names), len(self._queue(SOURCE, len(names))))
        self.assertEqual([], self.http.request_history)

    def test_api_update_and_delete_carry_neutrons_events_with_the_host(self):
        port = self._compute_port()
        self._update("ports", port["id"], {"port": {"name": "renamed"}}, as_admin=True)
        self._delete("ports", port["id"], as_admin=True)
        got = self._queue(SOURCE, 2)
        self.assertEqual([(contract.NETWORK_CHANGED, SOURCE), (contract.VIF_DELETED, SOURCE)],
                         [(e.name, e.host) for e in got])
        self.assertEqual([], self.http.request_history)

    def _set_status(self, port_id, status, fail):
        with db_api.CONTEXT_WRITER.using(self.ctx):
            row = self.ctx.session.query(models_v2.Port).filter_by(id=port_id).one()
            row.status = status
            self.ctx.session.flush()    # Neutron's listeners run here
            if fail:
                raise Boom()

    def test_a_status_change_is_published_on_commit_never_on_rollback(self):
        port = self._compute_port()
        self.assertRaises(Boom, self._set_status, port["id"], "ACTIVE", True)
        self.assertEqual([], self._published())
        self._set_status(port["id"], "ACTIVE", False)
        self.assertEqual([contract.VIF_PLUGGED], [e.name for e in self._published()])

    def test_two_status_changes_in_one_transaction_both_publish_on_commit(self):
        # The commit must not fail over our hooks (it did: each removed its
        # own listener while SQLAlchemy dispatched after_commit).
        ports = [self._compute_port() for _ in range(2)]
        with db_api.CONTEXT_WRITER.using(self.ctx):
            for port in ports:
                row = self.ctx.session.query(models_v2.Port).filter_by(
                    id=port["id"]).one()
                row.status = "ACTIVE"
            self.ctx.session.flush()
            self.assertEqual([], self._published())     # not before the commit
        self.assertEqual({p["id"] for p in ports}, {e.tag for e in self._published()})
        self.assertEqual(2, len(self._queue(SOURCE, 2)))

    def test_neutrons_live_migration_suppression_still_decides(self):
        port = self._compute_port()
        with self.notifier.context_enabled(False):
            self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", SOURCE)
        self.assertEqual([], self._published())

    def test_stop_gives_neutron_its_notifier_back(self):
        theirs = nova_notifier.Notifier.send_port_status.__get__(self.notifier)
        self.assertFalse(sa_event.contains(models_v2.Port, "after_update", theirs))
        self.evr.stop()
        self.assertTrue(sa_event.contains(models_v2.Port, "after_update", theirs))
        self.assertNotIn("send_port_status", vars(self.notifier))
        self.assertNotIsInstance(self.notifier.batch_notifier,
                                 neutron_transport.NotifierOnTheBus)


class StockNotifierControlTest(_NotifierTest):
    """The recorder sees the stock path: REST, batched."""

    replace = False

    def test_stock_notifier_posts_and_batches(self):
        ports = [self._compute_port() for _ in range(2)]
        for port in ports:
            self._device_up(port, SOURCE)
        deadline = time.monotonic() + 10
        while len(self.rest_posts()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        posts = self.rest_posts()
        self.assertEqual([EVENTS_URL, EVENTS_URL], [p.url for p in posts])
        self.assertEqual({contract.VIF_PLUGGED},
                         {e["name"] for p in posts for e in p.json()["events"]})
        # send_events_interval (2 s): the second waits out the first's batch.
        self.assertGreater(self.answered[1] - self.answered[0], 1.5)
