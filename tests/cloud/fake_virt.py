"""A fake hypervisor that waits for network-vif-plugged as libvirt does.

Installed by .ci/cloud as ``nova.virt.evrouter_cloudfake`` (Nova resolves
drivers under nova.virt only). ``spawn`` waits exactly as the libvirt
driver's ``_create_guest_with_network``: for every VIF not yet active,
``wait_for_instance_event(..., timeout=vif_plugging_timeout,
error_callback=...)`` around plugging, and with ``vif_plugging_is_fatal``
a timeout or a failed event is ``VirtualInterfaceCreateException``.
Plugging a VIF makes a "tap" -- a file ``$EVR_CLOUD_TAPS/<host>/<port>``
-- which the host's simulated L2 agent (tests/cloud/l2_agent.py) sees and
reports to Neutron over its agent RPC, as the OVS agent reports a new tap
on br-int. Live migration plugs on the destination in
``pre_live_migration`` (as libvirt does) and unplugs on the source after.
"""

import os

from nova import conf as nova_conf
from nova import exception
from nova.virt import fake

CONF = nova_conf.CONF


def _taps():
    path = os.path.join(os.environ["EVR_CLOUD_TAPS"], CONF.host)
    os.makedirs(path, exist_ok=True)
    return path


class WaitingFakeDriver(fake.FakeDriverWithoutFakeNodes):
    """One node with a stable identity (compute_id in state_path, so the
    service restarts, as a real driver's); never downloads an image."""

    vcpus = 512
    memory_mb = 1024 * 1024
    local_gb = 10000

    def plug_vifs(self, instance, network_info):
        for vif in network_info or []:
            with open(os.path.join(_taps(), vif["id"]), "w") as f:
                f.write(instance.uuid)

    def unplug_vifs(self, instance, network_info):
        for vif in network_info or []:
            try:
                os.unlink(os.path.join(_taps(), vif["id"]))
            except FileNotFoundError:
                pass

    def _neutron_failed_callback(self, event_name, instance):
        if CONF.vif_plugging_is_fatal:
            raise exception.VirtualInterfaceCreateException()

    def spawn(self, context, instance, image_meta, injected_files,
              admin_password, allocations, network_info=None,
              block_device_info=None, power_on=True, accel_info=None):
        timeout = CONF.vif_plugging_timeout
        events = [("network-vif-plugged", vif["id"]) for vif in network_info or []
                  if vif.get("active", True) is False] if timeout and power_on else []
        try:
            with self.virtapi.wait_for_instance_event(
                    instance, events, timeout=timeout,
                    error_callback=self._neutron_failed_callback):
                self.plug_vifs(instance, network_info)
        except exception.InstanceEventTimeout:
            if CONF.vif_plugging_is_fatal:
                self.unplug_vifs(instance, network_info)
                raise exception.VirtualInterfaceCreateException() from None
        except Exception:
            self.unplug_vifs(instance, network_info)
            raise
        super().spawn(context, instance, image_meta, injected_files,
                      admin_password, allocations, network_info=network_info,
                      block_device_info=block_device_info, power_on=power_on,
                      accel_info=accel_info)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        self.unplug_vifs(instance, network_info)
        super().destroy(context, instance, network_info, block_device_info,
                        destroy_disks, destroy_secrets)

    def pre_live_migration(self, context, instance, block_device_info,
                           network_info, disk_info, migrate_data):
        self.plug_vifs(instance, network_info)     # the destination's taps
        return migrate_data

    def post_live_migration(self, context, instance, block_device_info,
                            migrate_data=None):
        network_info = instance.get_network_info()
        self.unplug_vifs(instance, network_info)   # the source's taps
        if instance.uuid in self.instances:
            super().destroy(context, instance, network_info, block_device_info)

    def post_live_migration_at_destination(self, context, instance,
                                           network_info, block_migration=False,
                                           block_device_info=None):
        self.instances[instance.uuid] = fake.FakeInstance(
            instance.name, fake.power_state.RUNNING, instance.uuid)

    def rollback_live_migration_at_destination(self, context, instance,
                                               network_info, block_device_info,
                                               destroy_disks=True,
                                               migrate_data=None):
        self.unplug_vifs(instance, network_info)
