"""The lifecycle agent's control queue: routers' resync requests, answered.

On libvirt's test driver and the real broker (fixtures in conftest.py).
"""

import time

import kombu
import pytest

from router.bus import contract
from tests.conftest import wait_for
from tests.functional.agent_harness import TcpProxy

pytestmark = pytest.mark.timeout(60)


def _resync_request(bus, routers=("r-1",), **properties):
    with kombu.Connection(bus.url) as conn:
        properties.setdefault("user_id", conn.userid)
        if properties["user_id"] is None:
            del properties["user_id"]
        producer = kombu.Producer(conn.channel())
        for router in routers:
            env = contract.envelope(contract.ResyncRequest(router),
                                    f"router/{router}")
            producer.publish(
                contract.encode(env), routing_key="", message_id=env.id,
                exchange=bus.topology.control_exchange_name,
                content_type="application/json", **properties)


def test_a_resync_request_is_answered_with_one_snapshot(bus, driver, listener,
                                                       start_agent):
    dom = driver.define()
    dom.create()
    uid = dom.UUIDString()
    running = start_agent(resync_min_interval=0.5, snapshot_interval=0)
    listener.wait_snapshot(uid)                     # the start-up one
    wait_for(lambda: running.agent.stats["snapshots"] == 1, what="snapshot")
    time.sleep(0.6)                                 # past the interval
    seen = len(listener.envelopes())
    asked = time.monotonic()
    _resync_request(bus)
    entry = listener.wait_snapshot(uid, after=seen, timeout=5)
    answered = time.monotonic() - asked
    print(f"resync request -> host snapshot on the fanout: "
          f"{answered * 1000:.0f} ms")
    assert entry.transition == "STARTED" and answered < 1.0

    # A burst of requests (ten routers starting together) costs one more
    # snapshot, sent once the interval has passed.
    seen = len(listener.envelopes())
    _resync_request(bus, [f"r-{n}" for n in range(10)])
    wait_for(lambda: running.agent.stats["resync_requests"] == 11,
             what="the burst received")
    listener.wait_snapshot(uid, after=seen, timeout=5)
    time.sleep(1.2)
    assert len(listener.snapshots()) == 3
    assert running.agent.stats["snapshots"] == 3


def test_resync_requests_from_other_users_are_ignored(bus, driver, listener,
                                                      start_agent):
    running = start_agent(resync_from=("evrouter-router",),
                          resync_min_interval=0, snapshot_interval=0)
    wait_for(lambda: running.agent.stats["snapshots"] == 1, what="snapshot")
    _resync_request(bus, user_id="guest")           # validated: it is guest
    _resync_request(bus, user_id=None)              # nobody vouched for it
    wait_for(lambda: running.agent.stats["resync_refused"] == 2,
             what="the requests refused")
    assert running.agent.stats["forbidden:resync-request"] == 2
    time.sleep(0.3)
    assert running.agent.stats["snapshots"] == 1
    assert len(listener.snapshots()) == 1


def test_a_resync_request_without_a_user_id_is_ignored_even_with_no_list(
        bus, driver, listener, start_agent):
    running = start_agent(resync_min_interval=0, snapshot_interval=0)
    wait_for(lambda: running.agent.stats["snapshots"] == 1, what="snapshot")
    _resync_request(bus, user_id=None)
    wait_for(lambda: running.agent.stats["forbidden:resync-request"] == 1,
             what="the anonymous request refused")
    _resync_request(bus)
    wait_for(lambda: running.agent.stats["snapshots"] == 2,
             what="guest's request answered")
    assert running.agent.stats["resync_requests"] == 1


def test_poison_on_the_control_queue_does_not_stop_the_agent(bus, driver, listener,
                                                             start_agent):
    """Whoever can write the control fanout: every hostile message is
    ignored with a reason, and the next real request is still answered."""
    from tests.functional import poison

    dom = driver.define()
    dom.create()
    uid = dom.UUIDString()
    running = start_agent(resync_min_interval=0, snapshot_interval=0)
    listener.wait_snapshot(uid)
    cases = poison.cases(running.agent.settings.host)
    raw = poison.RawPublisher(bus.url)
    try:
        for _, body, props, raw_props, _ in cases:
            if raw_props is not None:
                raw.publish_raw(bus.topology.control_exchange_name, "", body, raw_props)
            else:
                raw.publish(bus.topology.control_exchange_name, "", body, **props)
    finally:
        raw.close()
    wait_for(lambda: running.agent.stats["resync_invalid"] == len(cases),
             what="every poison message judged")
    seen = len(listener.envelopes())
    _resync_request(bus)
    listener.wait_snapshot(uid, after=seen, timeout=5)
    assert running.agent.healthy


@pytest.mark.parametrize("stale_sessions", [1, 3])
def test_a_half_open_old_session_takes_no_resync_request(
        bus, driver, listener, start_agent, stale_sessions):
    """Issue 19 item 8. The agent's connection dies on its side only (a
    crashed NAT, a cable pulled and replugged): the agent reconnects at
    once, while the broker keeps the old connection, and its consumer,
    until its heartbeat timeout (a minute here). Whatever the old session
    still holds on the broker must not take a single request meant for
    the live one: every request is answered within a second, however many
    stale sessions linger. (A shared control queue lost its share of them,
    round-robin, to the dead consumers: 1 in 2 with one, 3 in 4 with
    three.)"""
    dom = driver.define()
    dom.create()
    uid = dom.UUIDString()
    proxy = TcpProxy()
    try:
        running = start_agent(url=proxy.url, resync_min_interval=0,
                              snapshot_interval=0)
        listener.wait_snapshot(uid)
        for _ in range(stale_sessions):
            seen = len(listener.envelopes())
            proxy.half_open()
            # The snapshot after a reconnect goes out once the new session
            # consumes its control queue.
            listener.wait_snapshot(uid, after=seen)

        slowest = 0.0
        for n in range(10):
            seen = len(listener.envelopes())
            asked = time.monotonic()
            _resync_request(bus, [f"r-{n}"])
            listener.wait_snapshot(uid, after=seen, timeout=2)
            slowest = max(slowest, time.monotonic() - asked)
        assert running.agent.stats["resync_requests"] == 10
        print(f"10 resync requests beside {stale_sessions} half-open "
              f"session(s): slowest answer {slowest * 1000:.0f} ms")
        assert slowest < 1.0
    finally:
        proxy.close()
