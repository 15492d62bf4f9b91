"""Neutron 29's real ML2 plugin (its own unit-test DB base, SQLite) with
evrouter's service plugin loaded as neutron.conf loads it, publishing to the
real RabbitMQ through the router to the bound host's queue.
"""

import threading
import urllib.parse

import fixtures
from neutron.plugins.ml2 import rpc as ml2_rpc
from neutron.tests.unit.plugins.ml2 import test_plugin as ml2_test
from neutron_lib import constants
from neutron_lib import context as n_context
from neutron_lib.plugins import directory
from oslo_config import cfg
from oslo_context import context as oslo_context

from network import neutron_plugin
from router.bus import contract, tracecontext
from tests.conftest import collect, routed_bus
from tests.openstack import deploy_config

HOST = "host-ovs-no_filter"   # a host the ML2 test mechanism driver binds
SERVER = "9ed3bb9a-0c57-4a53-8e0f-1f3f7a4c0d11"


class RecordingPublisher:
    """Wraps the real publisher: what was published, in order."""

    def __init__(self, real):
        self.real = real
        self.published = []
        self.lock = threading.Lock()

    def publish(self, event, **kwargs):
        with self.lock:
            self.published.append((event, kwargs.get("message_id")))
        return self.real.publish(event, **kwargs)

    def close(self, timeout=30.0):
        self.real.close(timeout)


