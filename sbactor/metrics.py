"""Prometheus metrics, one registry per gateway so tests can run several gateways in one process."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sbactor.actors.runtime import ActorStatistics
from sbactor.http_server import ServerStatistics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ActorCollector(Collector):
    """Reads actor statistics at scrape time instead of updating gauges on every message."""

    def __init__(self, source: Callable[[], Iterable[ActorStatistics]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "sbactor_actor_mailbox_depth", "Messages waiting", labels=["actor"]
        )
        peak = GaugeMetricFamily("sbactor_actor_mailbox_peak_depth", "Peak depth", labels=["actor"])
        cap = GaugeMetricFamily("sbactor_actor_mailbox_capacity", "Capacity", labels=["actor"])
        blocked = GaugeMetricFamily(
            "sbactor_actor_blocked_senders", "Senders waiting for room", labels=["actor"]
        )
        processed = GaugeMetricFamily(
            "sbactor_actor_processed_total", "Messages processed", labels=["actor"]
        )
        errors = GaugeMetricFamily("sbactor_actor_errors_total", "Handler errors", labels=["actor"])
        cache = GaugeMetricFamily(
            "sbactor_verdict_cache_events_total",
            "Verdict cache hits/misses/evictions",
            labels=["event"],
        )
        for s in self._source():
            depth.add_metric([s.name], s.depth)
            peak.add_metric([s.name], s.peak_depth)
            cap.add_metric([s.name], s.capacity)
            blocked.add_metric([s.name], s.blocked_senders)
            processed.add_metric([s.name], s.processed)
            errors.add_metric([s.name], s.errors)
            if s.name == "verdict_cache":
                for event in ("hits", "misses", "evictions"):
                    value = s.state.get(event)
                    if isinstance(value, int | float):
                        cache.add_metric([event], value)
        yield from (depth, peak, cap, blocked, processed, errors, cache)


class _ServerCollector(Collector):
    """Reads the HTTP server's statistics at scrape time; nothing before the server exists."""

    def __init__(self, source: Callable[[], ServerStatistics | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._source()
        if stats is None:
            return
        yield GaugeMetricFamily(
            "sbactor_http_connections", "Open client connections", value=stats.connections
        )
        yield CounterMetricFamily(
            "sbactor_http_refused_connections",
            "Connections refused with 503 at server.max_connections",
            value=stats.refused_connections,
        )
        yield CounterMetricFamily(
            "sbactor_http_evicted_connections",
            "Idle keep-alive connections closed to make room at server.max_connections",
            value=stats.evicted_connections,
        )
        yield CounterMetricFamily(
            "sbactor_http_unanswered_refusals",
            "Connections over server.max_connections closed without the 503 (sent no request "
            "in 5 s, or too many waiting)",
            value=stats.unanswered_refusals,
        )
        yield CounterMetricFamily(
            "sbactor_http_requests",
            "Requests the HTTP server passed to the application",
            value=stats.requests,
        )


@attrs.define(eq=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    requests: Counter = attrs.field(init=False)
    latency: Histogram = attrs.field(init=False)
    upstream_attempts: Counter = attrs.field(init=False)
    refusals: Counter = attrs.field(init=False)
    policy_errors: Counter = attrs.field(init=False)
    cost: Counter = attrs.field(init=False)
    tokens: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "sbactor_requests_total", "HTTP requests", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "sbactor_request_duration_seconds",
            "HTTP request latency",
            ["route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_attempts = Counter(
            "sbactor_upstream_attempts_total",
            "Upstream attempts by outcome",
            ["provider", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "sbactor_refusals_total", "Requests refused by the gateway", ["stage"], registry=r
        )
        self.policy_errors = Counter(
            "sbactor_policy_errors_total", "Policy evaluations that applied on_error", registry=r
        )
        self.cost = Counter("sbactor_cost_usd_total", "Spend in USD", ["model"], registry=r)
        self.tokens = Counter("sbactor_tokens_total", "Tokens", ["model", "kind"], registry=r)

    def watch_actors(self, source: Callable[[], Iterable[ActorStatistics]]) -> None:
        self.registry.register(_ActorCollector(source))

    def watch_server(self, source: Callable[[], ServerStatistics | None]) -> None:
        self.registry.register(_ServerCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
