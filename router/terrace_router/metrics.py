"""Prometheus metrics of one router app (a registry per app, not the global one).

The operator's scaling loop queries these names; keep them stable:

- terrace_router_requests_total{tier,status}        counter
- terrace_router_request_duration_seconds{tier}      histogram
- terrace_router_complexity                          histogram of classifier scores
- terrace_router_escalations_total{reason}           counter
- terrace_router_cache_hits_total                    counter
- terrace_router_tier_share{tier}                    gauge, realized share over the rolling window
- terrace_router_inflight{tier,endpoint}             gauge
- terrace_router_large_share_target                  gauge, share past the first tier aimed at
                                                     (the target, or the operator's budget cut)
- terrace_router_config_reloads_total{result}        counter

The gauges are read from the live state at scrape time, so the request
path never touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .state import RouterState

# Upstream latencies: from a cache-speed millisecond to a long generation.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORE_BUCKETS = tuple(i / 20 for i in range(1, 21))


class _StateCollector(Collector):
    def __init__(self, current: Callable[[], RouterState | None]) -> None:
        self._current = current

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._current()
        share = GaugeMetricFamily(
            "terrace_router_tier_share",
            "Share of recent routed requests served by each tier (rolling window)",
            labels=["tier"],
        )
        inflight = GaugeMetricFamily(
            "terrace_router_inflight",
            "Requests in flight per tier and endpoint",
            labels=["tier", "endpoint"],
        )
        aim = GaugeMetricFamily(
            "terrace_router_large_share_target",
            "Share of traffic the calibration sends past the first tier: the target, "
            "or less while the operator's budget-following cut-off binds",
        )
        if state is not None:
            aim.add_metric([], state.config.calibration.aim)
            for name, value in state.share.shares().items():
                share.add_metric([name], value)
            for tier in state.tiers:
                for ep in tier.pool.endpoints:
                    inflight.add_metric([tier.name, ep.base], ep.inflight)
        yield share
        yield inflight
        yield aim

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Empty families: registration must not call into a state that may not exist yet.
        yield GaugeMetricFamily("terrace_router_tier_share", "", labels=["tier"])
        yield GaugeMetricFamily("terrace_router_inflight", "", labels=["tier", "endpoint"])
        yield GaugeMetricFamily("terrace_router_large_share_target", "")


class RouterMetrics:
    def __init__(self, current_state: Callable[[], RouterState | None]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "terrace_router_requests",
            "Requests answered, by serving tier and HTTP status",
            ["tier", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "terrace_router_request_duration_seconds",
            "Time from request to the last byte of the answer, by serving tier",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.complexity = Histogram(
            "terrace_router_complexity",
            "Classifier complexity scores of routed requests",
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.demand = Counter(
            "terrace_router_demand",
            "Requests by the tier the routing decision chose first, before any escalation: "
            "the demand each tier would serve if it were up (a tier at zero replicas included)",
            ["tier"],
            registry=r,
        )
        self.escalations = Counter(
            "terrace_router_escalations",
            "Requests moved to another tier, by reason",
            ["reason"],
            registry=r,
        )
        self.cache_hits = Counter(
            "terrace_router_cache_hits",
            "Requests answered from the response cache",
            registry=r,
        )
        self.reloads = Counter(
            "terrace_router_config_reloads",
            "Routing table reloads, by result",
            ["result"],
            registry=r,
        )
        r.register(_StateCollector(current_state))
        # Label children resolved once: `.labels()` costs more than the increment.
        self._requests: dict[tuple[str, int], Counter] = {}
        self._duration: dict[str, Histogram] = {}
        self._escalations: dict[str, Counter] = {}
        self._demand: dict[str, Counter] = {}

    def chose(self, tier: str) -> None:
        """A routing decision chose `tier` first (counted before any attempt)."""
        child = self._demand.get(tier)
        if child is None:
            child = self._demand[tier] = self.demand.labels(tier)
        child.inc()

    def observe_request(self, tier: str, status: int, seconds: float | None) -> None:
        child = self._requests.get((tier, status))
        if child is None:
            child = self._requests[(tier, status)] = self.requests.labels(tier, str(status))
        child.inc()
        if seconds is not None:
            hist = self._duration.get(tier)
            if hist is None:
                hist = self._duration[tier] = self.duration.labels(tier)
            hist.observe(seconds)

    def escalated(self, reason: str) -> None:
        child = self._escalations.get(reason)
        if child is None:
            child = self._escalations[reason] = self.escalations.labels(reason)
        child.inc()
