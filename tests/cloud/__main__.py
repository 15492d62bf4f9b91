"""python -m tests.cloud [--upto STEP] [--keep]: bring the cloud up, run the
scenarios in both modes, print the side-by-side table, take it all down."""

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

from tests.cloud import stage
from tests.cloud.infra import Infra

STEPS = ["keystone", "placement", "nova", "neutron", "computes", "scenarios"]


def install_fake_hypervisor(venv):
    import nova.virt
    target = os.path.join(os.path.dirname(nova.virt.__file__), "evrouter_cloudfake.py")
    shutil.copyfile(os.path.join(os.path.dirname(__file__), "fake_virt.py"), target)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--upto", choices=STEPS, default="scenarios")
    parser.add_argument("--keep", action="store_true",
                        help="leave everything running (debugging)")
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--migrations", type=int, default=10)
    parser.add_argument("--outage", type=float, default=60.0)
    args = parser.parse_args(argv)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.path.dirname(os.path.dirname(sys.executable))
    run_id = uuid.uuid4().hex[:8]
    workdir = tempfile.mkdtemp(prefix=f"evr-cloud-{run_id}-")
    print(f"[cloud] run {run_id} in {workdir}", flush=True)
    install_fake_hypervisor(venv)
    infra = Infra(run_id, workdir, venv)
    cloud = stage.Cloud(infra, repo)
    started = time.monotonic()

    def step(name):
        print(f"[cloud] {name} at {time.monotonic() - started:.0f}s", flush=True)

    status = 1
    try:
        infra.create_vhost()
        step("keystone")
        cloud.start_keystone()
        cloud.register_catalog()
        if args.upto == "keystone":
            status = 0
            return status
        step("placement, image stub")
        cloud.start_placement()
        cloud.start_image()
        if args.upto == "placement":
            status = 0
            return status
        step("nova-api, conductor, scheduler")
        cloud.start_nova_control()
        if args.upto == "nova":
            status = 0
            return status
        step("neutron")
        cloud.start_neutron(evrouter=False)
        cloud.start_agents()
        if args.upto == "neutron":
            status = 0
            return status
        step("computes")
        cloud.start_computes(evrouter=False)
        from tests.cloud import scenarios
        scenarios.wait_for_computes(cloud)
        if args.upto == "computes":
            status = 0
            return status
        status = scenarios.run_all(cloud, args, step)
        return status
    finally:
        print(f"[cloud] finished in {time.monotonic() - started:.0f}s", flush=True)
        if args.keep:
            print(f"[cloud] kept: {workdir}")
        else:
            infra.teardown()
            if status == 0:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"[cloud] logs kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
