"""What the router knows about hosts: placement from the lifecycle fanout.
(Whether a host's queue exists it does not ask: a copy for a host without
one comes back as a return, router/delivery.py.)

The placement consumer reads a queue of its own (a new name per session,
no_ack) bound to the lifecycle fanout. Its messages come from every compute
host, so each one is decoded totally and checked against its sender; a bad
one is ignored and counted, never requeued (there is nothing to requeue).
If the broker closes its channel (the queue deleted under it), the session
calls ``reopen()``: a new queue, and a resync request so the agents fill the
gap with snapshots.
"""

import logging
import uuid

from kombu import Consumer

from router import routing
from router.bus import consuming, contract, inbound
from router.bus.connection import take, user_of
from router.delivery import property_of

LOG = logging.getLogger(__name__)

class PlacementObserver:
    def __init__(self, conn, delivery, settings, placement, stats, *, memory,
                 placed=None):
        self.conn = conn
        self.delivery = delivery
        self.s = settings
        self.topo = settings.topology
        self.placement = placement
        self.stats = stats
        self.memory = memory
        # placed(instance uuids): the placement of these may have changed
        # (the session routes the events it holds for them)
        self._placed = placed or (lambda uuids: None)
        self._messages = []
        self.channel = self.consumer = self.queue_watch = None

    def start(self):
        # A new name per session: after a half-open connection the old
        # exclusive queue lingers until the broker reaps it, and declaring
        # the same name would fail RESOURCE_LOCKED.
        queue = self.topo.placement_queue(
            f"{self.s.name}.{uuid.uuid4().hex[:8]}")
        self.channel = self.delivery.watch(self.conn.channel())
        self.consumer = Consumer(self.channel, [queue], no_ack=True,
                                 on_message=self._messages.append)
        self.consumer.consume()
        if self.queue_watch is not None:
            self.queue_watch.close()
        # Bound again when idle: the lifecycle fanout deleted and declared
        # again leaves it unbound, and no cancel says so.
        self.queue_watch = consuming.QueueWatch(self.conn, queue,
                                                self.s.consume_check)
        self.ask_for_snapshots()

    def reopen(self, exc):
        self.stats["placement_channel_faults"] += 1
        LOG.warning("router %s: the broker closed the placement consumer's "
                    "channel (%s); consuming a new queue", self.s.name, exc)
        if getattr(self.channel, "is_open", False):
            try:
                self.channel.close()
            except self.conn.channel_errors:
                pass
        self.start()

    def ask_for_snapshots(self):
        """Every agent answers with its host's whole placement: a router that
        (re)connects knows it within seconds instead of learning it from
        whatever lifecycle events happen next."""
        self.placement.connected(self.s.resync_window)
        if self.memory:
            return      # the memory transport's agents snapshot on start
        request = contract.envelope(contract.ResyncRequest(self.s.name),
                                    f"router@{self.s.name}")
        self.delivery.send_untracked(self.topo.control_exchange_name, "",
                                     contract.encode(request),
                                     message_id=request.id, mandatory=False,
                                     user_id=user_of(self.conn))
        LOG.info("router %s asked the agents for snapshots (%s)", self.s.name,
                 request.id)

    @property
    def pending(self):
        return bool(self._messages)

    def pump(self, broker_errors):
        if not self._messages:
            return          # the usual turn: nothing from the fanout
        self.queue_watch.delivered()
        for message in take(self._messages):
            try:
                self._observe(message)
            except broker_errors:
                raise
            except Exception:
                # Consumed without ack: nothing comes back to loop on, and
                # one compute host's bad message must not stop every router.
                self.stats["lifecycle_errors"] += 1
                LOG.exception("lifecycle message %s: unexpected error; ignored",
                              inbound.loggable(property_of(message, "message_id")))

    def _observe(self, message):
        try:
            env = inbound.decode_message(message.body,
                                         inbound.properties_of(message),
                                         self.s.max_body_bytes)
        except contract.ContractError as exc:
            self.stats["lifecycle_invalid"] += 1
            LOG.warning("lifecycle message %s ignored (%s): %s",
                        inbound.loggable(property_of(message, "message_id")),
                        exc.reason, exc)
            return
        p = env.payload
        if env.kind == contract.RESYNC_REQUEST:
            return      # another router asking the agents; not for us
        refusal = routing.lifecycle_refusal(property_of(message, "user_id"), p.host,
                                            self.s.policy, authenticated=not self.memory)
        if refusal is not None:
            self.stats[f"forbidden:{env.kind}"] += 1
            LOG.warning("%s %s ignored: %s", env.kind, env.id, refusal)
            return
        if env.kind == contract.LIFECYCLE_EVENT:
            self.placement.observe(p)
            self.stats["lifecycle_seen"] += 1
            placed = (p.instance_uuid,)
        elif env.kind == contract.HOST_SNAPSHOT:
            self.placement.replace_host(p.host, p.instances)
            self.stats["snapshots_seen"] += 1
            LOG.info("host %s snapshot %s: %d instance(s)", p.host, env.id,
                     len(p.instances))
            placed = [uuid for uuid, _ in p.instances]
        elif env.kind == contract.HOST_ANNOUNCE:
            placed = ()
        else:
            return
        if placed:
            self._placed(placed)
