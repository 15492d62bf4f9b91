"""The lifecycle agent's Prometheus metrics, read from its counters at scrape time."""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.metrics import forbidden_family


class AgentCollector:
    def __init__(self, agent):
        self._agent = agent

    def collect(self):
        agent = self._agent
        stats = dict(agent.stats)
        for name, key, text in (
                ("evrouter_agent_libvirt_events", "events",
                 "Lifecycle callbacks received from libvirt."),
                ("evrouter_agent_stopped_cancelled", "stopped_cancelled",
                 "Held SHUTDOWN/STOPPED/UNDEFINED events cancelled because the "
                 "domain came back (reboots)."),
                ("evrouter_agent_snapshots", "snapshots",
                 "Host snapshots published (start, reconnects, periodic, "
                 "resync requests)."),
                ("evrouter_agent_resync_requests", "resync_requests",
                 "Resync requests accepted from routers."),
                ("evrouter_agent_resync_refused", "resync_refused",
                 "Resync requests ignored: no user_id, or not an allowed "
                 "broker user's."),
                ("evrouter_agent_dropped", "dropped",
                 "Messages dropped from a full outbox while the broker was away.")):
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        yield forbidden_family(stats)
        yield CounterMetricFamily("evrouter_agent_published",
                                  "Lifecycle messages confirmed by the broker.",
                                  value=agent.published)
        yield GaugeMetricFamily("evrouter_agent_held_stopped",
                                "Domains with events held back right now.", value=agent.held)
        yield GaugeMetricFamily("evrouter_agent_outbox",
                                "Messages waiting for the broker.", value=len(agent.outbox))
        yield GaugeMetricFamily("evrouter_agent_healthy",
                                "1 while libvirt and the broker are connected.",
                                value=1 if agent.healthy else 0)