class EvrouterMl2Test(ml2_test.Ml2PluginV2TestCase):
    """ML2 + evrouter's plugin, as `service_plugins = evrouter` loads it."""

    def get_additional_service_plugins(self):
        # The entry point name, resolved the way Neutron resolves it.
        return {"evrouter": deploy_config.neutron_service_plugin_name()}

    def setUp(self):
        super().setUp()
        self.bus, self.router = self.routed_bus()
        self.guide = deploy_config.load_with_oslo("neutron.conf", neutron_plugin.OPTS)
        self.plugin_evr = directory.get_plugin("evrouter")
        self.assertIsInstance(self.plugin_evr, neutron_plugin.EvrouterNotifierPlugin)
        self.plugin_evr.conf.set_override(
            "topology_prefix", self.bus.prefix, group="evrouter")
        for name, value in self.broker_overrides().items():
            self.plugin_evr.conf.set_override(name, value, group="evrouter")
            self.addCleanup(self.plugin_evr.conf.clear_override, name, group="evrouter")
        self.recorder = None
        real_factory = self.plugin_evr._new_publisher

        def factory():
            self.recorder = RecordingPublisher(real_factory())
            return self.recorder

        self.plugin_evr._publisher_factory = factory
        self.addCleanup(self.plugin_evr.stop)
        self.ctx = n_context.get_admin_context()

    def routed_bus(self):
        return routed_bus([HOST], self.addCleanup)

    def broker_overrides(self):
        """On plain TCP to the main broker as guest: not the guide's TLS."""
        return {"transport_url": self.bus.url}

    def _compute_port(self, host=HOST, net=None):
        if net is None:
            net = self._make_network(self.fmt, "net", True)
            self._make_subnet(self.fmt, net, "10.0.0.1", "10.0.0.0/24")
        return self._make_port(
            self.fmt, net["network"]["id"], as_admin=True,
            arg_list=("device_owner", "device_id", "binding:host_id"),
            device_owner="compute:nova", device_id=SERVER,
            **{"binding:host_id": host})["port"]

    def _host_events(self, count, timeout=15):
        messages = collect(self.bus.url, self.bus.topology.host_queue_name(HOST),
                           count, timeout)
        return [contract.decode(m.body).payload for m in messages]

    def test_agent_reports_device_up_publishes_vif_plugged_to_the_bound_host(self):
        port = self._compute_port()
        self.assertEqual(constants.PORT_STATUS_DOWN, port["status"])
        # What an L2 agent does when it has wired the port on its host.
        ml2_rpc.RpcCallbacks(None, None).update_device_up(
            self.ctx, agent_id="ovs-agent-cmp-1", device=port["id"], host=HOST)
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self.plugin.get_port(self.ctx, port["id"])["status"])
        got = self._host_events(1)
        self.assertEqual(1, len(got), "no event reached the host's queue")
        event = got[0]
        self.assertEqual((contract.VIF_PLUGGED, SERVER, port["id"], "completed", HOST),
                         (event.name, event.server_uuid, event.tag, event.status,
                          event.host))

    def test_the_event_carries_the_trace_of_neutrons_request(self):
        port = self._compute_port()
        request = "req-0af76519-16cd-43dd-8448-eb211c80319c"
        # the agent's RPC context, made the thread's current one as
        # oslo.messaging's RPC server does: Neutron's lines carry this id
        ctx = n_context.Context(user_id="agent", project_id="p", is_admin=True,
                                request_id=request, overwrite=True)
        self.addCleanup(lambda: vars(oslo_context._request_store).pop(
            "context", None))
        ml2_rpc.RpcCallbacks(None, None).update_device_up(
            ctx, agent_id="ovs-agent-cmp-1", device=port["id"], host=HOST)
        [m] = collect(self.bus.url, self.bus.topology.host_queue_name(HOST),
                      1, 15)
        self.assertEqual(contract.VIF_PLUGGED, contract.decode(m.body).payload.name)
        self.assertEqual("0af7651916cd43dd8448eb211c80319c",
                         tracecontext.trace_id_of(m.headers[tracecontext.HEADER]))

    def test_status_to_error_is_a_failed_plug_and_active_to_down_an_unplug(self):
        port = self._compute_port()
        self.plugin.update_port_status(self.ctx, port["id"], "ERROR", HOST)
        self.plugin.update_port_status(self.ctx, port["id"], "DOWN", HOST)
        self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        self.plugin.update_port_status(self.ctx, port["id"], "DOWN", HOST)
        names = [(e.name, e.status) for e, _ in self.recorder.published]
        self.assertEqual([(contract.VIF_PLUGGED, "failed"),
                          (contract.VIF_PLUGGED, "completed"),
                          (contract.VIF_UNPLUGGED, "completed")], names)
        self.assertEqual(3, len(self._host_events(3)))

    def test_nothing_for_a_port_no_instance_owns(self):
        with self.port() as port:
            self.plugin.update_port_status(self.ctx, port["port"]["id"], "ACTIVE")
        self.assertIsNone(self.recorder)

    def test_api_update_is_network_changed_and_delete_vif_deleted(self):
        port = self._compute_port()
        self._update("ports", port["id"], {"port": {"name": "renamed"}},
                     as_admin=True)
        self._delete("ports", port["id"], as_admin=True)
        names = [e.name for e, _ in self.recorder.published]
        self.assertEqual([contract.NETWORK_CHANGED, contract.VIF_DELETED], names)
        got = self._host_events(2)
        self.assertEqual([contract.NETWORK_CHANGED, contract.VIF_DELETED],
                         [e.name for e in got])

    def test_message_ids_are_stable_per_port_revision(self):
        port = self._compute_port()
        self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        (event, mid), = self.recorder.published
        latest = self.plugin.get_port(self.ctx, port["id"])
        self.assertEqual(mid, neutron_plugin.message_id(
            latest, event.name, event.status))

    def test_live_migration_suppression_is_honoured(self):
        from neutron.notifiers import nova as nova_notifier
        port = self._compute_port()
        notifier = nova_notifier.Notifier.__new__(nova_notifier.Notifier)
        with notifier.context_enabled(False):
            self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        self.assertIsNone(self.recorder)

    def _api(self, method, resource, data, id=None):
        if method == "POST":
            req = self.new_create_request(resource, data, self.fmt, as_admin=True)
        else:
            req = self.new_update_request(resource, data, id, as_admin=True)
        res = req.get_response(self.api)
        self.assertLess(res.status_int, 300, res.body)
        return self.deserialize(self.fmt, res)

    def test_floating_ip_association_and_move_are_network_changed(self):
        from neutron_lib.plugins import constants as plugin_constants
        l3 = directory.get_plugin(plugin_constants.L3)
        ext = self._make_network(self.fmt, "ext", True, as_admin=True,
                                 arg_list=("router:external",),
                                 **{"router:external": True})
        self._make_subnet(self.fmt, ext, "172.16.0.1", "172.16.0.0/24")
        net = self._make_network(self.fmt, "net", True)
        subnet = self._make_subnet(self.fmt, net, "10.0.0.1", "10.0.0.0/24")
        port_a = self._compute_port(net=net)
        port_b = self._compute_port(net=net)
        router = l3.create_router(self.ctx, {"router": {
            "name": "r", "admin_state_up": True, "tenant_id": self._project_id,
            "external_gateway_info": {"network_id": ext["network"]["id"]}}})
        l3.add_router_interface(self.ctx, router["id"],
                                {"subnet_id": subnet["subnet"]["id"]})
        fip = self._api("POST", "floatingips", {"floatingip": {
            "floating_network_id": ext["network"]["id"],
            "port_id": port_a["id"], "tenant_id": self._project_id}})["floatingip"]
        self._api("PUT", "floatingips", {"floatingip": {"port_id": port_b["id"]}},
                  fip["id"])
        tags = [e.tag for e, _ in self.recorder.published
                if e.name == contract.NETWORK_CHANGED]
        # Associated with A; moved from A to B: both told, as Neutron's notifier.
        self.assertEqual(sorted([port_a["id"], port_a["id"], port_b["id"]]),
                         sorted(tags))


