"""A simulated Open vSwitch agent for one compute host.

It does what neutron-openvswitch-agent does that Nova's events depend on,
through Neutron's real agent RPC (neutron.agent.rpc over the cloud's
broker): reports its state (so ML2's openvswitch driver binds ports to this
host), and when a tap appears or disappears -- the fake hypervisor's files
under ``$EVR_CLOUD_TAPS/<host>`` -- asks for the devices' details and
reports them up or down (``update_device_list``), as the agent does for a
port on br-int. Also on a live-migration destination, where ML2 then calls
``notify_port_active_direct``.

Run: ``python -m tests.cloud.l2_agent --config-file agent.conf`` with
``[DEFAULT] host`` and ``transport_url``.
"""

import os
import sys
import time

from neutron.agent import rpc as agent_rpc
from neutron.common import config as common_config
from neutron.conf.agent import common as agent_config
from neutron_lib import context as n_context
from neutron_lib.agent import topics
from oslo_config import cfg

POLL = 0.1
REPORT_EVERY = 5.0


def main():
    common_config.register_common_config_options()
    agent_config.register_agent_state_opts_helper(cfg.CONF)
    common_config.init(sys.argv[1:])
    host = cfg.CONF.host
    taps = os.path.join(os.environ["EVR_CLOUD_TAPS"], host)
    os.makedirs(taps, exist_ok=True)
    ctx = n_context.get_admin_context_without_session()
    state_rpc = agent_rpc.PluginReportStateAPI(topics.REPORTS)
    plugin_rpc = agent_rpc.PluginApi(topics.PLUGIN)
    agent_id = f"ovs-agent-{host}"
    state = {"binary": "neutron-openvswitch-agent", "host": host,
             "topic": topics.AGENT, "agent_type": "Open vSwitch agent",
             "start_flag": True,
             "configurations": {"bridge_mappings": {}, "tunnel_types": ["vxlan"],
                                "tunneling_ip": "127.0.0.1",
                                "l2_population": False, "ovs_hybrid_plug": False,
                                "integration_bridge": "br-int",
                                "datapath_type": "system", "ovs_capabilities": {},
                                "devices": 0}}
    known = set()
    reported_at = 0.0
    print(f"l2 agent of {host} watching {taps}", flush=True)
    while True:
        now = time.monotonic()
        if now - reported_at >= REPORT_EVERY:
            state["configurations"]["devices"] = len(known)
            try:
                state_rpc.report_state(ctx, state)
                state["start_flag"] = False
                reported_at = now
            except Exception as exc:
                print(f"report_state failed: {exc}", flush=True)
        present = set(os.listdir(taps))
        up, down = sorted(present - known), sorted(known - present)
        if up or down:
            try:
                if up:
                    plugin_rpc.get_devices_details_list(ctx, up, agent_id, host)
                plugin_rpc.update_device_list(ctx, up, down, agent_id, host)
                known = present
                print(f"{time.time():.3f} up {up} down {down}", flush=True)
            except Exception as exc:
                print(f"update_device_list failed: {exc}", flush=True)
        time.sleep(POLL)


if __name__ == "__main__":
    main()
