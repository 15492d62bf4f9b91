"""A small OpenStack from the real packages, as processes.

Keystone (fernet, bootstrap), Placement, nova-api (all three under uwsgi),
a stub image API, nova-conductor, nova-scheduler, two nova-compute services
(one in eventlet mode, one on native threads) on the waiting fake
hypervisor, Neutron (API under uwsgi, RPC server) with ML2/openvswitch and
evrouter's plugin, one simulated L2 agent per compute host, and for the
evrouter mode the router. ``Cloud.configure(mode)`` (re)starts what the
mode changes: neutron-server and the computes.
"""

import os
import shutil
import sys
import textwrap

from tests.cloud.infra import Infra, http_ok, port_open, wait_until

PORTS = {"keystone": 5750, "placement": 5751, "nova-api": 5752,
         "neutron-api": 5753, "image": 5754, "router-ops": 5756}
COMPUTES = {"cmp-threads": "threading", "cmp-eventlet": "eventlet"}
PASSWORD = "evr-cloud-admin"
REGION = "RegionOne"
# Short enough that a lost event shows as a failed boot within the stage;
# Nova's default is 300 s.
VIF_PLUGGING_TIMEOUT = 90
# Servers live-migrating at the same time (as an evacuation does); each
# compute allows as many (max_concurrent_live_migrations).
MIGRATING_AT_ONCE = 5


def url(service, path=""):
    return f"http://127.0.0.1:{PORTS[service]}{path}"


