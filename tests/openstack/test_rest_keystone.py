"""The router's REST compatibility endpoint behind keystonemiddleware 13 and
oslo.policy (from the OpenStack environment), on a real socket, feeding the
real broker: authenticated and refused requests, microversion refusals.

Tokens come from keystonemiddleware's own test fixture (AuthTokenFixture),
which stands in for Keystone's token validation only.
"""

import http.client
import json
import uuid

import testtools
from keystonemiddleware import fixture as ksm_fixture
from oslo_config import cfg

from router import rest
from router.bus import contract
from tests.conftest import collect, routed_bus
from tests.openstack import deploy_config

SERVER = "0f5d3c1e-2b1a-4c9e-8f00-000000000001"
HOST = "cmp-1"


class RestKeystoneTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.bus, self.router = routed_bus([HOST], self.addCleanup)
        self.auth = self.useFixture(ksm_fixture.AuthTokenFixture())

        # The guide's configuration file, as `evrouter router` would read it.
        conf = cfg.ConfigOpts()
        conf.register_opts(rest.OPTS, group="router")
        conf([], project="evrouter", default_config_files=[
            str(deploy_config.DEPLOY / "evrouter-rest.conf")])
        # The router's own placement, as `evrouter router` wires it; learnt
        # here from a host snapshot as the lifecycle agent would send it.
        placement = self.router.service.placement
        placement.replace_host(HOST, [(SERVER, "STARTED")])
        self.ingress = rest.RestIngress(self.bus.url, self.bus.topology,
                                        placement).start()
        self.addCleanup(self.ingress.stop)
        # Beyond loopback (all interfaces), allowed because authenticated.
        self.assertEqual("keystone", conf.router.rest_auth_strategy)
        self.server = rest.serve_from_conf(conf, self.ingress.handle)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]

    def post(self, events, token=None, version=None):
        headers = {"Content-Type": "application/json"}
        if token:
            headers["X-Auth-Token"] = token
        if version:
            headers["OpenStack-API-Version"] = f"compute {version}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", rest.PATH, json.dumps({"events": events}), headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def token(self, *roles):
        # add_token_data returns nothing: name the token ourselves.
        token_id = uuid.uuid4().hex
        self.auth.add_token_data(token_id=token_id, role_list=list(roles),
                                 user_name="neutron", project_name="service")
        return token_id

    def vif_plugged(self):
        return [{"name": "network-vif-plugged", "server_uuid": SERVER,
                 "tag": "port-1", "status": "completed"}]

    def test_service_token_is_accepted_and_the_event_reaches_the_host(self):
        status, body = self.post(self.vif_plugged(), self.token("service"), "2.1")
        self.assertEqual(200, status, body)
        self.assertEqual([200], [e["code"] for e in json.loads(body)["events"]])
        [message] = collect(self.bus.url, self.bus.topology.host_queue_name(HOST), 1)
        event = contract.decode(message.body).payload
        self.assertEqual((SERVER, "port-1"), (event.server_uuid, event.tag))

    def test_admin_role_is_accepted_as_by_novas_default_policy(self):
        self.assertEqual(200, self.post(self.vif_plugged(), self.token("admin"))[0])

    def test_no_token_or_an_invalid_one_is_401(self):
        self.assertEqual(401, self.post(self.vif_plugged())[0])
        self.assertEqual(401, self.post(self.vif_plugged(), "not-a-token")[0])

    def test_a_member_without_the_service_role_is_403(self):
        status, body = self.post(self.vif_plugged(), self.token("member", "reader"))
        self.assertEqual(403, status, body)
        self.assertEqual(0, self.router.service.stats["in"])

    def test_microversion_refusals(self):
        token = self.token("service")
        volume = [{"name": "volume-extended", "server_uuid": SERVER, "tag": "vol-1"}]
        self.assertEqual(400, self.post(volume, token, "2.50")[0])
        self.assertEqual(400, self.post(volume, token)[0])        # default 2.1
        self.assertEqual(200, self.post(volume, token, "2.51")[0])
        power = [{"name": "power-update", "server_uuid": SERVER, "tag": "POWER_ON"}]
        self.assertEqual(400, self.post(power, token, "2.75")[0])
        self.assertEqual(200, self.post(power, token, "2.76")[0])
        arq = [{"name": "accelerator-request-bound", "server_uuid": SERVER,
                "tag": "arq-1"}]
        self.assertEqual(400, self.post(arq, token, "2.81")[0])
        self.assertEqual(200, self.post(arq, token, "2.82")[0])
        reimaged = [{"name": "volume-reimaged", "server_uuid": SERVER, "tag": "v"}]
        self.assertEqual(400, self.post(reimaged, token, "2.92")[0])
        self.assertEqual(200, self.post(reimaged, token, "2.93")[0])
        self.assertEqual(406, self.post(volume, token, "2.999")[0])

    def test_unauthenticated_listener_beyond_loopback_refuses_to_start(self):
        app = rest.RestApp(self.ingress.handle)
        self.assertRaises(rest.InsecureListen, rest.serve, "0.0.0.0", 0, app,
                          authenticated=False)
