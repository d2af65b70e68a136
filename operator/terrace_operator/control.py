"""The control loop: every tick, per ModelTier, read Prometheus and act.

Per tier and tick (default every 15 s):

1. read the tier's scaling metric (and the router's demand signal) from
   Prometheus; a broken answer never scales down: `scaling.decide` holds;
2. decide replicas (`scaling.py`) and patch the Deployment's scale
   subresource inside [min, max]; a Kubernetes Event and a
   `status.lastScaling` entry for every change;
3. GPU tiers: decide a power limit (`power.py`) and hand it to the power agent
   on every Node that hosts the tier's pods (a Node annotation, see
   `agent/protocol.py`); copy what the agent reports as ENFORCED into
   `status.powerLimitWatts`;
4. energy per request over the same window (`energy.py`);
5. write status (conditions Scaling, MetricsAvailable, PowerApplied) with
   server-side apply under its own field manager, so the operator core's
   Ready condition and this loop's conditions merge by type.

The decisions are pure (`plan_scaling`, `power.decide_power`);
`Controller.tick` is the thin adapter that does the I/O, and `run_loop` runs
it for every tier each interval. When `spec.replicas.count` is set (an HPA or KEDA
drives the scale subresource), this loop stands aside for that tier's
replicas; power control still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from terrace_operator.agent.protocol import (
    DEFAULT_TTL_SECONDS,
    decode_enforced,
    desired_entries,
    desired_key,
    encode_desired,
)
from terrace_operator.api import API_VERSION, ModelTierSpec
from terrace_operator.children import controller_of, tier_selector
from terrace_operator.conditions import get_condition, set_condition
from terrace_operator.energy import CpuPowerModel, EnergyMetrics, format_joules, measure_tier
from terrace_operator.power import (
    DeviceConstraints,
    PowerDecision,
    PowerObservation,
    PowerPolicy,
    PowerState,
    PowerWindow,
    decide_power,
)
from terrace_operator.prometheus import (
    BadValue,
    MetricsError,
    NoData,
    PrometheusClient,
    TierQueries,
)
from terrace_operator.scaling import Decision, Recommendation, ScalingPolicy, decide

log = logging.getLogger("terrace.control")

FIELD_MANAGER = "terrace-control"
LAST_SCALING_KEEP = 5


class ControlSettings(BaseSettings):
    """The loop's settings: TERRACE_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="TERRACE_", extra="ignore")

    prometheus_url: str | None = Field(default=None, description="No URL: the loop is off.")
    control_interval_seconds: float = Field(default=15.0, gt=0)
    prometheus_timeout_seconds: float = Field(default=5.0, gt=0)
    metrics_window: str = Field(default="1m", pattern=r"^[0-9]+(ms|s|m|h)$")
    gpu_metrics_source: Literal["agent", "dcgm"] = "agent"
    cpu_watts_per_busy_core: float = Field(default=350.0 / 56, gt=0)
    power_desired_ttl_seconds: float = Field(default=DEFAULT_TTL_SECONDS, gt=0)
    # Where routers wake a tier at zero (POST /wake/NAMESPACE/TIER); None: off.
    wake_host: str = "0.0.0.0"
    wake_port: int | None = Field(default=None, ge=0, le=65535)
    # The operator's own TERRACE_NAMESPACES (comma-separated; empty: all).
    namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value


# ------------------------------------------------------------------ pure part


