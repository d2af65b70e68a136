"""One control tick of one ModelTier, as a pure function: `plan`.

Given the tier's spec, what Prometheus said (`observe` over the tick's
`Signals`), the Deployment's replicas, the power agent's node annotations
and what the loop remembers between ticks (`TierMemory`), `plan` returns
every action of the tick as data (`TierPlan`): the replica count to set, the
Events to post, the node annotations to write, and the status fields and
conditions the tick owns (Scaling, MetricsAvailable, PowerApplied). The
ModelTier controller (tiers.py) does the reading and writing around it.

The decisions themselves are older pure functions: replicas in scaling.py
(the HPA's algorithm), watts in power.py, joules in energy.py, the capacity
the TierRouters' budget-following cut-off reads in budget.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from terrace_operator.agent.protocol import (
    decode_enforced,
    desired_entries,
    desired_key,
    encode_desired,
)
from terrace_operator.api import ModelTierSpec
from terrace_operator.budget import Capacity, measure
from terrace_operator.conditions import set_condition
from terrace_operator.energy import (
    CpuPowerModel,
    EnergyEstimate,
    carbon_grams,
    format_joules,
    tier_energy,
)
from terrace_operator.power import (
    CapWindow,
    DeviceConstraints,
    PowerDecision,
    PowerObservation,
    PowerPolicy,
    PowerState,
    decide_power,
)
from terrace_operator.prometheus import BadValue, MetricsError, NoData
from terrace_operator.scaling import (
    SUM_METRICS,
    Decision,
    Recommendation,
    ScalingPolicy,
    decide,
)
from terrace_operator.signals import Signals

LAST_SCALING_KEEP = 5
# What the tick owns in a ModelTier's status; the rest is the reconcile's.
TICK_CONDITIONS = ("Scaling", "MetricsAvailable", "PowerApplied")
TICK_FIELDS = (
    "lastScaling",
    "desiredPowerLimitWatts",
    "powerLimitWatts",
    "energyPerRequestJoules",
    "energyPerTokenJoules",
    "carbonPerRequestGrams",
    "carbonPer1kTokensGrams",
    "demandRequestsPerSecond",
    "capacityRequestsPerSecond",
)


def tick_status(status: Mapping | None) -> dict:
    """The tick-owned part of a status (conditions filtered by type)."""
    status = status or {}
    out = {k: status[k] for k in TICK_FIELDS if k in status}
    out["conditions"] = [
        c for c in status.get("conditions") or [] if c.get("type") in TICK_CONDITIONS
    ]
    return out


@dataclass(frozen=True)
class TierMemory:
    """What one tier's loop carries between ticks (in memory, like the HPA)."""

    history: tuple[Recommendation, ...] | None = None
    power: PowerState | None = None
    power_nodes: frozenset[str] = frozenset()
    metrics_ok: bool | None = None
    woken: str | None = None  # when the wake endpoint brought it up, for the next status
    capacity: Capacity | None = None  # budget.measure's last answer
    status: dict = field(default_factory=dict)  # the last tick's status part (tick_status)


@dataclass(frozen=True)
class Observations:
    """One tier's signals this tick; `error` says why the scaling metric is unusable."""

    observed: float | None = None
    activation: float | None = None  # router demand (req/s) + requests in flight
    utilization: float | None = None  # 0..1, the tier's GPUs' mean
    latency_ms: float | None = None
    energy: EnergyEstimate | None = None
    error: str | None = None
    carbon_intensity: float | None = None  # gCO2/kWh now; None: unknown
    demand_rps: float | None = None  # requests/s the router chose the tier for
    served_rps: float | None = None  # requests/s the tier answered


@dataclass(frozen=True)
class TierPlan:
    replicas: int | None  # set the Deployment to this count; None: leave it
    events: tuple[tuple[str, str, str], ...]  # (reason, message, type)
    annotations: Mapping[str, Mapping[str, str | None]]  # node -> annotation patch
    status: dict  # the tick's status part: TICK_FIELDS and TICK_CONDITIONS
    memory: TierMemory


