"""How many replicas a tier should run: pure, HPA-style replica math.

This is where a replica count is decided. Nothing here talks to Kubernetes
or Prometheus; `plan.py` feeds observations in and `tiers.py` applies the result.

The rules are the Horizontal Pod Autoscaler's, so they behave the way HPA and
KEDA users expect:

* ratio:      desired = ceil(current * observed / target), skipped while the
              ratio is inside the tolerance band (HPA's default is 10 %);
* sum metrics (in-flight requests, request rate, `custom`) are totals for the
  tier, which HPA would divide by the replica count (``AverageValue``), so
  ``desired = ceil(total / target)``; that also works from zero replicas;
* windows:    HPA's stabilization: a scale-up goes no higher than the lowest
              recommendation inside ``scaleUpStabilizationSeconds``, a
              scale-down no lower than the highest recommendation inside
              ``scaleDownStabilizationSeconds``;
* bounds:     always inside [min, max];
* zero:       a ``min: 0`` tier goes to zero only when the activation signal
              (the router's demand for the tier: requests whose routing
              decision chose it, whichever tier served them, plus requests
              in flight) is exactly zero, and comes back to at least one
              replica as soon as it is not (KEDA's activation semantics);
* outage:     no metric (Prometheus down, empty answer, NaN) never scales
              down and never to zero: the tier holds
              max(current, metricsUnavailableReplicas), inside the bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Metric = Literal["inflight", "rps", "latencyP95", "gpuUtilization", "custom"]

# Metrics that are a sum over the tier's replicas (HPA "AverageValue"); the
# others are already an average or a percentile (HPA "Utilization"/"Value").
SUM_METRICS: frozenset[str] = frozenset({"inflight", "rps", "custom"})

DEFAULT_TOLERANCE = 0.10  # HPA's --horizontal-pod-autoscaler-tolerance


@dataclass(frozen=True)
class ScalingPolicy:
    """The slice of a ModelTier spec the replica math needs."""

    min_replicas: int
    max_replicas: int
    metric: Metric = "inflight"
    target: float = 1.0
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_window_seconds: float = 0.0
    scale_down_window_seconds: float = 300.0
    metrics_unavailable_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(
                f"replicas must satisfy 0 <= min <= max, got [{self.min_replicas}, "
                f"{self.max_replicas}]"
            )
        if not self.target > 0 or not math.isfinite(self.target):
            raise ValueError(f"scaling target must be a positive number, got {self.target}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True)
class Recommendation:
    time: float  # seconds (any monotonic-enough clock, e.g. unix time)
    replicas: int


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    # The recommendations to carry into the next tick (already trimmed).
    history: tuple[Recommendation, ...] = field(default=())
    metrics_available: bool = True


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value >= 0


def raw_desired(policy: ScalingPolicy, current: int, observed: float) -> tuple[int, str]:
    """The unbounded, unstabilized HPA recommendation and a one-line why."""
    if policy.metric in SUM_METRICS:
        # Per-replica average = observed / current; ratio = average / target.
        # Tolerance is applied to that ratio, as HPA does.
        if current > 0:
            ratio = observed / (current * policy.target)
            if abs(ratio - 1.0) <= policy.tolerance:
                return current, f"{policy.metric}={observed:g} within tolerance of target"
        desired = math.ceil(observed / policy.target - 1e-9)
        return desired, f"{policy.metric}={observed:g} for target {policy.target:g}/replica"
    # Average-type metrics (latency, utilization): the plain HPA ratio.
    if current == 0:
        # An average over zero replicas means nothing; activation decides.
        return 0, f"{policy.metric}={observed:g} with no replicas"
    ratio = observed / policy.target
    if abs(ratio - 1.0) <= policy.tolerance:
        return current, f"{policy.metric}={observed:g} within tolerance of target {policy.target:g}"
    desired = math.ceil(current * ratio - 1e-9)
    return desired, f"{policy.metric}={observed:g} for target {policy.target:g}"


def stabilize(
    current: int,
    recommended: int,
    history: tuple[Recommendation, ...],
    now: float,
    up_window: float,
    down_window: float,
) -> tuple[int, tuple[Recommendation, ...]]:
    """HPA's stabilizeRecommendationWithBehaviors, over plain data.

    Returns the stabilized count and the history to keep (the new
    recommendation appended, entries older than both windows dropped).
    """
    up = down = recommended
    for rec in history:
        age = now - rec.time
        if age < up_window:
            up = min(up, rec.replicas)
        if age < down_window:
            down = max(down, rec.replicas)
    result = current
    if result < up:
        result = up
    if result > down:
        result = down
    keep_for = max(up_window, down_window)
    kept = tuple(r for r in history if now - r.time < keep_for)
    return result, kept + (Recommendation(now, recommended),)


def decide(
    policy: ScalingPolicy,
    current: int,
    observed: float | None,
    now: float,
    history: tuple[Recommendation, ...] = (),
    activation: float | None = None,
) -> Decision:
    """One tick of the autoscaler for one tier.

    ``observed`` is the scaling metric (None when Prometheus gave no usable
    answer); ``activation`` is the demand signal used only to decide zero
    versus non-zero (router requests + in-flight for the tier); when it is
    None the scaling metric itself is the activation signal.
    """
    lo, hi = policy.min_replicas, policy.max_replicas
    if not _usable(observed):
        # Outage: never down, never to zero. Record the held value so that a
        # scale-down after the outage still waits for the full window.
        floor = policy.metrics_unavailable_replicas
        held = max(current, floor if floor is not None else 0, 1)
        held = max(min(held, hi), lo)
        if hi == 0:
            held = 0
        _, kept = stabilize(current, held, history, now, 0.0, policy.scale_down_window_seconds)
        what = "no value" if observed is None else f"unusable value {observed!r}"
        return Decision(
            held,
            f"metrics unavailable ({what}); holding {held} replicas",
            kept,
            metrics_available=False,
        )
    assert observed is not None
    demand = activation if _usable(activation) else observed
    assert demand is not None
    recommended, why = raw_desired(policy, current, observed)
    if demand > 0 and recommended < 1:
        # Activation: someone is waiting at the router; never leave them at zero.
        recommended = 1
        why += f", activation={demand:g}"
    elif demand == 0 and lo == 0:
        recommended = 0
        why = f"idle ({policy.metric}={observed:g}, no requests)"
    stabilized, kept = stabilize(
        current,
        recommended,
        history,
        now,
        policy.scale_up_window_seconds,
        policy.scale_down_window_seconds,
    )
    # Coming back from zero must not wait for a scale-up window: a request is
    # being held at the router right now.
    if current == 0 and demand > 0 and stabilized < 1:
        stabilized = 1
    bounded = max(lo, min(hi, stabilized))
    if bounded != recommended and stabilized != recommended:
        if stabilized > recommended:
            why += f"; scale-down stabilized at {stabilized}"
        else:
            why += f"; scale-up stabilized at {stabilized}"
    if bounded != stabilized:
        why += f"; bounded to [{lo}, {hi}]"
    return Decision(bounded, why, kept)