class EvrouterMl2OverTLSTest(EvrouterMl2Test):
    """Every test above again, with deploy/openstack/neutron.conf's TLS
    settings as written (the test's CA, certificate and broker address in
    place of the example's): the plugin's publisher logs in to the TLS node
    as the network user by its certificate; the router is its own x509 user."""

    def routed_bus(self):
        from tests.tls.nodes import routed_tls_bus
        bus, router, self.tls = routed_tls_bus([HOST], self.addCleanup)
        return bus, router

    def broker_overrides(self):
        d, guide = self.tls, self.guide
        cert, key = d.node.client(d.network)
        self.assertIsNone(urllib.parse.urlsplit(guide.transport_url).password)
        return {"transport_url": d.url(d.network), "ssl": guide.ssl,
                "ssl_login": guide.ssl_login,
                "ssl_cert_login_from": guide.ssl_cert_login_from,
                "ssl_ca_file": d.node.ca, "ssl_cert_file": cert, "ssl_key_file": key}

    def test_events_carry_the_network_users_certificate_identity(self):
        port = self._compute_port()
        self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        [message] = collect(self.bus.url, self.bus.topology.host_queue_name(HOST), 1)
        # the router copies the user_id the broker validated: the CN of the
        # plugin's certificate, no password anywhere in neutron.conf
        self.assertEqual(self.tls.network, message.headers[contract.HEADER_PUBLISHER])

    def test_a_ca_file_gone_at_run_time_spools_and_never_fails_the_request(self):
        """The options were right when neutron-server started; the CA file
        went away since: the request succeeds, the event is spooled (with
        the ids in one ERROR line) and sent once a publisher can start."""
        spool_dir = self.useFixture(fixtures.TempDir()).path
        self.plugin_evr.conf.set_override("spool_path", f"{spool_dir}/spool",
                                          group="evrouter")
        self.addCleanup(self.plugin_evr.conf.clear_override, "spool_path",
                        group="evrouter")
        ca = self.plugin_evr.conf.evrouter.ssl_ca_file
        self.plugin_evr.conf.set_override("ssl_ca_file", "/nonexistent/ca.pem",
                                          group="evrouter")
        with self.assertLogs("network.neutron_plugin", "ERROR") as logs:
            port = self._compute_port()
            self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self.plugin.get_port(self.ctx, port["id"])["status"])
        said = "\n".join(logs.output)
        self.assertIn("spooled to", said)
        self.assertIn("[evrouter] ssl_ca_file = /nonexistent/ca.pem: No such file or "
                      "directory", said)
        # The CA is back (the operator fixed it; a restart does the same
        # with a new pid, see adopt_orphans): the next publisher sends it.
        self.plugin_evr.conf.set_override("ssl_ca_file", ca, group="evrouter")
        self.plugin_evr.publisher()
        self.assertTrue(self.recorder.real.wait_drained(15))
        [message] = collect(self.bus.url, self.bus.topology.host_queue_name(HOST), 1)
        self.assertEqual(port["device_id"],
                         contract.decode(message.body).payload.server_uuid)

    def test_an_event_the_broker_did_not_take_is_one_error_line_not_a_traceback(self):
        """No spool and no broker: each event lost is said once, in one
        line naming it and why (a traceback per event, plus the
        publisher's own line, flooded the log under an outage)."""
        self.plugin_evr.conf.set_override(
            "transport_url", "amqp://guest:guest@127.0.0.1:1//", group="evrouter")
        self.addCleanup(self.plugin_evr.conf.set_override, "transport_url",
                        self.bus.url, group="evrouter")
        with self.assertLogs("network.neutron_plugin", "ERROR") as logs:
            port = self._compute_port()
            self.plugin.update_port_status(self.ctx, port["id"], "ACTIVE", HOST)
        self.assertEqual(constants.PORT_STATUS_ACTIVE,
                         self.plugin.get_port(self.ctx, port["id"])["status"])
        lost = [r for r in logs.records if "NOT published" in r.getMessage()]
        self.assertEqual(1, len(lost), logs.output)
        self.assertIsNone(lost[0].exc_info)
        self.assertIn("NOT published: BrokerUnavailable: not confirmed by",
                      lost[0].getMessage())
        self.assertIn(port["device_id"], lost[0].getMessage())

    def test_a_wrong_tls_option_stops_the_plugin_from_loading(self):
        """As nova-compute's init_host stops on a wrong [evrouter] option:
        neutron-server does not start on a configuration that would lose
        every event Nova hears (replace_nova_notifier)."""
        conf = cfg.ConfigOpts()
        neutron_plugin.register_opts(conf)
        conf([], project="neutron")
        conf.set_override("transport_url", self.tls.url(self.tls.network),
                          group="evrouter")
        conf.set_override("ssl", True, group="evrouter")
        conf.set_override("ssl_ca_file", "/nonexistent/ca.pem", group="evrouter")
        with self.assertRaises(ValueError) as caught:
            neutron_plugin.EvrouterNotifierPlugin(conf)
        self.assertIn("[evrouter] ssl_ca_file = /nonexistent/ca.pem",
                      str(caught.exception))