@dataclass(frozen=True)
class PowerPlan:
    condition: tuple[str, str, str]  # PowerApplied's (status, reason, message)
    memory: TierMemory
    writes: dict[str, str | None]  # node -> desired-power annotation value (None: remove)
    fields: dict = field(default_factory=dict)  # desiredPowerLimitWatts, powerLimitWatts
    events: tuple[tuple[str, str, str], ...] = ()


def scaling_policy(spec: ModelTierSpec) -> ScalingPolicy:
    s, r = spec.scaling, spec.replicas
    return ScalingPolicy(
        min_replicas=r.min,
        max_replicas=max(r.min, r.max),
        metric=s.metric,
        target=float(s.target),
        tolerance=s.tolerance_percent / 100.0,
        scale_up_window_seconds=s.scale_up_stabilization_seconds,
        scale_down_window_seconds=s.scale_down_stabilization_seconds,
        metrics_unavailable_replicas=s.metrics_unavailable_replicas,
    )


def power_policy(spec: ModelTierSpec) -> PowerPolicy | None:
    """The tier's power policy; None for a CPU tier or no `power`.
    ValueError: a spec the CRD lets through but the policy cannot use (a
    window schedule that is no cron expression)."""
    p = spec.power
    if spec.device != "gpu" or p is None:
        return None
    windows = tuple(
        CapWindow(
            w.schedule,
            w.max_watts,
            None if w.duration_minutes is None else w.duration_minutes * 60,
        )
        for w in p.windows or []
    )
    return PowerPolicy(p.policy, p.min_watts, p.max_watts, windows)


def plan_scaling(
    spec: ModelTierSpec,
    current: int,
    observed: float | None,
    activation: float | None,
    memory: TierMemory,
    now: float,
) -> Decision:
    history = memory.history
    if history is None:
        # A fresh process knows no past recommendations; pretend the current
        # count was recommended just now, so a restart never scales down
        # before a full window has passed.
        history = (Recommendation(now, current),)
    return decide(scaling_policy(spec), current, observed, now, history, activation)


def scaling_entry(when: str, before: int, after: int, reason: str) -> dict:
    return {"time": when, "from": before, "to": after, "reason": reason[:512]}


def append_scaling(entries: list[dict] | None, entry: dict) -> list[dict]:
    return (list(entries or []) + [entry])[-LAST_SCALING_KEEP:]


def device_constraints(reports: list[dict]) -> DeviceConstraints | None:
    """The tightest constraints across the GPUs the agent reported."""
    gpus = [g for r in reports for g in (r.get("gpus") or {}).values()]
    try:
        lo = max(math.ceil(float(g["minWatts"])) for g in gpus)
        hi = min(math.floor(float(g["maxWatts"])) for g in gpus)
    except (KeyError, TypeError, ValueError):
        return None
    if lo > hi:
        return None
    return DeviceConstraints(lo, hi)


def enforced_watts(reports: list[dict]) -> list[int]:
    out = []
    for r in reports:
        for g in (r.get("gpus") or {}).values():
            try:
                out.append(int(round(float(g["enforcedWatts"]))))
            except (KeyError, TypeError, ValueError):
                continue
    return out


