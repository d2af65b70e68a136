"""Energy per request and per output token, per tier.

Joules and requests are counted over the same window (``increase(...[W])``
of both counters in one tick), so the ratio is energy per request over that
window. Where the joules come from, best first:

1. the runtime's own ``terrace_runtime_energy_joules_total`` (a runtime with
   an energy source: RAPL on CPU, NVML on GPU);
2. GPU tiers: the power agent's ``terrace_gpu_energy_joules_total`` on the
   nodes that host the tier (NVML's total-energy counter);
3. CPU tiers: the CPU power model below, over the runtime's busy seconds.

CPU power model: a busy core draws ``watts_per_busy_core``. The default,
6.25 W, is an Intel Xeon Platinum 8480+'s TDP over its cores (350 W / 56,
Intel ARK); AMD's EPYC 9654 gives 3.75 W (360 W / 96). It charges a request
only for the core time it used, not for idle sockets: a marginal cost, the
number a router that moves a request between tiers should compare.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Gauge

from terrace_operator.prometheus import MetricsError
from terrace_operator.signals import Signals

Source = Literal["runtime", "gpu-agent", "cpu-model"]

XEON_8480_WATTS_PER_CORE = 350.0 / 56  # Intel ARK: 350 W TDP, 56 cores


@dataclass(frozen=True)
class CpuPowerModel:
    watts_per_busy_core: float = XEON_8480_WATTS_PER_CORE

    def joules(self, busy_core_seconds: float) -> float:
        return max(0.0, busy_core_seconds) * self.watts_per_busy_core


@dataclass(frozen=True)
class EnergyEstimate:
    joules: float
    requests: float
    tokens: float | None
    source: Source

    @property
    def per_request(self) -> float:
        return self.joules / self.requests

    @property
    def per_token(self) -> float | None:
        if self.tokens is None or self.tokens <= 0:
            return None
        return self.joules / self.tokens


def estimate(
    joules: float | None, requests: float | None, tokens: float | None, source: Source
) -> EnergyEstimate | None:
    """None unless there were requests and a finite, non-negative energy."""
    if joules is None or requests is None:
        return None
    if not (math.isfinite(joules) and math.isfinite(requests)) or joules < 0 or requests <= 0:
        return None
    if tokens is not None and not math.isfinite(tokens):
        tokens = None
    return EnergyEstimate(joules, requests, tokens, source)


JOULES_PER_KWH = 3.6e6


def carbon_grams(
    e: EnergyEstimate, intensity: float | None
) -> tuple[float, float | None] | None:
    """(gCO2 per request, gCO2 per 1,000 generated tokens or None) at a grid
    intensity in gCO2/kWh; None when the intensity is unknown (never 0)."""
    if intensity is None or not math.isfinite(intensity) or intensity < 0:
        return None
    per_kwh = intensity / JOULES_PER_KWH
    per_token = e.per_token
    return e.per_request * per_kwh, (per_token * 1000 * per_kwh if per_token is not None else None)


def format_joules(value: float) -> str:
    """Three significant digits as a decimal string (status holds no floats)."""
    if value == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{digits}f}"


def _maybe(read: Callable[[], float]) -> float | None:
    try:
        return read()
    except MetricsError:
        return None


def tier_energy(
    signals: Signals,
    namespace: str,
    tier: str,
    nodes: tuple[str, ...],
    device: str,
    cpu_model: CpuPowerModel | None = None,
) -> EnergyEstimate | None:
    """One tier's energy per request over the tick's window, or None if unknown."""

    def tier_value(kind: str) -> Callable[[], float]:
        return lambda: signals.tier(kind, namespace, tier)

    requests = _maybe(tier_value("runtimeRequests"))
    if requests is None:
        requests = _maybe(tier_value("routerRequests"))
    if not requests:
        return None
    tokens = _maybe(tier_value("runtimeTokens"))
    joules = _maybe(tier_value("runtimeEnergyJoules"))
    if joules is not None and joules > 0:
        return estimate(joules, requests, tokens, "runtime")
    if device == "gpu":
        gpu = _maybe(lambda: sum(signals.gpus("gpuEnergyJoules", namespace, tier, nodes)))
        return estimate(gpu, requests, tokens, "gpu-agent")
    busy = _maybe(tier_value("runtimeBusySeconds"))
    if busy is None:
        return None
    return estimate((cpu_model or CpuPowerModel()).joules(busy), requests, tokens, "cpu-model")


class EnergyMetrics:
    """The operator's energy gauges; create once, in a startup hook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["namespace", "tier", "source"]
        self.per_request = Gauge(
            "terrace_tier_energy_per_request_joules",
            "Energy per request over the control loop's window",
            labels,
            registry=registry,
        )
        self.carbon_per_request = Gauge(
            "terrace_tier_carbon_per_request_grams",
            "Grams of CO2 per request: energy per request times the grid's carbon intensity",
            ["namespace", "tier"], registry=registry,
        )
        self.carbon_per_1k_tokens = Gauge(
            "terrace_tier_carbon_per_1k_tokens_grams",
            "Grams of CO2 per 1,000 generated tokens, the same way",
            ["namespace", "tier"], registry=registry,
        )
        self.per_token = Gauge(
            "terrace_tier_energy_per_token_joules",
            "Energy per generated token over the control loop's window",
            labels,
            registry=registry,
        )

    def record(
        self, namespace: str, tier: str, e: EnergyEstimate, intensity: float | None = None
    ) -> None:
        self.per_request.labels(namespace, tier, e.source).set(e.per_request)
        if e.per_token is not None:
            self.per_token.labels(namespace, tier, e.source).set(e.per_token)
        carbon = carbon_grams(e, intensity)
        if carbon is None:
            # Unknown intensity: no stale figure left behind either.
            for gauge in (self.carbon_per_request, self.carbon_per_1k_tokens):
                with contextlib.suppress(KeyError):
                    gauge.remove(namespace, tier)
            return
        self.carbon_per_request.labels(namespace, tier).set(carbon[0])
        if carbon[1] is not None:
            self.carbon_per_1k_tokens.labels(namespace, tier).set(carbon[1])
