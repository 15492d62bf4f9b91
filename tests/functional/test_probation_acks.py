"""A message that kills its router in probation does not bring its original
back: the original's acknowledgement has left before the probation copy is
routed, also while the router corks its writes (router/acks.send flushes).

The hostile review of the corked transport found the acknowledgement still
in the process when the probation copy killed it: the original came back to
the router queue and was counted a second time.
"""

import subprocess
import sys
import time
import uuid

import kombu

from router.bus import contract

# A router whose probation lane dies on its message, as a message that kills
# routers makes it die: os._exit, nothing flushed, nothing cleaned up.
CHILD = """
import os, sys, time, types
from router import session
from router.bus import topology
from tests.conftest import RunningRouter

route = session.Session._route_safely
def route_or_die(self, message, lane):
    if lane.name == "probation":
        os._exit(3)
    return route(self, message, lane)
session.Session._route_safely = route_or_die
RunningRouter(types.SimpleNamespace(url=sys.argv[1], topology=topology.Topology(
    prefix=sys.argv[2], queue_type="classic")))
time.sleep(30)
os._exit(0)
"""


def state(url, name):
    """(ready messages, consumers) of a queue."""
    with kombu.Connection(url) as conn:
        ok = conn.channel().queue_declare(name, passive=True)
        return ok.message_count, ok.consumer_count


def test_the_original_is_acknowledged_before_its_probation_copy_is_routed(bus):
    bus.declare_central()
    topo = bus.topology
    env = contract.envelope(contract.InstanceEvent(
        contract.VIF_PLUGGED, str(uuid.uuid4()), "port-1", contract.COMPLETED,
        "h1"), "test")
    with kombu.Connection(bus.url) as conn:
        ch = conn.channel()
        kombu.Producer(ch).publish(
            contract.encode(env), exchange="", routing_key=topo.router_queue_name,
            message_id=env.id, delivery_mode=2, content_type="application/json")
        # delivered once and not settled: it comes back redelivered
        taker = conn.channel()
        assert taker.basic_get(topo.router_queue_name, no_ack=False) is not None
        taker.close()
    child = subprocess.run([sys.executable, "-c", CHILD, bus.url, topo.prefix],
                           timeout=60, capture_output=True, text=True)
    assert child.returncode == 3, child.stderr[-2000:]
    # A queue drops a dead channel's consumer and takes its unsettled
    # messages back in one step: with no consumer left, its count is final.
    names = (topo.router_queue_name, topo.probation_queue_name)
    deadline = time.monotonic() + 10
    while any(state(bus.url, n)[1] for n in names):
        assert time.monotonic() < deadline, "the dead router's consumers stayed"
        time.sleep(0.05)
    assert state(bus.url, topo.probation_queue_name)[0] == 1
    assert state(bus.url, topo.router_queue_name)[0] == 0, \
        "the original came back: its acknowledgement had not left"
