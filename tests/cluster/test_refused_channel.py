"""A publisher refused during a failover is accepted again without the dead node.

RabbitMQ 3.10 builds a channel's client of a quorum queue on the channel's
first publish to it, from the queue's record, which names the leader. If
that leader's node has just died and no new leader has rewritten the
record yet, the client asks the dead node, is refused (nack), and keeps
asking it: every later publish on that channel to that queue is nacked,
however soon the queue has a new leader, until the dead node is back.
That is what stalled the failover scenarios for their whole 30 s when a
router's new session published its first copy for a host inside that
window. Here the window is held open on purpose: with c3 frozen, c2
alone cannot elect a leader for a queue led by the killed c1.
"""

import uuid

import kombu
import pytest

from router.bus import publishing, topology
from tests.cluster.conftest import ClusterBus
from tests.conftest import wait_for

pytestmark = pytest.mark.cluster


def test_a_publisher_refused_while_the_leader_was_dead_is_accepted_once_a_new_one_leads(
        cluster):
    bus = ClusterBus(cluster, services=(2,), control=2, leader=1)
    conn = None
    try:
        bus.declare_central()           # the router queue led by c1
        queue = bus.topology.router_queue_name
        assert cluster.leader(queue) == 1
        conn = kombu.Connection(cluster.kombu_url(2))
        conn.connect()
        publisher = publishing.BlockingPublisher(conn)

        def publish():
            publisher.publish(bus.topology.ingress_exchange_name,
                              topology.instance_routing_key("network-vif-plugged"),
                              b"{}", message_id=uuid.uuid4().hex, timeout=10)

        cluster.freeze(3)
        try:
            cluster.kill(1)
            # No leader can be elected: the record still names the dead c1.
            with pytest.raises(publishing.PublishError) as refused:
                publish()
            assert refused.value.outcome == publishing.NACK
        finally:
            cluster.thaw(3)
        wait_for(lambda: cluster.leader(queue) in (2, 3), timeout=60,
                 what="a new leader of the router queue in its record")
        # c1 stays dead: the first publish after the election is accepted.
        publish()
        publish()
    finally:
        if conn is not None:
            conn.release()
        cluster.make_whole()
        bus.cleanup()
