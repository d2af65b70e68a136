"""Which power limit a GPU tier should run at: a pure policy.

This is where a watt limit is decided (the agent, `agent/`, is where it is
applied). Inputs are plain numbers: the last limit asked for, the tier's GPU
utilization and p95 latency, its latency target, the spec's bounds and time
windows, and the device's own constraints as the agent reported them.

Policies (`spec.power.policy`):

* ``off``: no limit; the agent leaves the GPU at its default.
* ``fixed``: ``maxWatts`` (still capped by an active window and the device).
* ``adaptive``: a feedback controller on latency headroom and utilization.
  A GPU that is power-capped runs at a lower clock; dynamic power falls
  faster than throughput (P ~ f^a with a > 1), so while the latency SLO has
  headroom a lower cap serves the same requests with less energy. Each tick:

    - latency at or past the target (or utilization >= ``saturated``):
      jump to the upper bound: SLO first;
    - latency past ``raiseAt`` x target (or utilization >= ``high``):
      raise by ``stepUp`` (a quarter of the range);
    - latency below ``lowerAt`` x target and utilization below ``low``:
      lower by ``stepDown`` (5 % of the range), but not within
      ``cooldown`` seconds of a raise;
    - otherwise hold.

  The gap between the lower and the raise thresholds, the asymmetric steps,
  the cooldown after a raise and a minimum change of ``hysteresis`` watts
  are the hysteresis that keeps it from flapping.

Bounds: integer watts inside [minWatts, maxWatts], an active window's
``maxWatts`` caps the top (a window wins over ``minWatts``), and the device's
[min, max] constraints win over everything: the result is always a limit the
GPU accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from croniter import croniter

Policy = Literal["adaptive", "fixed", "off"]


@dataclass(frozen=True)
class CapWindow:
    """A time-of-day cap (the CRD's ``spec.power.windows[]``).

    Without a duration the window is open during every minute the cron
    expression matches (``* 17-21 * * *``); with one, for that long after
    each match (``0 17 * * *`` for 5 hours).
    """

    schedule: str
    max_watts: int
    duration_seconds: int | None = None
    time_zone: str = "UTC"

    def __post_init__(self) -> None:
        if not croniter.is_valid(self.schedule):
            raise ValueError(f"invalid cron schedule {self.schedule!r}")
        if self.duration_seconds is not None and self.duration_seconds <= 0:
            raise ValueError("window duration must be positive")

    def active(self, now: datetime) -> bool:
        local = now.astimezone(ZoneInfo(self.time_zone))
        if self.duration_seconds is None:
            return bool(croniter.match(self.schedule, local))
        # get_prev is strictly before its start; +1 s makes a window whose
        # schedule fires exactly now count as open.
        opened = croniter(self.schedule, local + timedelta(seconds=1)).get_prev(datetime)
        return bool(local - opened < timedelta(seconds=self.duration_seconds))


@dataclass(frozen=True)
class DeviceConstraints:
    """What nvmlDeviceGetPowerManagementLimitConstraints says, in watts."""

    min_watts: int
    max_watts: int
    default_watts: int | None = None

    @classmethod
    def from_milliwatts(
        cls, min_mw: int, max_mw: int, default_mw: int | None = None
    ) -> DeviceConstraints:
        # Round inwards so an integer-watt limit is always accepted.
        return cls(
            math.ceil(min_mw / 1000),
            math.floor(max_mw / 1000),
            None if default_mw is None else round(default_mw / 1000),
        )


@dataclass(frozen=True)
class PowerPolicy:
    policy: Policy = "adaptive"
    min_watts: int | None = None
    max_watts: int | None = None
    windows: tuple[CapWindow, ...] = ()
    # Controller tuning: documented defaults, overridable for tests.
    low_utilization: float = 0.5
    high_utilization: float = 0.85
    saturated_utilization: float = 0.97
    lower_at: float = 0.6  # of the latency target
    raise_at: float = 0.8
    step_down_fraction: float = 0.05
    step_up_fraction: float = 0.25
    hysteresis_watts: int = 10
    cooldown_seconds: float = 60.0

    def __post_init__(self) -> None:
        if (
            self.min_watts is not None
            and self.max_watts is not None
            and self.min_watts > self.max_watts
        ):
            raise ValueError(f"minWatts {self.min_watts} > maxWatts {self.max_watts}")
        if not 0 <= self.low_utilization <= self.high_utilization <= self.saturated_utilization:
            raise ValueError("utilization thresholds must be ordered low <= high <= saturated")
        if not 0 < self.lower_at < self.raise_at <= 1:
            raise ValueError("latency thresholds must satisfy 0 < lowerAt < raiseAt <= 1")


@dataclass(frozen=True)
class PowerObservation:
    utilization: float | None = None  # 0..1, the tier's GPUs' mean
    latency_p95_ms: float | None = None
    latency_target_ms: float | None = None


@dataclass(frozen=True)
class PowerState:
    """What the controller carries from one tick to the next."""

    watts: int | None = None  # last limit asked for
    last_raise_at: float | None = None  # unix seconds


@dataclass(frozen=True)
class PowerDecision:
    watts: int | None  # None: leave the GPU alone (policy off)
    reason: str
    lower_bound: int | None = None
    upper_bound: int | None = None
    active_windows: tuple[str, ...] = field(default=())
    state: PowerState = field(default_factory=PowerState)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) and x >= 0 else None


def effective_bounds(
    policy: PowerPolicy, device: DeviceConstraints | None, now: datetime
) -> tuple[int, int, tuple[str, ...]]:
    """[lo, hi] for this instant, after windows and device constraints."""
    dev_lo = device.min_watts if device else None
    dev_hi = device.max_watts if device else None
    lo = policy.min_watts if policy.min_watts is not None else dev_lo
    hi = policy.max_watts if policy.max_watts is not None else dev_hi
    if lo is None or hi is None:
        raise ValueError("power bounds unknown: set minWatts/maxWatts or report device constraints")
    active = tuple(w.schedule for w in policy.windows if w.active(now))
    for w in policy.windows:
        if w.schedule in active:
            hi = min(hi, w.max_watts)
    lo = min(lo, hi)  # a window's cap wins over minWatts
    if dev_lo is not None and dev_hi is not None:
        # The device wins over everything: it would reject anything else.
        lo = max(dev_lo, min(dev_hi, lo))
        hi = max(dev_lo, min(dev_hi, hi))
    return int(lo), int(hi), active


def decide_power(
    policy: PowerPolicy,
    state: PowerState,
    observation: PowerObservation,
    now: datetime,
    device: DeviceConstraints | None = None,
) -> PowerDecision:
    """One tick of the power policy for one GPU tier."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if policy.policy == "off":
        return PowerDecision(None, "policy off: GPU left at its default limit", state=PowerState())
    lo, hi, active = effective_bounds(policy, device, now)
    window_note = f" (window {', '.join(active)} caps at {hi} W)" if active else ""
    ts = now.timestamp()

    def done(watts: int, reason: str, raised: bool = False) -> PowerDecision:
        watts = max(lo, min(hi, int(watts)))
        return PowerDecision(
            watts,
            reason + window_note,
            lo,
            hi,
            active,
            PowerState(watts, ts if raised else state.last_raise_at),
        )

    if policy.policy == "fixed":
        return done(hi, f"policy fixed: {hi} W")

    span = hi - lo
    current = state.watts if state.watts is not None else hi
    if current > hi or current < lo:
        clamped = max(lo, min(hi, current))
        return done(clamped, f"limit {current} W moved into bounds [{lo}, {hi}] W")

    util = _finite(observation.utilization)
    lat = _finite(observation.latency_p95_ms)
    target = _finite(observation.latency_target_ms)
    target = target if target else None
    frac = lat / target if (lat is not None and target is not None) else None
    seen = []
    if util is not None:
        seen.append(f"utilization {util:.0%}")
    if lat is not None:
        seen.append(f"p95 {lat:.0f} ms" + (f" of {target:.0f} ms" if target else ""))
    what = ", ".join(seen) or "no signal"

    if (frac is not None and frac >= 1.0) or (
        util is not None and util >= policy.saturated_utilization
    ):
        return done(hi, f"raise to max: {what}", raised=hi > current)
    if (frac is not None and frac >= policy.raise_at) or (
        util is not None and util >= policy.high_utilization
    ):
        step = max(policy.hysteresis_watts, math.ceil(span * policy.step_up_fraction))
        new = min(hi, current + step)
        return done(new, f"raise {current}->{new} W: {what}", raised=new > current)

    headroom = frac is None or frac < policy.lower_at
    idle_enough = util is None or util < policy.low_utilization
    if util is None and frac is None:
        return done(current, "hold: no utilization or latency signal")
    if headroom and idle_enough:
        if state.last_raise_at is not None and ts - state.last_raise_at < policy.cooldown_seconds:
            return done(current, f"hold (cooldown after raise): {what}")
        step = max(policy.hysteresis_watts, math.ceil(span * policy.step_down_fraction))
        new = max(lo, current - step)
        if new == current:
            return done(current, f"hold at minimum {lo} W: {what}")
        return done(new, f"lower {current}->{new} W: {what}")
    return done(current, f"hold: {what}")