@dataclass
class TierMemory:
    """What one tier's loop carries between ticks (in memory, like the HPA)."""

    history: tuple[Recommendation, ...] | None = None
    power: PowerState | None = None
    power_nodes: frozenset[str] = frozenset()
    metrics_ok: bool | None = None
    woken: str | None = None  # when the wake endpoint brought it up, for the next status
    invalid_generation: int | None = None  # the spec generation found unreadable, logged once


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
    p = spec.power
    if spec.device != "gpu" or p is None:
        return None
    windows = tuple(
        PowerWindow(
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
    policy = scaling_policy(spec)
    history = memory.history
    if history is None:
        # A fresh process knows no past recommendations; pretend the current
        # count was recommended just now, so a restart never scales down
        # before a full window has passed.
        history = (Recommendation(now, current),)
    return decide(policy, current, observed, now, history, activation)


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


# ------------------------------------------------------------------- adapter


class ControlApi(Protocol):
    async def list_tiers(self, namespaces: list[str]) -> list[dict]: ...
    async def get_tier(self, namespace: str, name: str) -> dict | None: ...
    async def get_scale(self, namespace: str, name: str) -> int | None: ...
    async def patch_scale(self, namespace: str, name: str, replicas: int) -> None: ...
    async def pod_nodes(self, namespace: str, selector: dict[str, str]) -> set[str]: ...
    async def node_annotations(self, name: str) -> dict[str, str] | None: ...
    async def patch_node_annotations(
        self, name: str, annotations: dict[str, str | None]
    ) -> None: ...
    async def apply_status(self, body: dict) -> None: ...
    async def event(self, involved: dict, reason: str, message: str, type: str) -> None: ...


class KubeControlApi:
    """ControlApi over the operator's shared KubeClient (kube.py)."""

    def __init__(self, kube: Any) -> None:
        self.kube = kube

    async def _call(self, method: str, path: str, **kw: Any) -> dict | None:
        # kube.KubeClient has no public generic request yet (see
        # .notes/control-needs.md); its private one carries the auth handling.
        response = await self.kube._request(method, path, **kw)
        if response.status_code == 404:
            return None
        self.kube._raise(response)
        return response.json()

    async def list_tiers(self, namespaces: list[str]) -> list[dict]:
        base = "/apis/terrace.dev/v1alpha1"
        paths = [f"{base}/namespaces/{ns}/modeltiers" for ns in namespaces] or [
            f"{base}/modeltiers"
        ]
        items: list[dict] = []
        for path in paths:
            body = await self._call("GET", path)
            for item in (body or {}).get("items", []):
                # list items carry no apiVersion/kind; Events need them
                items.append({"apiVersion": API_VERSION, "kind": "ModelTier", **item})
        return items

    async def get_tier(self, namespace: str, name: str) -> dict | None:
        body = await self._call(
            "GET", f"/apis/terrace.dev/v1alpha1/namespaces/{namespace}/modeltiers/{name}"
        )
        return None if body is None else {"apiVersion": API_VERSION, "kind": "ModelTier", **body}

    async def get_scale(self, namespace: str, name: str) -> int | None:
        """The replicas of the tier's own Deployment; None when it has none. A
        Deployment of that name the tier does not control (ChildConflict: the
        operator never adopts it) is not the tier's: neither the loop nor the
        wake endpoint ever scales it."""
        body = await self._call("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}")
        if body is None or controller_of(body) != ("ModelTier", name):
            return None
        return int((body.get("spec") or {}).get("replicas") or 0)

    async def patch_scale(self, namespace: str, name: str, replicas: int) -> None:
        await self._call(
            "PATCH",
            f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale",
            params={"fieldManager": FIELD_MANAGER},
            content=json.dumps({"spec": {"replicas": replicas}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def pod_nodes(self, namespace: str, selector: dict[str, str]) -> set[str]:
        sel = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        body = await self._call(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": sel}
        )
        nodes = set()
        for pod in (body or {}).get("items", []):
            node = (pod.get("spec") or {}).get("nodeName")
            phase = (pod.get("status") or {}).get("phase")
            if node and phase not in ("Succeeded", "Failed"):
                nodes.add(node)
        return nodes

    async def node_annotations(self, name: str) -> dict[str, str] | None:
        body = await self._call("GET", f"/api/v1/nodes/{name}")
        if body is None:
            return None
        return dict((body.get("metadata") or {}).get("annotations") or {})

    async def patch_node_annotations(self, name: str, annotations: dict[str, str | None]) -> None:
        await self._call(
            "PATCH",
            f"/api/v1/nodes/{name}",
            params={"fieldManager": FIELD_MANAGER},
            content=json.dumps({"metadata": {"annotations": annotations}}),
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def apply_status(self, body: dict) -> None:
        await self.kube.apply(body, subresource="status", manager=FIELD_MANAGER, force=True)

    async def event(self, involved: dict, reason: str, message: str, type: str) -> None:
        from terrace_operator.conditions import now_rfc3339

        await self.kube.event(involved, reason, message, type, now=now_rfc3339())


@dataclass
class Observations:
    observed: float | None = None
    activation: float | None = None
    utilization: float | None = None
    latency_ms: float | None = None
    error: str | None = None


class ControlMetrics:
    """The loop's own counters; create once, in a startup hook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Evidence that the loop ran, per tier: "held N replicas for three
        # ticks" can be read off the operator instead of a wall clock.
        self.ticks = Counter(
            "terrace_operator_control_ticks",
            "Control-loop ticks completed per ModelTier (metrics read, replicas and power "
            "decided, status written)",
            ["namespace", "tier"],
            registry=registry,
        )


@dataclass
class Controller:
    """Runs ticks; one per operator process, shared by every tier's timer."""

    api: ControlApi
    prometheus: PrometheusClient | None
    settings: ControlSettings
    energy_metrics: EnergyMetrics | None = None
    memory: dict[tuple[str, str], TierMemory] = field(default_factory=dict)
    control_metrics: ControlMetrics | None = None

    def queries(self, namespace: str, name: str, nodes: tuple[str, ...] = ()) -> TierQueries:
        return TierQueries(
            namespace, name, self.settings.metrics_window, self.settings.gpu_metrics_source, nodes
        )

    async def observe(
        self, spec: ModelTierSpec, q: TierQueries, want_power: bool
    ) -> Observations:
        obs = Observations()
        prom = self.prometheus
        if prom is None:
            obs.error = "no Prometheus URL configured"
            return obs
        # Demand at the router: requests per second the routing decision chose
        # this tier for (counted before escalation, so a tier at zero whose
        # traffic escalates still shows it), plus requests in flight.
        parts: list[float | None] = []
        for query in (q.demand(), q.inflight()):
            try:
                parts.append(await prom.value(query))
            except MetricsError:
                parts.append(None)
        known = [p for p in parts if p is not None]
        obs.activation = sum(known) if len(known) == len(parts) else None
        try:
            query = q.for_metric(spec.scaling.metric, spec.scaling.query)
            obs.observed = await prom.value(query)
        except (NoData, BadValue) as exc:
            # A latency percentile over zero requests is empty or NaN: with the
            # router answering that there is no demand, that is "no latency".
            if spec.scaling.metric == "latencyP95" and obs.activation == 0:
                obs.observed = 0.0
            else:
                obs.error = f"{type(exc).__name__}: {exc}"
        except MetricsError as exc:
            obs.error = f"{type(exc).__name__}: {exc}"
        if want_power:
            try:
                obs.utilization = await prom.value(q.gpu_utilization_percent()) / 100.0
            except MetricsError:
                obs.utilization = None
            try:
                obs.latency_ms = await prom.value(q.latency_p95_ms())
            except MetricsError:
                obs.latency_ms = None
        return obs

    async def tick(self, body: dict) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation = meta.get("generation")
        mem = self.memory.setdefault((namespace, name), TierMemory())
        try:
            spec = ModelTierSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            # Only a CRD older or newer than the operator lets such a spec in.
            # The reconcile reports it (Ready=False InvalidSpec, one Warning
            # Event); the loop leaves the tier alone and says so once per spec.
            if mem.invalid_generation != generation:
                mem.invalid_generation = generation
                log.warning("ModelTier %s/%s has a spec the operator cannot read (Ready "
                            "InvalidSpec); the control loop leaves it alone: %s", namespace,
                            name, str(exc).replace("\n", " ")[:300])
            return
        mem.invalid_generation = None
        status = dict(body.get("status") or {})
        conditions = list(status.get("conditions") or [])
        now_dt = datetime.now(UTC)
        now = now_dt.timestamp()
        when = now_dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {"apiVersion": API_VERSION, "kind": "ModelTier", "metadata": meta}
        out: dict[str, Any] = {}
        try:
            pp = power_policy(spec)
            power_problem = None
        except ValueError as exc:
            # A spec the CRD schema lets through but the policy cannot use (a
            # window's schedule that is no cron expression): say so on
            # PowerApplied; replicas are still decided.
            pp, power_problem = None, str(exc)

        nodes: tuple[str, ...] = ()
        if spec.device == "gpu":
            nodes = tuple(sorted(await self.api.pod_nodes(namespace, tier_selector(name))))
        q = self.queries(namespace, name, nodes)
        obs = await self.observe(spec, q, want_power=pp is not None and pp.policy == "adaptive")
        metrics_ok = obs.error is None

        # --- replicas ---
        current = await self.api.get_scale(namespace, name)
        if current is None:
            conditions = set_condition(conditions, "Scaling", "Unknown", "NoDeployment",
                                       "the tier's Deployment does not exist yet", generation)
        elif spec.replicas.count is not None:
            conditions = set_condition(
                conditions, "Scaling", "False", "ExternalAutoscaler",
                "spec.replicas.count is set (scale subresource): an HPA or KEDA drives "
                "replicas, the control loop stands aside", generation,
            )
        else:
            woke = mem.woken is not None
            if woke:  # the wake endpoint scaled it: this tick records it
                entry = scaling_entry(mem.woken, 0, 1, "woken by the router: a request was waiting")
                status["lastScaling"] = out["lastScaling"] = append_scaling(
                    status.get("lastScaling"), entry
                )
                conditions = set_condition(
                    conditions, "Scaling", "True", "WakingUp", f"0 -> 1: {entry['reason']}",
                    generation,
                )
                mem.woken = None
            d = plan_scaling(spec, current, obs.observed, obs.activation, mem, now)
            if not metrics_ok:
                d = replace(d, reason=f"{d.reason}: {obs.error}")
            mem.history = d.history
            if d.replicas != current:
                await self.api.patch_scale(namespace, name, d.replicas)
                if current == 0:
                    verb = "WakingUp"  # from zero: its router demand woke it
                else:
                    verb = "ScaledUp" if d.replicas > current else "ScaledDown"
                msg = f"{current} -> {d.replicas}: {d.reason}"
                await self.api.event(involved, verb, msg, "Normal")
                out["lastScaling"] = append_scaling(
                    status.get("lastScaling"), scaling_entry(when, current, d.replicas, d.reason)
                )
                conditions = set_condition(conditions, "Scaling", "True", verb, msg, generation)
            elif not metrics_ok:
                conditions = set_condition(conditions, "Scaling", "False", "MetricsUnavailable",
                                           f"holding {d.replicas} replicas", generation)
            elif not woke:  # a tier just woken shows WakingUp until the next tick
                conditions = set_condition(
                    conditions, "Scaling", "True", "Steady",
                    f"{current} replicas; {spec.scaling.metric} target {spec.scaling.target}",
                    generation,
                )

        if metrics_ok:
            conditions = set_condition(
                conditions, "MetricsAvailable", "True", "PrometheusAnswered",
                f"{spec.scaling.metric} is available", generation,
            )
        else:
            conditions = set_condition(
                conditions, "MetricsAvailable", "False", "MetricsUnavailable",
                obs.error or "unknown", generation,
            )
            if mem.metrics_ok is not False:
                await self.api.event(involved, "MetricsUnavailable", obs.error or "", "Warning")
        mem.metrics_ok = metrics_ok

        # --- power ---
        if power_problem is not None:
            # No request is written or refreshed: the last one expires on the
            # agent (TTL) and the GPUs drift back to their default.
            conditions = set_condition(conditions, "PowerApplied", "False", "InvalidPowerSpec",
                                       power_problem, generation)
        elif spec.device == "gpu":
            conditions = await self._power(
                namespace, name, spec, pp, obs, mem, nodes, now_dt, status, out, conditions,
                generation, involved,
            )

        # --- energy ---
        if self.prometheus is not None:
            e = await measure_tier(
                self.prometheus, q, spec.device,
                CpuPowerModel(self.settings.cpu_watts_per_busy_core),
            )
            if e is not None:
                out["energyPerRequestJoules"] = format_joules(e.per_request)
                if e.per_token is not None:
                    out["energyPerTokenJoules"] = format_joules(e.per_token)
                if self.energy_metrics is not None:
                    self.energy_metrics.record(namespace, name, e)

        mine = [c for c in conditions if c.get("type") in ("Scaling", "MetricsAvailable",
                                                           "PowerApplied")]
        out["conditions"] = mine
        if self._changed(status, out):
            await self.api.apply_status({
                "apiVersion": API_VERSION, "kind": "ModelTier",
                "metadata": {"name": name, "namespace": namespace},
                # lastScaling is an atomic list this manager owns: send it
                # every time, or server-side apply would drop it.
                "status": out | (
                    {"lastScaling": status["lastScaling"]}
                    if "lastScaling" in status and "lastScaling" not in out else {}
                ),
            })
        if self.control_metrics is not None:
            self.control_metrics.ticks.labels(namespace, name).inc()

    async def wake(self, namespace: str, name: str, watched: list[str]) -> tuple[int, str]:
        """A router holds a request for this tier and none of its pods
        answers: bring a tier at zero to one replica now, without waiting for
        Prometheus and the next tick. Returns (HTTP status, message).

        Only a watched tier that scales to zero, has no external autoscaler
        and is at zero is touched; the recommendation is remembered, so the
        next tick holds the replica for the scale-down window."""
        if watched and namespace not in watched:
            return 404, f"namespace {namespace!r} is not watched by this operator"
        body = await self.api.get_tier(namespace, name)
        if body is None:
            return 404, f"no ModelTier {namespace}/{name}"
        try:
            spec = ModelTierSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return 409, f"ModelTier {namespace}/{name} has an invalid spec"
        if spec.replicas.min != 0 or spec.replicas.count is not None:
            return 409, f"ModelTier {namespace}/{name} does not scale to zero"
        current = await self.api.get_scale(namespace, name)
        if current is None:
            return 409, f"ModelTier {namespace}/{name} has no Deployment yet"
        if current > 0:
            return 200, f"{current} replicas: awake"
        await self.api.patch_scale(namespace, name, 1)
        mem = self.memory.setdefault((namespace, name), TierMemory())
        now_dt = datetime.now(UTC)
        mem.history = (*(mem.history or ()), Recommendation(now_dt.timestamp(), 1))
        mem.woken = now_dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        involved = {"apiVersion": API_VERSION, "kind": "ModelTier", "metadata": body["metadata"]}
        await self.api.event(
            involved, "WakingUp", "0 -> 1: woken by the router (a request is waiting)", "Normal"
        )
        return 202, "0 -> 1: waking"

    async def forget(self, namespace: str, name: str) -> None:
        """A deleted tier: withdraw its power requests from the nodes it used."""
        mem = self.memory.pop((namespace, name), None)
        key = desired_key(namespace, name)
        for node in sorted(mem.power_nodes if mem else ()):
            try:
                await self.api.patch_node_annotations(node, {key: None})
            except Exception as exc:  # the TTL on the agent side covers a miss
                log.warning("cannot withdraw %s/%s's power request from %s: %s",
                            namespace, name, node, exc)

    @staticmethod
    def _changed(status: dict, out: dict) -> bool:
        for k, v in out.items():
            if k == "conditions":
                old = {c.get("type"): c for c in status.get("conditions") or []}
                for c in v:
                    o = old.get(c["type"]) or {}
                    if any(o.get(f) != c.get(f) for f in ("status", "reason", "message",
                                                          "observedGeneration")):
                        return True
            elif status.get(k) != v:
                return True
        return False

    async def _power(
        self, namespace, name, spec, pp, obs, mem, nodes, now_dt, status, out, conditions,
        generation, involved,
    ) -> list[dict]:
        key = desired_key(namespace, name)
        reports = []
        annotations_by_node: dict[str, dict[str, str]] = {}
        for n in nodes:
            ann = await self.api.node_annotations(n)
            if ann is None:
                continue
            annotations_by_node[n] = ann
            r = decode_enforced(ann)
            if r is not None:
                reports.append(r)
        gone = set(mem.power_nodes) - set(nodes)
        if pp is None or pp.policy == "off":
            for n in sorted(gone | set(annotations_by_node)):
                ann = annotations_by_node.get(n) or await self.api.node_annotations(n) or {}
                if key in ann:
                    await self.api.patch_node_annotations(n, {key: None})
            mem.power_nodes = frozenset()
            mem.power = None
            return set_condition(conditions, "PowerApplied", "False", "PolicyOff",
                                 "power.policy is off (or unset): GPUs stay at their default",
                                 generation)
        for n in sorted(gone):
            await self.api.patch_node_annotations(n, {key: None})
        device = device_constraints(reports)
        state = mem.power
        if state is None:
            state = PowerState(status.get("desiredPowerLimitWatts"))
        observation = PowerObservation(
            obs.utilization, obs.latency_ms, spec.scaling.latency_target_milliseconds
        )
        if obs.error is not None and pp.policy == "adaptive" and state.watts is not None:
            # No metrics: keep the limit we had; never guess downwards.
            decision = PowerDecision(state.watts, "hold: metrics unavailable", state=state)
        else:
            try:
                decision = decide_power(pp, state, observation, now_dt, device)
            except ValueError as exc:
                return set_condition(conditions, "PowerApplied", "False", "InvalidPowerSpec",
                                     str(exc), generation)
        mem.power = decision.state
        watts = decision.watts
        assert watts is not None  # only policy off yields None, handled above
        out["desiredPowerLimitWatts"] = watts
        if watts != status.get("desiredPowerLimitWatts"):
            await self.api.event(
                involved, "PowerLimitChanged",
                f"{status.get('desiredPowerLimitWatts')} -> {watts} W: {decision.reason}", "Normal",
            )
        refresh_after = self.settings.power_desired_ttl_seconds / 3
        for n, ann in annotations_by_node.items():
            entry = next((e for e in desired_entries({key: ann[key]}) if e.watts == watts), None) \
                if key in ann else None
            if entry is None or (now_dt - entry.time).total_seconds() > refresh_after:
                await self.api.patch_node_annotations(
                    n, {key: encode_desired(namespace, name, watts, now_dt)}
                )
        mem.power_nodes = frozenset(annotations_by_node)
        enforced = enforced_watts(reports)
        if not nodes:
            return set_condition(conditions, "PowerApplied", "Unknown", "NoPods",
                                 "no running pods of this tier on any node", generation)
        if not enforced:
            return set_condition(conditions, "PowerApplied", "False", "AgentNotReporting",
                                 f"no power agent report on {', '.join(nodes)}", generation)
        out["powerLimitWatts"] = min(enforced)
        if all(w == watts for w in enforced):
            return set_condition(conditions, "PowerApplied", "True", "Enforced",
                                 f"{watts} W enforced on {len(enforced)} GPU(s)", generation)
        return set_condition(
            conditions, "PowerApplied", "False", "Pending",
            f"asked {watts} W, agent enforces {sorted(set(enforced))} W", generation,
        )


# ------------------------------------------------------------------ kopf glue


async def run_loop(controller: Controller, namespaces: list[str], stop: asyncio.Event) -> None:
    """Tick every tier every `control_interval_seconds` until `stop` is set.

    One loop per process rather than a kopf timer per object: kopf puts a
    finalizer on every object that has a timer, which would block deleting a
    ModelTier whenever the operator is down, for no side effect outside the
    cluster. Tiers tick concurrently; one tier's failure never stops another.
    """
    interval = controller.settings.control_interval_seconds
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    sem = asyncio.Semaphore(8)

    async def one(body: dict) -> None:
        async with sem:
            try:
                await controller.tick(body)
            except asyncio.CancelledError:
                raise
            except Exception:
                meta = body.get("metadata") or {}
                log.exception("control tick failed for %s/%s", meta.get("namespace"),
                              meta.get("name"))

    while not stop.is_set():
        listed = True
        try:
            tiers = await controller.api.list_tiers(namespaces)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("cannot list ModelTiers: %s", exc)
            tiers, listed = [], False
        if listed:  # a failed list is not "every tier was deleted"
            alive = {(t["metadata"]["namespace"], t["metadata"]["name"]) for t in tiers}
            for ns, name in set(controller.memory) - alive:
                await controller.forget(ns, name)
        await asyncio.gather(*(one(t) for t in tiers))
        next_at += interval
        delay = next_at - loop.time()
        if delay < 0:  # a slow tick: skip the missed slots rather than bunching up
            next_at = loop.time()
            delay = 0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def register(registry: Any, settings: ControlSettings, kube: Any,
             metrics_registry: Any | None = None,
             namespaces: list[str] | None = None) -> Controller:
    """Register the control loop's startup/cleanup handlers on `registry`.

    `kube` is the operator's shared kube.KubeClient; `namespaces` the watched
    namespaces (empty: all; default: TERRACE_NAMESPACES). Returns the
    Controller.
    """
    import kopf

    controller = Controller(
        KubeControlApi(kube), None, settings,
        EnergyMetrics(metrics_registry) if metrics_registry is not None else None,
        control_metrics=(
            ControlMetrics(metrics_registry) if metrics_registry is not None else None
        ),
    )
    watched = list(settings.namespaces if namespaces is None else namespaces)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    wake_servers: list[Any] = []

    @kopf.on.startup(registry=registry)
    async def _start_control(**_: Any) -> None:
        if settings.prometheus_url:
            controller.prometheus = PrometheusClient(
                settings.prometheus_url, settings.prometheus_timeout_seconds
            )
        else:
            log.warning("no Prometheus URL (TERRACE_PROMETHEUS_URL): the control loop only "
                        "reports MetricsAvailable=False and holds replicas")
        stop.clear()
        tasks.append(asyncio.create_task(run_loop(controller, watched, stop),
                                         name="terrace-control"))
        if settings.wake_port is not None:
            from terrace_operator.wake import serve_wake

            wake_servers.append(await serve_wake(
                lambda ns, name: controller.wake(ns, name, watched),
                settings.wake_host, settings.wake_port,
            ))

    @kopf.on.cleanup(registry=registry)
    async def _stop_control(**_: Any) -> None:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()
        for runner in wake_servers:
            await runner.cleanup()
        wake_servers.clear()
        if controller.prometheus is not None:
            await controller.prometheus.aclose()

    return controller


__all__ = [
    "ControlMetrics",
    "ControlSettings",
    "Controller",
    "TierMemory",
    "get_condition",
    "plan_scaling",
    "register",
]