def observe(
    spec: ModelTierSpec,
    signals: Signals | None,
    namespace: str,
    name: str,
    nodes: tuple[str, ...],
    cpu_model: CpuPowerModel,
) -> Observations:
    """The tier's slice of the tick's signals (no I/O)."""
    if signals is None:
        return Observations(error="no Prometheus URL configured")
    # Demand at the router: requests per second the routing decision chose
    # this tier for (counted before escalation, so a tier at zero whose
    # traffic escalates still shows it), plus requests in flight.
    parts: list[float | None] = []
    for kind in ("demand", "inflight"):
        try:
            parts.append(signals.tier(kind, namespace, name))
        except MetricsError:
            parts.append(None)
    activation = sum(p for p in parts if p is not None) if None not in parts else None
    observed, error = None, None
    metric = spec.scaling.metric
    try:
        if metric == "custom":
            observed = signals.custom_value(namespace, name)
        elif metric == "gpuUtilization":
            gpus = signals.gpus("gpuUtilization", namespace, name, nodes)
            observed = 100.0 * sum(gpus) / len(gpus)
        else:
            observed = signals.tier(metric, namespace, name)
    except (NoData, BadValue) as exc:
        # A latency percentile over zero requests is empty or NaN: with the
        # router answering that there is no demand, that is "no latency".
        if metric == "latencyP95" and activation == 0:
            observed = 0.0
        else:
            error = f"{type(exc).__name__}: {exc}"
    except MetricsError as exc:
        error = f"{type(exc).__name__}: {exc}"
    utilization = latency = served = None
    if spec.device == "gpu":
        with contextlib.suppress(MetricsError):
            gpus = signals.gpus("gpuUtilization", namespace, name, nodes)
            utilization = sum(gpus) / len(gpus)
    with contextlib.suppress(MetricsError):
        latency = signals.tier("latencyP95", namespace, name)
    with contextlib.suppress(MetricsError):
        served = signals.tier("rps", namespace, name)
    energy = tier_energy(signals, namespace, name, nodes, spec.device, cpu_model)
    return Observations(
        observed,
        activation,
        utilization,
        latency,
        energy,
        error,
        signals.carbon_intensity(),
        demand_rps=parts[0],
        served_rps=served,
    )


