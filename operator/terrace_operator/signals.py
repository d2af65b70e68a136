"""What Prometheus says about every tier, read once per control tick.

One instant query per metric kind for all tiers at once (`sum by
(namespace, tier)`, or per GPU node), so a tick costs the same number of
queries for one tier or a thousand (`SignalQueries.grouped`). A tier whose
`scaling.metric` is `custom` adds its own query: it is the user's PromQL and
cannot be grouped.

Which series belong to a tier:

* router and runtime series carry ``tier``; the scrape adds ``namespace``
  (the chart's PodMonitor does). A series without ``namespace`` (a scrape
  that adds none, like the dev cluster's static targets) stands for the tier
  of that name in every namespace, but only where no series names the
  namespace;
* GPU series come from the power agent, one per GPU with a ``node`` label
  (the tier's pods' nodes pick them), or from DCGM-exporter with
  ``namespace`` and ``pod`` (the tier's pods are named ``<tier>-...``).

A kind the whole query failed for (Prometheus down, a 4xx) keeps its error,
and every tier's read of that kind raises it; a tier missing from a grouped
answer raises `NoData`; NaN or an infinity raises `BadValue`. So no
unusable answer is ever mistaken for zero load.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from terrace_operator.prometheus import (
    BadValue,
    MetricsError,
    NoData,
    PrometheusClient,
    QueryError,
    Sample,
    single_value,
)

GpuSource = Literal["agent", "dcgm"]
TierKey = tuple[str, str]  # (namespace, tier)

# Kinds summed per (namespace, tier).
TIER_KINDS = (
    "inflight",
    "demand",
    "rps",
    "latencyP95",
    "routerRequests",
    "runtimeRequests",
    "runtimeTokens",
    "runtimeEnergyJoules",
    "runtimeBusySeconds",
)
# Kinds read per GPU (agent: by node; DCGM: by namespace and pod).
GPU_KINDS = ("gpuUtilization", "gpuEnergyJoules")
BY_TIER = "namespace, tier"


@dataclass(frozen=True)
class SignalQueries:
    """The grouped PromQL, one expression per kind; `window` is a PromQL
    duration (``1m``) shared by every rate and increase."""

    window: str = "1m"
    gpu_source: GpuSource = "agent"

    def grouped(self) -> dict[str, str]:
        w = self.window

        def by_tier(expr: str) -> str:
            return f"sum by ({BY_TIER}) ({expr})"

        queries = {
            "inflight": by_tier("terrace_router_inflight"),
            # Requests per second the routing decision chose the tier for,
            # whichever tier served them: the demand that wakes a tier at zero.
            "demand": by_tier(f"rate(terrace_router_demand_total[{w}])"),
            "rps": by_tier(f"rate(terrace_router_requests_total[{w}])"),
            "latencyP95": (
                "histogram_quantile(0.95, sum by (" + BY_TIER + ", le) (rate("
                f"terrace_router_request_duration_seconds_bucket[{w}]))) * 1000"
            ),
            "routerRequests": by_tier(f"increase(terrace_router_requests_total[{w}])"),
            "runtimeRequests": by_tier(f"increase(terrace_runtime_requests_total[{w}])"),
            "runtimeTokens": by_tier(f"increase(terrace_runtime_tokens_generated_total[{w}])"),
            "runtimeEnergyJoules": by_tier(f"increase(terrace_runtime_energy_joules_total[{w}])"),
            "runtimeBusySeconds": by_tier(f"increase(terrace_runtime_busy_seconds_total[{w}])"),
        }
        if self.gpu_source == "dcgm":
            queries["gpuUtilization"] = "DCGM_FI_DEV_GPU_UTIL / 100"
            queries["gpuEnergyJoules"] = (
                # DCGM's energy counter is in millijoules.
                f"increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[{w}]) / 1000"
            )
        else:
            queries["gpuUtilization"] = "terrace_gpu_utilization_ratio"
            queries["gpuEnergyJoules"] = f"increase(terrace_gpu_energy_joules_total[{w}])"
        return queries


@dataclass(frozen=True)
class Signals:
    """One tick's answers: per kind, the samples (or why there are none)."""

    samples: Mapping[str, list[Sample]] = field(default_factory=dict)
    errors: Mapping[str, MetricsError] = field(default_factory=dict)
    custom: Mapping[TierKey, float | MetricsError] = field(default_factory=dict)
    gpu_source: GpuSource = "agent"
    queries: int = 0  # how many PromQL queries the tick sent
    carbon: float | MetricsError | None = None  # gCO2/kWh now; None: no query configured

    def _kind(self, kind: str) -> list[Sample]:
        if kind in self.errors:
            raise self.errors[kind]
        if kind not in self.samples:
            raise QueryError(f"unknown signal {kind!r}")
        return self.samples[kind]

    def tier(self, kind: str, namespace: str, tier: str) -> float:
        """The tier's value of a per-tier kind; a MetricsError says why there is none."""
        named, bare = [], []
        for s in self._kind(kind):
            if s.labels.get("tier") != tier:
                continue
            ns = s.labels.get("namespace", "")
            if ns == namespace:
                named.append(s)
            elif ns == "":
                bare.append(s)
        return single_value(named or bare, f"{kind} of {namespace}/{tier}")

    def gpus(self, kind: str, namespace: str, tier: str, nodes: Iterable[str]) -> list[float]:
        """One value per GPU that serves the tier (by node, or by DCGM's pod)."""
        if self.gpu_source == "dcgm":
            prefix = f"{tier}-"
            picked = [
                s
                for s in self._kind(kind)
                if s.labels.get("namespace") == namespace
                and s.labels.get("pod", "").startswith(prefix)
            ]
        else:
            hosts = set(nodes)
            picked = [s for s in self._kind(kind) if s.labels.get("node") in hosts]
        if not picked:
            raise NoData(f"no {kind} series for the GPUs of {namespace}/{tier}")
        values = [s.value for s in picked]
        if not all(math.isfinite(v) for v in values):
            raise BadValue(f"{kind} of {namespace}/{tier}: {values}")
        return values

    def carbon_intensity(self) -> float | None:
        """The grid's carbon intensity (gCO2/kWh), or None when unknown."""
        return self.carbon if isinstance(self.carbon, float) else None

    def custom_value(self, namespace: str, tier: str) -> float:
        got = self.custom.get((namespace, tier))
        if got is None:
            raise NoData(f"the custom query of {namespace}/{tier} was not read this tick")
        if isinstance(got, MetricsError):
            raise got
        return got


