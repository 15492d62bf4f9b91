"""Tests against the real Nova 34 and Neutron 29 packages (.ci/openstack).

Collected only where both import (the venv .ci/openstack builds): the main
test run stays independent of them. ``import nova`` alone is not the test:
evrouter's own nova.virt.evrouter module makes ``nova`` a namespace where
Nova is not installed.

Nova and Neutron cannot share one test process: nova-compute 34 runs on
native threads and forbids eventlet, which Neutron's test base imports. One
pytest run covers one side: EVROUTER_OPENSTACK_SIDE=nova|neutron, or the
side the command line names (test_neutron_* → neutron, otherwise nova). The
REST endpoint's Keystone tests (test_rest_*) run with the neutron side.
"""

import importlib.util
import os


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    global collect_ignore_glob
    if not _importable("nova.monkey_patch"):
        return
    side = os.environ.get("EVROUTER_OPENSTACK_SIDE") or (
        "neutron" if any(w in str(a) for a in config.args
                         for w in ("neutron", "test_rest")) else "nova")
    if side in ("nova", "nova-eventlet"):
        # Before any other Nova or Neutron module (Neutron's package imports
        # futurist, which imports eventlet): Nova chooses its concurrency
        # backend first, as nova/tests/unit/__init__.py does. "nova": native
        # threads, the default of nova-compute 34; "nova-eventlet": eventlet
        # mode, which nova-compute 34 runs when OS_NOVA_DISABLE_EVENTLET_
        # PATCHING is set to anything but 1/true/yes (or, unset, with
        # [DEFAULT] concurrency_backend = eventlet): nova/monkey_patch.py.
        os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = (
            "0" if side == "nova-eventlet" else "1")
        from nova import monkey_patch

        monkey_patch.patch()
        if _importable("nova.compute.manager"):
            collect_ignore_glob = ["test_neutron_*.py", "test_rest_*.py"]
    elif _importable("neutron.plugins.ml2.plugin"):
        collect_ignore_glob = ["test_nova_*.py"]
