"""A sender's skewed clock changes nothing on the host (issue 19, item 6).

The two cases measured against the registry that compared the envelope's
``created_at`` with its own wall clock, allowing 2 s of skew: events from
a network node whose clock is 9 s ahead or 4 s behind, through the real
broker and the host's real HostConsumer. The unit property test
(tests/unit/test_waiter_clock_skew.py) covers every skew in ±60 s.
"""

import time

import pytest

from compute import waiting
from router.bus import contract
from tests.functional.waiter_harness import new_uuid, wait_until

pytestmark = pytest.mark.timeout(60)
PLUG = (contract.VIF_PLUGGED, "port-1")


def send(publisher, host, server, created_at):
    """vif-plugged for `server` onto the host's queue, stamped `created_at`."""
    env = contract.envelope(
        contract.InstanceEvent(*PLUG[:1], server, PLUG[1], contract.COMPLETED,
                               host.host),
        "neutron@net-1", created_at=created_at)
    publisher.to_host(host.host, contract.encode(env), message_id=env.id)
    return env


def timed_out_wait(host, server):
    """A wait that runs into its (short) timeout; the sender's time then."""
    with pytest.raises(waiting.InstanceEventTimeout):
        with host.registry.wait_for_instance_event(server, [PLUG], timeout=0.3):
            pass
    return time.time()


def test_late_event_from_a_sender_9s_ahead_does_not_satisfy_the_retry(
        host, publisher):
    server = new_uuid()
    during_the_wait = time.time() + 9       # the sender's clock, 9 s ahead
    timed_out_wait(host, server)
    send(publisher, host, server, during_the_wait)
    stats = host.registry.stats
    wait_until(lambda: stats["stale"] + stats["early_held"] == 1, 10,
               "the late event consumed")
    assert host.registry.stats["stale"] == 1 and host.registry.held == 0
    # The retry is not satisfied by it: it waits for its own event.
    with pytest.raises(waiting.InstanceEventTimeout, match="still missing"):
        with host.registry.wait_for_instance_event(server, [PLUG], timeout=0.3):
            pass


def test_retrys_own_event_from_a_sender_4s_behind_wakes_it(host, publisher):
    server = new_uuid()
    timed_out_wait(host, server)
    started = time.monotonic()
    with host.registry.wait_for_instance_event(server, [PLUG], timeout=10):
        send(publisher, host, server, time.time() - 4)   # 4 s behind
    assert time.monotonic() - started < 5
    assert host.registry.stats["delivered"] == 1
    assert host.registry.stats["stale"] == 0