async def read_signals(
    prom: PrometheusClient,
    queries: SignalQueries,
    custom: Mapping[TierKey, str] | None = None,
    carbon: str | None = None,
) -> Signals:
    """Send every grouped query, each tier's custom one and the carbon
    intensity's (`carbon`, PromQL in gCO2/kWh), concurrently."""
    grouped = queries.grouped()
    custom = dict(custom or {})
    if carbon:
        custom[("", "")] = carbon  # read like a custom query, kept apart below

    async def one(promql: str) -> list[Sample] | MetricsError:
        try:
            return await prom.query(promql)
        except MetricsError as exc:
            return exc

    answers = await asyncio.gather(
        *(one(q) for q in grouped.values()), *(one(q) for q in custom.values())
    )
    samples: dict[str, list[Sample]] = {}
    errors: dict[str, MetricsError] = {}
    for kind, answer in zip(grouped, answers[: len(grouped)], strict=True):
        if isinstance(answer, MetricsError):
            errors[kind] = answer
        else:
            samples[kind] = answer
    values: dict[TierKey, float | MetricsError] = {}
    for (key, promql), answer in zip(custom.items(), answers[len(grouped) :], strict=True):
        if isinstance(answer, MetricsError):
            values[key] = answer
            continue
        try:
            values[key] = single_value(answer, promql)
        except MetricsError as exc:
            values[key] = exc
    intensity = values.pop(("", ""), None) if carbon else None
    return Signals(samples, errors, values, queries.gpu_source, len(answers), intensity)
