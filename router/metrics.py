"""The router's Prometheus metrics, read from its plain counters at scrape time.

The routing loop only bumps a Counter and a bucket array (no locks, no
metric objects on the hot path); this collector turns them into metric
families when Prometheus asks.
"""

import bisect

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from router.bus import contract

LATENCY_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                  0.5, 1.0, 2.5)


class LatencyHistogram:
    """Cumulative-at-scrape histogram; observe() is a bisect and two adds."""

    def __init__(self, bounds=LATENCY_BOUNDS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self):
        out, running = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def forbidden_family(stats):
    """evrouter_forbidden_total{kind}: claims refused because the sender's
    broker-validated identity may not make them (stats keys
    ``forbidden:<envelope kind>``; an ingress message refused for its
    publisher is dead-lettered ``forbidden``, and is an instance event)."""
    family = CounterMetricFamily(
        "evrouter_forbidden",
        "Messages refused because their sender's broker-validated user_id "
        "(or the lack of one) may not claim what they claim, by envelope kind.",
        labels=["kind"])
    kinds = {}
    for key, value in stats.items():
        if key.startswith("forbidden:"):
            kind = key.split(":", 1)[1]
            kinds[kind] = kinds.get(kind, 0) + value
    ingress = stats.get(f"dead_lettered:{contract.REASON_FORBIDDEN}", 0)
    if ingress:
        kinds[contract.INSTANCE_EVENT] = kinds.get(contract.INSTANCE_EVENT, 0) + ingress
    for kind in sorted(kinds):
        family.add_metric([kind], kinds[kind])
    return family


def _by_outcome(name, text, stats, outcomes):
    """A counter family labelled outcome, one sample per outcome."""
    family = CounterMetricFamily(name, text, labels=["outcome"])
    for outcome in outcomes:
        family.add_metric([outcome], stats.get(outcome, 0))
    return family


class RouterCollector:
    def __init__(self, service):
        self._service = service

    def collect(self):
        svc = self._service
        stats = dict(svc.stats)
        for name, key, text in (
                ("evrouter_router_events_in", "in", "Ingress messages taken."),
                ("evrouter_router_events_out", "out",
                 "Copies confirmed on host exchanges."),
                ("evrouter_router_retries", "retried",
                 "Events parked for a retry (no known host yet)."),
                ("evrouter_router_unplaced_held", "unplaced_held",
                 "Events without a host held in hand for their placement."),
                ("evrouter_router_unplaced_placed", "unplaced_placed",
                 "Held events routed as soon as their placement arrived."),
                ("evrouter_router_lifecycle_events", "lifecycle_seen",
                 "Lifecycle events applied to the placement table.")):
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        dead = CounterMetricFamily("evrouter_router_dead_lettered",
                                   "Messages dead-lettered, by reason.",
                                   labels=["reason"])
        dropped = CounterMetricFamily(
            "evrouter_router_dropped",
            "Messages dropped because even their dead letter could not be "
            "placed, by reason.", labels=["reason"])
        for key, value in stats.items():
            if key.startswith("dead_lettered:"):
                dead.add_metric([key.split(":", 1)[1]], value)
            elif key.startswith("dropped:"):
                dropped.add_metric([key.split(":", 1)[1]], value)
        yield dead
        yield dropped
        faults = CounterMetricFamily(
            "evrouter_router_channel_faults",
            "Channels the broker closed, reopened without ending the session.",
            labels=["channel"])
        for label, key in (("publish", "publish_channel_faults"),
                           ("lane", "lane_channel_faults"),
                           ("placement", "placement_channel_faults")):
            faults.add_metric([label], stats.get(key, 0))
        yield faults
        yield CounterMetricFamily(
            "evrouter_router_refused", "Copies the broker refused (nack or a "
            "channel closed on them), each time.", value=stats.get("refused", 0))
        yield CounterMetricFamily(
            "evrouter_router_returned", "Host copies the broker returned: no "
            "queue bound to the hosts exchange with that host's name (no "
            "such host, or not yet); each is parked for its host and "
            "dead-lettered unknown-host after no_host_timeout.",
            value=stats.get("returned", 0))
        yield forbidden_family(stats)
        hist = svc.latency
        yield HistogramMetricFamily(
            "evrouter_router_routing_latency_seconds",
            "From taking an ingress message to every copy confirmed.",
            buckets=hist.buckets(), sum_value=hist.total)
        yield CounterMetricFamily(
            "evrouter_router_placement_refused",
            "Claims of an instance by a compute host already at "
            "max_instances_per_host, ignored.",
            value=getattr(svc.placement, "refused", 0))
        yield GaugeMetricFamily("evrouter_router_placed_instances",
                                "Instances in the placement table.",
                                value=len(svc.placement))
        journal = svc.journal.stats
        yield _by_outcome(
            "evrouter_journal_records",
            "Hops this router recorded for the journal stream, by what "
            "became of them (dropped: the journal full or stopped while the "
            "broker refused it).", journal, ("written", "dropped"))
        yield CounterMetricFamily(
            "evrouter_journal_write_failures",
            "Journal writes the broker refused or that failed (each logged "
            "at WARNING once per outage).", value=journal.get("failures", 0))
        # [journal] otlp_endpoint (router/journal_otlp.py); 0 while it is off
        spans = getattr(svc.journal, "span_stats", {})
        yield _by_outcome(
            "evrouter_journal_spans",
            "Hops this router exported as OpenTelemetry spans over OTLP, by "
            "what became of them (dropped: too many waiting, the collector "
            "down or refusing, or the router stopping).", spans,
            ("exported", "dropped"))
        stuck = svc.stuck
        if stuck is not None:
            yield GaugeMetricFamily(
                "evrouter_stuck_waits",
                "Waits compute hosts recorded stuck (pending past their "
                "stuck_after) and not ended, as read from the journal "
                "(`evrouter stuck` says why).", value=stuck.current())
            yield CounterMetricFamily(
                "evrouter_stuck_waits_recorded", "Waits recorded stuck, ever (since "
                "this router started following the journal).",
                value=stuck.seen)
            yield CounterMetricFamily(
                "evrouter_stuck_watch_failures", "Times following the journal "
                "for stuck waits failed (the gauge is stale until it follows "
                "again; said at WARNING once per outage).",
                value=stuck.stats.get("failures", 0))
            yield CounterMetricFamily(
                "evrouter_stuck_watch_refused", "Wait records not believed: "
                "a host's records from a broker user other than its own.",
                value=stuck.waits.refused)
        yield GaugeMetricFamily("evrouter_router_connected",
                                "1 while consuming from the broker.",
                                value=1 if svc.ready.is_set() else 0)