def _ini(sections):
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out += [f"{k} = {v}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)


class Cloud:
    def __init__(self, infra: Infra, repo):
        self.infra = infra
        self.repo = repo
        self.w = infra.workdir
        self.mode = None
        self.env = {"PYTHONPATH": repo, "EVR_CLOUD_TAPS": os.path.join(self.w, "taps"),
                    "OS_NOVA_DISABLE_EVENTLET_PATCHING": "1"}
        os.makedirs(self.env["EVR_CLOUD_TAPS"], exist_ok=True)

    def path(self, name):
        return os.path.join(self.w, name)

    def write(self, name, sections):
        with open(self.path(name), "w") as f:
            f.write(_ini(sections))
        return self.path(name)

    def auth(self, section_extra=None):
        values = {"auth_type": "password", "auth_url": url("keystone", "/v3"),
                  "username": "admin", "password": PASSWORD,
                  "project_name": "admin", "user_domain_name": "Default",
                  "project_domain_name": "Default", "region_name": REGION}
        values.update(section_extra or {})
        return values

    def authtoken(self):
        return dict(self.auth(), www_authenticate_uri=url("keystone", "/v3"),
                    service_token_roles_required="true")

    # --- identity and placement ------------------------------------------------
    def start_keystone(self):
        db = self.infra.database("keystone")
        for d in ("fernet-keys", "credential-keys"):
            os.makedirs(self.path(d), mode=0o700, exist_ok=True)
        conf = self.write("keystone.conf", {
            "DEFAULT": {"debug": "false"},
            "database": {"connection": db},
            "token": {"provider": "fernet"},
            "fernet_tokens": {"key_repository": self.path("fernet-keys")},
            "fernet_receipts": {"key_repository": self.path("fernet-keys")},
            "credential": {"key_repository": self.path("credential-keys")}})
        manage = [self.infra.bin("keystone-manage"), "--config-file", conf]
        self.infra.run(manage + ["db_sync"])
        for what in ("fernet_setup", "credential_setup"):
            self.infra.run(manage + [what, "--keystone-user", "root",
                                     "--keystone-group", "root"])
        self.infra.run(manage + [
            "bootstrap", "--bootstrap-password", PASSWORD,
            "--bootstrap-admin-url", url("keystone", "/v3/"),
            "--bootstrap-internal-url", url("keystone", "/v3/"),
            "--bootstrap-public-url", url("keystone", "/v3/"),
            "--bootstrap-region-id", REGION])
        self.infra.uwsgi("keystone", PORTS["keystone"], "keystone.wsgi.api:application",
                         dict(self.env, OS_KEYSTONE_CONFIG_FILES=conf))
        wait_until(lambda: http_ok(url("keystone", "/v3")), 120, "keystone")

    def sdk(self):
        import openstack
        return openstack.connect(auth_url=url("keystone", "/v3"), username="admin",
                                 password=PASSWORD, project_name="admin",
                                 user_domain_name="Default",
                                 project_domain_name="Default", region_name=REGION)

    def register_catalog(self):
        conn = self.sdk()
        ident = conn.identity
        admin = ident.find_user("admin")
        project = ident.find_project("admin")
        service_role = ident.find_role("service") or ident.create_role(name="service")
        ident.assign_project_role_to_user(project, admin, service_role)
        for name, kind, endpoint in (
                ("placement", "placement", url("placement")),
                ("nova", "compute", url("nova-api", "/v2.1")),
                ("neutron", "network", url("neutron-api")),
                ("glance", "image", url("image"))):
            service = ident.create_service(name=name, type=kind)
            for interface in ("public", "internal", "admin"):
                ident.create_endpoint(service_id=service.id, interface=interface,
                                      url=endpoint, region_id=REGION)

    def start_placement(self):
        db = self.infra.database("placement")
        conf = self.write("placement.conf", {
            "placement_database": {"connection": db},
            "api": {"auth_strategy": "keystone"},
            "keystone_authtoken": self.authtoken()})
        self.infra.run([self.infra.bin("placement-manage"), "--config-file", conf,
                        "db", "sync"])
        self.infra.uwsgi("placement", PORTS["placement"], "placement.wsgi.api:application",
                         dict(self.env, OS_PLACEMENT_CONFIG_DIR=self.w))
        wait_until(lambda: http_ok(url("placement")), 120, "placement")

    def start_image(self):
        self.infra.start("image", [sys.executable, "-m", "tests.cloud.image_stub",
                                   str(PORTS["image"])], env=self.env)
        wait_until(lambda: port_open(PORTS["image"]), 30, "the image stub")

    # --- Nova --------------------------------------------------------------------
    def nova_sections(self, host):
        return {
            "DEFAULT": {"transport_url": self.infra.broker_url(), "host": host,
                        "my_ip": "127.0.0.1", "state_path": self.path("nova-state"),
                        "vif_plugging_timeout": VIF_PLUGGING_TIMEOUT,
                        "vif_plugging_is_fatal": "true",
                        "max_concurrent_live_migrations": str(MIGRATING_AT_ONCE),
                        "compute_driver": "evrouter_cloudfake.WaitingFakeDriver",
                        "instances_path": self.path("instances")},
            "api": {"auth_strategy": "keystone"},
            "api_database": {"connection": self.nova_api_db},
            "database": {"connection": self.nova_db},
            "keystone_authtoken": self.authtoken(),
            "placement": self.auth(),
            "neutron": self.auth(),
            "glance": {"endpoint_override": url("image")},
            "oslo_concurrency": {"lock_path": self.path("locks")},
            "scheduler": {"discover_hosts_in_cells_interval": "2",
                          "workers": "1"},
            "conductor": {"workers": "1"},
            "quota": {"instances": "-1", "cores": "-1", "ram": "-1"},
            "compute": {"live_migration_wait_for_vif_plug": "true"},
            "wsgi": {"api_paste_config": os.path.join(
                self.infra.venv, "etc", "nova", "api-paste.ini")},
            "oslo_messaging_notifications": {"driver": "noop"},
        }

    def start_nova_control(self):
        self.nova_api_db = self.infra.database("nova_api")
        self.nova_db = self.infra.database("nova")
        cell0 = self.infra.database("nova_cell0")
        conf = self.write("nova.conf", self.nova_sections("controller"))
        manage = [self.infra.bin("nova-manage"), "--config-file", conf]
        self.infra.run(manage + ["api_db", "sync"])
        self.infra.run(manage + ["cell_v2", "map_cell0", "--database_connection", cell0])
        self.infra.run(manage + ["cell_v2", "create_cell", "--name", "cell1"])
        self.infra.run(manage + ["db", "sync"])
        shutil.copyfile(os.path.join(self.infra.venv, "etc", "nova", "api-paste.ini"),
                        self.path("api-paste.ini"))
        self.start_nova_api()
        for service in ("nova-conductor", "nova-scheduler"):
            self.infra.start(service, [self.infra.bin(service), "--config-file", conf],
                             env=self.env)

    def start_nova_api(self):
        # nova's WSGI app: the paste file first, then nova.conf, in one dir.
        self.infra.uwsgi("nova-api", PORTS["nova-api"],
                         "nova.wsgi.osapi_compute:application",
                         dict(self.env, OS_NOVA_CONFIG_DIR=self.w,
                              OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf"))
        wait_until(lambda: http_ok(url("nova-api")), 120, "nova-api")

    def start_computes(self, evrouter):
        for host, mode in COMPUTES.items():
            sections = self.nova_sections(host)
            # nova-compute reaches the database through the conductor only.
            del sections["api_database"], sections["database"]
            # Each compute keeps its node identity (compute_id) here.
            sections["DEFAULT"]["state_path"] = self.path(f"nova-state-{host}")
            os.makedirs(sections["DEFAULT"]["state_path"], exist_ok=True)
            if evrouter:
                sections["DEFAULT"]["compute_driver"] = "evrouter.EvrouterComputeDriver"
                sections["evrouter"] = {
                    "compute_driver": "evrouter_cloudfake.WaitingFakeDriver",
                    "transport_url": self.infra.amqp_url(), "hold_seconds": "300"}
            conf = self.write(f"nova-{host}.conf", sections)
            env = dict(self.env, OS_NOVA_DISABLE_EVENTLET_PATCHING=(
                "0" if mode == "eventlet" else "1"))
            self.infra.start(f"nova-compute-{host}",
                             [self.infra.bin("nova-compute"), "--config-file", conf],
                             env=env)

    def stop_computes(self):
        for host in COMPUTES:
            self.infra.stop(f"nova-compute-{host}")

    # --- Neutron -----------------------------------------------------------------
    def neutron_conf(self, evrouter):
        sections = {
            # Stock: no evrouter at all.
            "DEFAULT": {"core_plugin": "ml2",
                        "service_plugins": "evrouter" if evrouter else "",
                        "transport_url": self.infra.broker_url(),
                        "auth_strategy": "keystone", "host": "net-1",
                        "notify_nova_on_port_status_changes": "true",
                        "notify_nova_on_port_data_changes": "true",
                        "api_paste_config": os.path.join(
                            self.infra.venv, "etc", "neutron", "api-paste.ini"),
                        "api_workers": "1", "rpc_workers": "1",
                        "rpc_state_report_workers": "0"},
            "database": {"connection": self.neutron_db},
            "keystone_authtoken": self.authtoken(),
            "nova": self.auth(),
            "oslo_concurrency": {"lock_path": self.path("locks")},
            "ml2": {"type_drivers": "vxlan", "tenant_network_types": "vxlan",
                    "mechanism_drivers": "openvswitch"},
            "ml2_type_vxlan": {"vni_ranges": "1:1000"},
            "quotas": {"quota_port": "-1", "quota_network": "-1",
                       "quota_subnet": "-1"},
            "evrouter": {"transport_url": self.infra.amqp_url(),
                         "replace_nova_notifier": "true" if evrouter else "false",
                         "spool_path": self.path("neutron-spool")},
            "oslo_messaging_notifications": {"driver": "noop"},
        }
        return self.write("neutron.conf", sections)

    def start_neutron(self, evrouter):
        if not hasattr(self, "neutron_db"):
            self.neutron_db = self.infra.database("neutron")
            conf = self.neutron_conf(evrouter)
            self.infra.run([self.infra.bin("neutron-db-manage"), "--config-file", conf,
                            "upgrade", "heads"], timeout=900)
        conf = self.neutron_conf(evrouter)
        env = dict(self.env, OS_NEUTRON_CONFIG_FILES=conf)
        self.infra.uwsgi("neutron-api", PORTS["neutron-api"],
                         "neutron.wsgi.api:application", env)
        self.infra.start("neutron-rpc", [self.infra.bin("neutron-rpc-server"),
                                         "--config-file", conf], env=env)
        wait_until(lambda: http_ok(url("neutron-api")), 180, "neutron-api")

    def stop_neutron(self):
        for name in ("neutron-api", "neutron-rpc"):
            self.infra.stop(name)

    def start_agents(self):
        for host in COMPUTES:
            conf = self.write(f"agent-{host}.conf", {"DEFAULT": {
                "host": host, "transport_url": self.infra.broker_url()},
                "agent": {"report_interval": "5"}})
            self.infra.start(f"l2-agent-{host}", [
                sys.executable, "-m", "tests.cloud.l2_agent", "--config-file", conf],
                env=self.env)

    # --- evrouter ------------------------------------------------------------------
    def start_router(self):
        for host in COMPUTES:
            self.infra.run([self.infra.bin("evrouter"), "topology", "--declare",
                            "--transport-url", self.infra.amqp_url(), "--host", host])
        self.infra.start("evrouter-router", [
            self.infra.bin("evrouter"), "router", "--transport-url",
            self.infra.amqp_url(), "--router-ops-listen",
            f"127.0.0.1:{PORTS['router-ops']}"], env=self.env)
        wait_until(lambda: http_ok(url("router-ops", "/healthz")), 60, "the router")


def describe():
    return textwrap.dedent(__doc__)
