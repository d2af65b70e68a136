"""The cut-off follows the power budget: pure.

Two steps, each a pure function:

1. `measure` (every control tick, per tier): how many requests per second the
   tier can serve while its scaling metric stays at its target and its
   latency inside its latency target, with all its `replicas.max` running,
   under the power limit it has now. It is measured, not assumed: the rate
   the ready replicas serve now, times how far the metric is from its target
   (target / observed, and latency target / p95 when that is tighter). A cap
   slows the GPUs, so the metric per request rises and the measured capacity
   falls with it. Between measurements (too little traffic to measure) the
   last one is kept, and scaled down at once in proportion to a lowered
   power limit: throughput never falls faster than power (it falls slower,
   docs/power.md), so the proportional cut is on the safe side until the
   next measurement says how much the cap really costs.

2. `effective_share` (per TierRouter): the share of traffic the router may
   send past its first tier. The calibrator splits that share evenly over
   the upper tiers (router/calibration.py), so upper tier j receives
   share / u of the router's demand. The share is the router's target,
   lowered until every upper tier receives at most `headroom` of its
   capacity; it returns to the target when the capacity does (a cap lifts,
   replicas come back). The reason names the tier that binds: `PowerCapped`
   when its power limit is under its `power.maxWatts`, else `Saturated`.

Units: requests per second, watts, shares in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Below this fraction of the scaling target the metric is mostly noise and
# idle overhead: the tier is not measured (the last measurement stands).
MIN_LOAD_FRACTION = 0.1
# Weight of a new measurement against the last one at the same power limit.
SMOOTHING = 0.5
# Fraction of its capacity an upper tier is planned to receive.
HEADROOM = 0.9
# The ModelTier status fields the cut-off reads (the tick writes them).
BUDGET_FIELDS = ("demandRequestsPerSecond", "capacityRequestsPerSecond", "desiredPowerLimitWatts")


@dataclass(frozen=True)
class Capacity:
    per_replica_rps: float  # one ready replica, at the target, at `watts`
    max_replicas: int
    watts: int | None  # the power limit it was measured under; None: not capped (CPU)

    @property
    def rps(self) -> float:
        return self.per_replica_rps * self.max_replicas


def measure(
    last: Capacity | None,
    *,
    served_rps: float | None,
    ready_replicas: int,
    max_replicas: int,
    observed: float | None,
    target: float | None,
    latency_ms: float | None = None,
    latency_target_ms: float | None = None,
    watts: int | None = None,
    observed_is_total: bool = False,
) -> Capacity | None:
    """This tick's capacity of one tier; None while it was never measured.

    `served_rps` is what the tier answered per second over the metrics
    window; `observed` / `target` its scaling metric and per-replica target
    (None: a metric that says nothing about load, like a custom query);
    `observed_is_total`: the metric is the tier's sum (in-flight requests,
    requests per second; scaling.SUM_METRICS), not a per-replica average;
    `latency_ms` / `latency_target_ms` its p95 and target, if any; `watts`
    its power limit now (None on CPU)."""
    ratio = None
    if observed is not None and observed_is_total and ready_replicas > 0:
        observed = observed / ready_replicas  # per replica, as the target is
    usable = (
        served_rps is not None
        and served_rps > 0
        and ready_replicas > 0
        and observed is not None
        and target is not None
        and target > 0
        and observed >= MIN_LOAD_FRACTION * target
    )
    if usable:
        ratio = target / observed  # type: ignore[operator]
        if latency_ms and latency_target_ms and latency_ms > 0:
            ratio = min(ratio, latency_target_ms / latency_ms)
    if ratio is None or not math.isfinite(ratio):
        if last is None:
            return None
        per = last.per_replica_rps
        if watts is not None and last.watts is not None and watts < last.watts:
            per *= watts / last.watts
            return Capacity(per, max_replicas, watts)
        return Capacity(per, max_replicas, last.watts)
    fresh = served_rps / ready_replicas * ratio  # type: ignore[operator]
    if last is not None and last.watts == watts:
        fresh = SMOOTHING * fresh + (1 - SMOOTHING) * last.per_replica_rps
    return Capacity(fresh, max_replicas, watts)


@dataclass(frozen=True)
class UpperTier:
    """One tier past the router's first, as its ModelTier status shows it."""

    name: str
    capacity_rps: float | None  # None: not measured yet (no limit known)
    watts: int | None = None  # power limit now
    max_watts: int | None = None  # the spec's power.maxWatts


@dataclass(frozen=True)
class Share:
    value: float  # in [0, target]
    reason: str  # Target | PowerCapped | Saturated | NoDemand
    message: str

    @property
    def percent(self) -> int:
        return int(math.floor(self.value * 100 + 1e-9))


def effective_share(
    target: float, demand_rps: float | None, uppers: list[UpperTier], headroom: float = HEADROOM
) -> Share:
    """The share of `demand_rps` (the router's requests per second, all tiers)
    that its upper tiers can take within their targets; at most `target`."""
    if not uppers or target <= 0:
        return Share(target, "Target", f"target {target:.0%}: no upper tier to protect")
    if demand_rps is None or demand_rps <= 0:
        return Share(target, "NoDemand", f"target {target:.0%}: no demand measured")
    known = [t for t in uppers if t.capacity_rps is not None]
    if not known:
        return Share(target, "Target", f"target {target:.0%}: upper tiers not measured yet")
    u = len(uppers)
    binding = min(known, key=lambda t: t.capacity_rps)  # type: ignore[arg-type,return-value]
    allowed = u * headroom * binding.capacity_rps / demand_rps  # type: ignore[operator]
    if allowed >= target:
        return Share(target, "Target", f"target {target:.0%}: the upper tiers can take it")
    capped = (
        binding.watts is not None
        and binding.max_watts is not None
        and binding.watts < binding.max_watts
    )
    why = f"power limit {binding.watts} W of {binding.max_watts} W" if capped else "at its maximum"
    value = max(0.0, allowed)
    return Share(
        value,
        "PowerCapped" if capped else "Saturated",
        f"{binding.name} serves up to {binding.capacity_rps:.3g} req/s ({why}) of "
        f"{demand_rps:.3g} req/s: share {value:.0%} instead of the target {target:.0%}",
    )


def _number(value: object) -> float | None:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def router_share(target: float, statuses: list[tuple[str, dict, int | None]]) -> Share:
    """`effective_share` from the ModelTier statuses of a router's tiers, in
    its order: (name, status, the spec's power.maxWatts or None). The demand
    is the sum of every tier's `demandRequestsPerSecond` (the router's
    routing decisions, before escalation); a tier without one counts 0."""
    demand = [_number(s.get("demandRequestsPerSecond")) for _, s, _ in statuses]
    total = sum(d for d in demand if d is not None) if any(d is not None for d in demand) else None
    uppers = []
    for name, status, max_watts in statuses[1:]:
        watts = _number(status.get("desiredPowerLimitWatts"))
        capacity = _number(status.get("capacityRequestsPerSecond"))
        uppers.append(UpperTier(name, capacity, None if watts is None else int(watts), max_watts))
    return effective_share(target, total, uppers)