def plan(
    spec: ModelTierSpec,
    *,
    namespace: str,
    name: str,
    generation: int | None,
    status: Mapping,
    current: int | None,
    obs: Observations,
    nodes: tuple[str, ...],
    annotations: Mapping[str, Mapping[str, str]],
    memory: TierMemory,
    now: datetime,
    refresh_after_seconds: float,
    ready: int | None = None,
) -> TierPlan:
    """One tick: replicas, power and energy for one tier.

    `status` is the tier's status now; `current` its Deployment's replicas
    (None: no Deployment yet) and `ready` how many of them are ready
    (None: as many as `current`); `nodes` the nodes running its pods;
    `annotations` those nodes' annotations and those of the nodes it asked
    for power on last time (`memory.power_nodes`); `now` timezone-aware.
    A desired-power annotation older than `refresh_after_seconds` is
    written again, so the agent's TTL never expires it while it holds.
    """
    conditions = list(status.get("conditions") or [])
    events: list[tuple[str, str, str]] = []
    out: dict = {}
    mem = memory
    when = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        pp = power_policy(spec)
        power_problem = None
    except ValueError as exc:
        # Replicas are still decided; PowerApplied says what is wrong.
        pp, power_problem = None, str(exc)
    metrics_ok = obs.error is None
    replicas = None
    last_scaling = status.get("lastScaling")

    if current is None:
        conditions = set_condition(
            conditions,
            "Scaling",
            "Unknown",
            "NoDeployment",
            "the tier's Deployment does not exist yet",
            generation,
        )
    elif spec.replicas.count is not None:
        conditions = set_condition(
            conditions,
            "Scaling",
            "False",
            "ExternalAutoscaler",
            "spec.replicas.count is set (scale subresource): an HPA or KEDA drives "
            "replicas, the control loop stands aside",
            generation,
        )
    else:
        woke = mem.woken is not None
        if mem.woken is not None:  # the wake endpoint scaled it: this tick records it
            entry = scaling_entry(mem.woken, 0, 1, "woken by the router: a request was waiting")
            last_scaling = append_scaling(last_scaling, entry)
            conditions = set_condition(
                conditions, "Scaling", "True", "WakingUp", f"0 -> 1: {entry['reason']}", generation
            )
            mem = replace(mem, woken=None)
        d = plan_scaling(spec, current, obs.observed, obs.activation, mem, now.timestamp())
        if not metrics_ok:
            d = replace(d, reason=f"{d.reason}: {obs.error}")
        mem = replace(mem, history=d.history)
        if d.replicas != current:
            replicas = d.replicas
            if current == 0:
                verb = "WakingUp"  # from zero: its router demand woke it
            else:
                verb = "ScaledUp" if d.replicas > current else "ScaledDown"
            msg = f"{current} -> {d.replicas}: {d.reason}"
            events.append((verb, msg, "Normal"))
            last_scaling = append_scaling(
                last_scaling, scaling_entry(when, current, d.replicas, d.reason)
            )
            conditions = set_condition(conditions, "Scaling", "True", verb, msg, generation)
        elif not metrics_ok:
            conditions = set_condition(
                conditions,
                "Scaling",
                "False",
                "MetricsUnavailable",
                f"holding {d.replicas} replicas",
                generation,
            )
        elif not woke:  # a tier just woken shows WakingUp until the next tick
            conditions = set_condition(
                conditions,
                "Scaling",
                "True",
                "Steady",
                f"{current} replicas; {spec.scaling.metric} target {spec.scaling.target}",
                generation,
            )
    if last_scaling:
        out["lastScaling"] = last_scaling

    if metrics_ok:
        conditions = set_condition(
            conditions,
            "MetricsAvailable",
            "True",
            "PrometheusAnswered",
            f"{spec.scaling.metric} is available",
            generation,
        )
    else:
        conditions = set_condition(
            conditions,
            "MetricsAvailable",
            "False",
            "MetricsUnavailable",
            obs.error or "unknown",
            generation,
        )
        if mem.metrics_ok is not False:
            events.append(("MetricsUnavailable", obs.error or "", "Warning"))
    mem = replace(mem, metrics_ok=metrics_ok)

    patches: dict[str, dict[str, str | None]] = {}
    if power_problem is not None:
        # No request is written or refreshed: the last one expires on the
        # agent (TTL) and the GPUs drift back to their default.
        conditions = set_condition(
            conditions, "PowerApplied", "False", "InvalidPowerSpec", power_problem, generation
        )
    elif spec.device == "gpu":
        key = desired_key(namespace, name)
        power = _plan_power(
            namespace,
            name,
            pp,
            spec,
            obs,
            mem,
            status,
            nodes,
            annotations,
            key,
            now,
            refresh_after_seconds,
        )
        conditions = set_condition(conditions, "PowerApplied", *power.condition, generation)
        mem = power.memory
        out.update(power.fields)
        events.extend(power.events)
        patches = {node: {key: value} for node, value in power.writes.items()}

    if obs.energy is not None:
        out["energyPerRequestJoules"] = format_joules(obs.energy.per_request)
        if obs.energy.per_token is not None:
            out["energyPerTokenJoules"] = format_joules(obs.energy.per_token)
        carbon = carbon_grams(obs.energy, obs.carbon_intensity)
        if carbon is not None:
            out["carbonPerRequestGrams"] = format_joules(carbon[0])
            if carbon[1] is not None:
                out["carbonPer1kTokensGrams"] = format_joules(carbon[1])

    mem = _plan_capacity(spec, obs, mem, status, out, current if ready is None else ready)
    if mem.capacity is not None:
        out["capacityRequestsPerSecond"] = format_joules(mem.capacity.rps)
    if obs.demand_rps is not None:
        out["demandRequestsPerSecond"] = format_joules(obs.demand_rps)

    out["conditions"] = [c for c in conditions if c.get("type") in TICK_CONDITIONS]
    return TierPlan(replicas, tuple(events), patches, out, replace(mem, status=out))


