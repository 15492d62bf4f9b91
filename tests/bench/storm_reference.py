"""The storm's reference: the path OpenStack takes today, rebuilt on oslo.messaging.

Network side: an oslo.messaging Notifier (driver ``messaging``, topic
``notifications``) emits one notification per port transition, where
Neutron POSTs to the compute API. Relay (the compute API's part): a
notification listener that looks the instance's host up (a dict standing in
for the database) and casts ``external_instance_event`` to topic
``compute``, ``server=<host>``, one cast per event. Each compute host: an
RPC server (topic ``compute``, server = its name, threading executor) whose
endpoint feeds the host's waiter registry, the same InstanceEvents evrouter
feeds. Lifecycle events stay inside the compute process in OpenStack today,
so these hosts publish none.

Everything runs on a vhost of its own, deleted afterwards.
"""

import logging
import threading
import uuid
import warnings

# oslo.service imports eventlet, which warns it is deprecated; the
# reference runs on threads and nothing here is monkey-patched.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import oslo_messaging as messaging  # noqa: E402 (after the filter)
from oslo_config import cfg  # noqa: E402

from router.bus import contract  # noqa: E402

TOPIC = "compute"


def _conf():
    # The global CONF, as an OpenStack service has it: oslo.messaging
    # registers some of its options (tracing) only there.
    if not _conf.parsed:
        cfg.CONF([], project="evrouter-storm-reference")
        _conf.parsed = True
        # Under a sustained load the relay's casts and the notifier's callers
        # wait for one of 30 pooled connections (oslo's default
        # rpc_conn_pool_size), as a deployment's would: a warning each wait,
        # thousands a run. And py-amqp warns of every delivery racing a
        # consumer's cancel at stop; nothing is lost that the run counts.
        logging.getLogger("oslo_messaging._drivers.pool").setLevel(logging.ERROR)
        logging.getLogger("amqp").setLevel(logging.ERROR)
    return cfg.CONF


_conf.parsed = False


class _Endpoint:
    def __init__(self, deliver):
        self.deliver = deliver

    def external_instance_event(self, ctxt, events):
        for e in events:
            self.deliver(contract.InstanceEvent(e["name"], e["server_uuid"],
                                                e["tag"], e["status"]), e["id"])


class _RpcHost:
    def __init__(self, transport, host, deliver):
        self.server = messaging.get_rpc_server(
            transport, messaging.Target(topic=TOPIC, server=host),
            [_Endpoint(deliver)], executor="threading")
        self.server.start()     # the listener and its queues exist on return

    def ready(self):
        return True

    def lifecycle(self, server, transition):
        pass

    def stop(self):
        # stop() blocks until the listener's poll loop wakes (its timeout
        # grows to 5 s when idle): a thread each, so 1,000 stop together.
        self.stopping = threading.Thread(target=self.server.stop, daemon=True)
        self.stopping.start()

    def join(self):
        self.stopping.join(30)
        self.server.wait()


class OsloCompute:
    """Compute side: one RPC server per host, one transport per process
    (each server still gets a listening connection of its own)."""

    def __init__(self, url):
        self.transport = messaging.get_rpc_transport(_conf(), url=url)

    def start_host(self, host, deliver):
        return _RpcHost(self.transport, host, deliver)


class OsloNetwork:
    """Network side: notifications, as Neutron's notifier sends them."""

    def __init__(self, url):
        transport = messaging.get_notification_transport(_conf(), url=url)
        self.notifier = messaging.Notifier(transport, publisher_id="network.storm",
                                           driver="messaging",
                                           topics=["notifications"])

    def _send(self, server, port):
        self.notifier.info({}, "port.vif_plugged", {
            "id": uuid.uuid4().hex, "name": contract.VIF_PLUGGED,
            "server_uuid": server, "tag": port, "status": contract.COMPLETED})

    def warm(self):
        self._send(str(uuid.uuid4()), "warm-up")    # unknown: the relay drops it

    def publish(self, server, port, hint):
        self._send(server, port)

    def close(self):
        self.notifier.transport.cleanup()


class _Relay:
    def __init__(self, rpc_transport, placement):
        self.rpc = rpc_transport
        self.placement = placement
        self.clients = {}
        self.relayed = 0

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        host = self.placement.get(payload.get("server_uuid"))
        if host is None:
            return messaging.NotificationResult.HANDLED     # the API's 404
        client = self.clients.get(host)
        if client is None:
            client = self.clients[host] = messaging.get_rpc_client(
                self.rpc, messaging.Target(topic=TOPIC, server=host))
        client.cast({}, "external_instance_event", events=[payload])
        self.relayed += 1
        return messaging.NotificationResult.HANDLED


def relay_process(url, placement, conn):
    """The compute API's part, in a process of its own, until told to stop."""
    conf = _conf()
    relay = _Relay(messaging.get_rpc_transport(conf, url=url), placement)
    listener = messaging.get_notification_listener(
        messaging.get_notification_transport(conf, url=url),
        [messaging.Target(topic="notifications")], [relay], executor="threading")
    listener.start()
    conn.send(("ready",))
    conn.recv()
    listener.stop()
    listener.wait()
    conn.send(("stopped", relay.relayed))