def _plan_capacity(
    spec: ModelTierSpec,
    obs: Observations,
    mem: TierMemory,
    status: Mapping,
    out: Mapping,
    ready: int | None,
) -> TierMemory:
    """The tier's capacity this tick (budget.measure), for the TierRouters'
    cut-off. A restarted operator starts from the status' last figure."""
    watts = out.get("desiredPowerLimitWatts") if spec.device == "gpu" else None
    last = mem.capacity
    max_replicas = max(spec.replicas.min, spec.replicas.max)
    if last is None and status.get("capacityRequestsPerSecond") is not None:
        with contextlib.suppress(TypeError, ValueError):
            rps = float(status["capacityRequestsPerSecond"])
            last = Capacity(rps / max_replicas, max_replicas, status.get("desiredPowerLimitWatts"))
    metric = spec.scaling.metric
    capacity = measure(
        last,
        served_rps=obs.served_rps,
        ready_replicas=ready or 0,
        max_replicas=max_replicas,
        observed=obs.observed if metric != "custom" else None,
        target=float(spec.scaling.target) if metric != "custom" else None,
        latency_ms=obs.latency_ms,
        latency_target_ms=spec.scaling.latency_target_milliseconds,
        watts=watts,
        observed_is_total=metric in SUM_METRICS,
    )
    return replace(mem, capacity=capacity)


def _plan_power(
    namespace: str,
    name: str,
    pp: PowerPolicy | None,
    spec: ModelTierSpec,
    obs: Observations,
    mem: TierMemory,
    status: Mapping,
    nodes: tuple[str, ...],
    annotations: Mapping[str, Mapping[str, str]],
    key: str,
    now: datetime,
    refresh_after_seconds: float,
) -> PowerPlan:
    """The power half of a tick; `writes` maps a node to its annotation's new
    value (None: remove it)."""
    present = {n: a for n, a in annotations.items() if n in nodes}
    reports = [r for r in (decode_enforced(a) for a in present.values()) if r is not None]
    gone = set(mem.power_nodes) - set(nodes)
    patches: dict[str, str | None] = {}
    if pp is None or pp.policy == "off":
        for n in sorted(gone | set(present)):
            if key in (annotations.get(n) or {}):
                patches[n] = None
        mem = replace(mem, power_nodes=frozenset(), power=None)
        off = "power.policy is off (or unset): GPUs stay at their default"
        return PowerPlan(("False", "PolicyOff", off), mem, patches)
    for n in sorted(gone):
        patches[n] = None
    state = mem.power or PowerState(status.get("desiredPowerLimitWatts"))
    observation = PowerObservation(
        obs.utilization, obs.latency_ms, spec.scaling.latency_target_milliseconds
    )
    if obs.error is not None and pp.policy == "adaptive" and state.watts is not None:
        # No metrics: keep the limit we had; never guess downwards.
        decision = PowerDecision(state.watts, "hold: metrics unavailable", state=state)
    else:
        try:
            decision = decide_power(pp, state, observation, now, device_constraints(reports))
        except ValueError as exc:
            return PowerPlan(("False", "InvalidPowerSpec", str(exc)), mem, patches)
    watts = decision.watts
    assert watts is not None  # only policy off yields None, handled above
    events = []
    if watts != status.get("desiredPowerLimitWatts"):
        events.append(
            (
                "PowerLimitChanged",
                f"{status.get('desiredPowerLimitWatts')} -> {watts} W: {decision.reason}",
                "Normal",
            )
        )
    for n, ann in present.items():
        entry = (
            next((e for e in desired_entries({key: ann[key]}) if e.watts == watts), None)
            if key in ann
            else None
        )
        if entry is None or (now - entry.time).total_seconds() > refresh_after_seconds:
            patches[n] = encode_desired(namespace, name, watts, now)
    mem = replace(mem, power=decision.state, power_nodes=frozenset(present))
    fields = {"desiredPowerLimitWatts": watts}
    enforced = enforced_watts(reports)
    if not nodes:
        condition = ("Unknown", "NoPods", "no running pods of this tier on any node")
    elif not enforced:
        condition = ("False", "AgentNotReporting", f"no power agent report on {', '.join(nodes)}")
    elif all(w == watts for w in enforced):
        condition = ("True", "Enforced", f"{watts} W enforced on {len(enforced)} GPU(s)")
    else:
        condition = (
            "False",
            "Pending",
            f"asked {watts} W, agent enforces {sorted(set(enforced))} W",
        )
    if enforced:
        fields["powerLimitWatts"] = min(enforced)
    return PowerPlan(condition, mem, patches, fields, tuple(events))
