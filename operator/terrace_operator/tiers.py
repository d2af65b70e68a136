"""The ModelTier controller: a tier's children, its replicas, its watts, its status.

One controller owns the ModelTier kind and is the only writer of its status
(field manager `terrace-operator`). A sync of one tier:

1. applies the runtime Deployment, Service and PodDisruptionBudget
   (children.py) and keeps `spec.replicas` inside the tier's bounds;
2. when the control tick has come round for the tier, runs `plan.plan`
   over the tick's Prometheus signals and applies what it says: replicas
   (field manager `terrace-operator-replicas`, with a resourceVersion
   precondition), Events, and the desired-power annotation on each Node
   that hosts the tier's GPU pods (the power agent, agent/, enforces it);
3. writes the status: readiness from the Deployment, and the tick's part
   (Scaling, MetricsAvailable, PowerApplied, lastScaling, watts, joules).

The tick (every `control_interval_seconds`) sends one query per metric kind
for all tiers (signals.py), then queues every tier in the cache, so its cost
in Prometheus queries does not grow with the number of tiers. When
`spec.replicas.count` is set (an HPA or KEDA drives the scale subresource),
the tick stands aside for that tier's replicas; power control still runs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from dataclasses import replace
from datetime import UTC, datetime

from pydantic import ValidationError

from . import children as ch
from .agent.protocol import desired_key
from .api import ModelTierSpec
from .cache import Cache, Key
from .controller import Conflict, Controller
from .energy import CpuPowerModel, EnergyMetrics
from .kube import ApiError, Kube
from .metrics import Metrics
from .plan import TierMemory, TierPlan, observe, plan, tick_status
from .prometheus import PrometheusClient
from .reconcile import (
    REPLICAS_MANAGER,
    Readiness,
    desired_replicas,
    needs_apply,
    replicas_need_handover,
    tier_status,
)
from .scaling import Recommendation
from .settings import OperatorSettings
from .signals import SignalQueries, Signals, read_signals

log = logging.getLogger("terrace_operator")


class ModelTierController(Controller):
    kind = "ModelTier"

    def __init__(
        self,
        settings: OperatorSettings,
        client: Kube,
        cache: Cache,
        metrics: Metrics | None = None,
        prometheus: PrometheusClient | None = None,
    ) -> None:
        super().__init__(settings, client, cache, metrics)
        self.prometheus = prometheus
        self.energy = EnergyMetrics(self.metrics.registry)
        self.memory: dict[Key, TierMemory] = {}
        self.signals: Signals | None = None
        self.due: set[Key] = set()  # tiers whose tick has not run yet
        self.open: set[Key] = set()  # tiers of the current tick not tried yet
        self.woken: dict[Key, str] = {}
        self.invalid: dict[Key, int | None] = {}  # the spec generation found unreadable
        self._tick_started: float | None = None

    def tasks(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self._ticker(), name="terrace-control-tick")]

    # ----------------------------------------------------------------- tick

    async def _ticker(self) -> None:
        """Every interval: read the signals once, then queue every tier."""
        loop = asyncio.get_running_loop()
        interval = self.settings.control_interval_seconds
        next_at = loop.time()
        while True:
            await self.tick()
            next_at += interval
            delay = next_at - loop.time()
            if delay < 0:  # a slow tick: skip the missed slots rather than bunching up
                next_at, delay = loop.time(), 0
            await asyncio.sleep(delay)

    async def tick(self) -> None:
        if self.open:  # the last tick is still running: it counts as taking the interval
            self._tick_done()
        started = asyncio.get_running_loop().time()
        keys = self.cache.keys(self.kind)
        custom = {}
        for key in keys:
            spec = (self.cache.get(key.kind, key.namespace, key.name) or {}).get("spec") or {}
            scaling = spec.get("scaling") or {}
            if scaling.get("metric") == "custom" and scaling.get("query"):
                custom[(key.namespace, key.name)] = scaling["query"]
        if self.prometheus is not None:
            self.signals = await read_signals(
                self.prometheus,
                SignalQueries(self.settings.metrics_window, self.settings.gpu_metrics_source),
                custom,
                self.settings.carbon_intensity_query,
            )
            self.metrics.prometheus_queries.inc(self.signals.queries)
        self._tick_started = started
        self.due = set(keys)
        self.open = set(keys)
        for key in keys:
            self.queue.add(key)
        if not keys:
            self._tick_done()

    def _tick_done(self) -> None:
        """Record how long the tick took, from reading Prometheus to the last
        tier's first try (a tier whose sync failed retries outside it)."""
        self.open = set()
        if self._tick_started is not None:
            elapsed = asyncio.get_running_loop().time() - self._tick_started
            self.metrics.control_tick_seconds.observe(elapsed)
            self._tick_started = None

    # ----------------------------------------------------------------- sync

    async def sync(self, key: Key) -> None:
        try:
            await self._sync(key)
        finally:
            self._tried(key)  # succeeded or not: this tick's try of the tier is over

    async def _sync(self, key: Key) -> None:
        body = self.cache.get(key.kind, key.namespace, key.name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Gone: the garbage collector removes the children; the power
            # requests on Nodes are this controller's to withdraw.
            await self.forget(key)
            return
        owner = ch.Owner.from_body(body)
        mem = self.memory.get(key) or TierMemory(status=tick_status(body.get("status")))
        try:
            spec = ModelTierSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            # Only a CRD older or newer than the operator lets such a spec in:
            # Ready=False InvalidSpec and one Warning Event; no tick.
            problem = Readiness(False, "InvalidSpec", str(e).replace("\n", " ")[:1000])
            generation = body["metadata"].get("generation")
            if self.invalid.get(key) != generation:  # said once per spec, not every tick
                self.invalid[key] = generation
                log.warning(
                    "%s has a spec the operator cannot read (Ready InvalidSpec); nothing "
                    "is created, scaled or powered for it: %s",
                    key,
                    problem.message[:300],
                )
            await self.report_problem(body, problem)
            self.memory[key] = mem
            await self.write_status(body, self._status(body, owner, None, mem, problem))
            self._ticked(key)
            return

        self.invalid.pop(key, None)
        problem: Readiness | None = None
        failure: Exception | None = None
        deployment = None
        actions: list[tuple[str, str]] = []
        try:
            deployment = await self._ensure_runtime_deployment(body, owner, spec, actions)
            for desired in (ch.tier_service(owner, spec), ch.tier_pdb(owner, spec)):
                _, action = await self.ensure(owner, desired)
                if action:
                    actions.append((action, f"{desired['kind']} {desired['metadata']['name']}"))
        except Conflict as e:
            problem, failure = Readiness(False, "ChildConflict", str(e)), e
        except ApiError as e:
            if e.retryable:
                raise
            # A child the apiserver refuses (bad quantity, quota, RBAC): say so, retry slowly.
            problem = Readiness(False, "ChildRejected", f"{e.reason}: {e.message}"[:1000])
            failure = e
        finally:
            await self.report(body, actions)
        if problem is not None:
            await self.report_problem(body, problem)
            deployment = None

        if key in self.due:
            mem = await self._control(key, body, spec, deployment, mem)
        self.memory[key] = mem
        await self.write_status(body, self._status(body, owner, deployment, mem, problem))
        self._ticked(key)
        if failure is not None:
            raise failure

    def _ticked(self, key: Key) -> None:
        self.due.discard(key)
        self._tried(key)

    def _tried(self, key: Key) -> None:
        if key in self.open:
            self.open.discard(key)
            if not self.open:
                self._tick_done()

    def _status(
        self,
        body: dict,
        owner: ch.Owner,
        deployment: dict | None,
        mem: TierMemory,
        problem: Readiness | None,
    ) -> dict:
        status = tier_status(
            generation=owner.generation,
            conditions=(body.get("status") or {}).get("conditions"),
            deployment=deployment,
            selector=ch.selector_string(ch.tier_selector(owner.name)),
            endpoint=ch.tier_endpoint(owner.name, owner.namespace),
            problem=problem,
        )
        tick = mem.status
        status.update({k: v for k, v in tick.items() if k != "conditions"})
        status["conditions"] = status["conditions"] + list(tick.get("conditions") or [])
        return status

    async def _control(
        self, key: Key, body: dict, spec: ModelTierSpec, deployment: dict | None, mem: TierMemory
    ) -> TierMemory:
        """One control tick for this tier: read, `plan`, apply; the new memory."""
        nodes: tuple[str, ...] = ()
        if spec.device == "gpu":
            nodes = tuple(sorted(await self._pod_nodes(key.namespace, key.name)))
        annotations = {}
        for node in sorted(set(nodes) | set(mem.power_nodes)):
            found = await self._node_annotations(node)
            if found is not None:
                annotations[node] = found
        woken = self.woken.pop(key, None)
        if woken is not None:
            mem = replace(mem, woken=woken)
        current = None if deployment is None else int(deployment["spec"].get("replicas") or 0)
        ready = (
            None
            if deployment is None
            else int((deployment.get("status") or {}).get("readyReplicas") or 0)
        )
        obs = observe(
            spec,
            self.signals,
            key.namespace,
            key.name,
            nodes,
            CpuPowerModel(self.settings.cpu_watts_per_busy_core),
        )
        now = datetime.now(UTC)
        p = plan(
            spec,
            namespace=key.namespace,
            name=key.name,
            generation=body["metadata"].get("generation"),
            status=body.get("status") or {},
            current=current,
            obs=obs,
            nodes=nodes,
            annotations=annotations,
            memory=mem,
            now=now,
            refresh_after_seconds=self.settings.power_desired_ttl_seconds / 3,
            ready=ready,
        )
        await self._apply_plan(body, deployment, p)
        if obs.energy is not None:
            self.energy.record(key.namespace, key.name, obs.energy, obs.carbon_intensity)
        self.metrics.control_ticks.labels(key.namespace, key.name).inc()
        return p.memory

    async def _apply_plan(self, body: dict, deployment: dict | None, p: TierPlan) -> None:
        if p.replicas is not None and deployment is not None:
            await self._apply_replicas(deployment, p.replicas)
        for node, patch in p.annotations.items():
            await self._patch_node_annotations(node, patch)
        for reason, message, type_ in p.events:
            await self.event(body, reason, message, type_)

    # ----------------------------------------------------------------- wake

    async def wake(self, namespace: str, name: str) -> tuple[int, str]:
        """A router holds a request for this tier and none of its pods
        answers: bring a tier at zero to one replica now, without waiting for
        Prometheus and the next tick. Returns (HTTP status, message).

        Only a watched tier that scales to zero, has no external autoscaler
        and is at zero is touched; the recommendation is remembered, so the
        next tick holds the replica for the scale-down window."""
        watched = self.settings.namespaces
        if watched and namespace not in watched:
            return 404, f"namespace {namespace!r} is not watched by this operator"
        key = Key(self.kind, namespace, name)
        body = self.cache.get(self.kind, namespace, name)
        if body is None:
            return 404, f"no ModelTier {namespace}/{name}"
        try:
            spec = ModelTierSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return 409, f"ModelTier {namespace}/{name} has an invalid spec"
        if spec.replicas.min != 0 or spec.replicas.count is not None:
            return 409, f"ModelTier {namespace}/{name} does not scale to zero"
        deployment = await self.current("Deployment", namespace, name)
        if deployment is None or ch.controller_of(deployment) != ("ModelTier", name):
            return 409, f"ModelTier {namespace}/{name} has no Deployment yet"
        current = int(deployment["spec"].get("replicas") or 0)
        if current > 0:
            return 200, f"{current} replicas: awake"
        try:
            await self._apply_replicas(deployment, 1)
        except ApiError as e:
            if e.status != 409:
                raise
            # Something moved meanwhile: read it again, once.
            deployment = await self.client.get("Deployment", namespace, name)
            if deployment is None:
                return 409, f"ModelTier {namespace}/{name} has no Deployment yet"
            if int(deployment["spec"].get("replicas") or 0) > 0:
                return 200, "awake"
            await self._apply_replicas(deployment, 1)
        now = datetime.now(UTC)
        mem = self.memory.get(key) or TierMemory(status=tick_status(body.get("status")))
        self.memory[key] = replace(
            mem, history=(*(mem.history or ()), Recommendation(now.timestamp(), 1))
        )
        self.woken[key] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.event(
            body, "WakingUp", "0 -> 1: woken by the router (a request is waiting)", "Normal"
        )
        return 202, "0 -> 1: waking"

    async def forget(self, key: Key) -> None:
        """A deleted tier: withdraw its power requests from the nodes it used."""
        mem = self.memory.pop(key, None)
        self.woken.pop(key, None)
        self.invalid.pop(key, None)
        self._ticked(key)
        annotation = desired_key(key.namespace, key.name)
        for node in sorted(mem.power_nodes if mem else ()):
            try:
                await self._patch_node_annotations(node, {annotation: None})
            except Exception as exc:  # the TTL on the agent side covers a miss
                log.warning("cannot withdraw %s's power request from %s: %s", key, node, exc)

    # ------------------------------------------------------------ children

    async def _ensure_runtime_deployment(
        self, body: dict, owner: ch.Owner, spec: ModelTierSpec, actions: list[tuple[str, str]]
    ) -> dict:
        desired = ch.runtime_deployment(owner, spec, self.settings)
        current = await self.current("Deployment", owner.namespace, owner.name)
        if current is not None and not ch.is_controlled_by(current, owner.uid):
            raise Conflict(
                f"Deployment {owner.name} exists and is not controlled by this ModelTier; "
                "refusing to adopt it"
            )
        have = None if current is None else int(current.get("spec", {}).get("replicas", 1))
        want = desired_replicas(spec.replicas, have)

        if current is None:
            first = copy.deepcopy(desired)
            first["spec"]["replicas"] = want
            created = self.remember(await self.client.apply(first))
            actions.append(("Created", f"Deployment {owner.name} ({want} replicas)"))
            # Hand spec.replicas over to the replicas manager, then apply
            # without it so the main manager lets go of the field.
            await self._apply_replicas(created, want)
            return self.remember(await self.client.apply(desired))

        handover = replicas_need_handover(current)
        if want != have or handover:
            current = await self._apply_replicas(current, want)
            if want != have:
                bounds = f"bounds [{spec.replicas.min}, {spec.replicas.max}]"
                if spec.replicas.count is not None:
                    bounds += f", count {spec.replicas.count}"
                actions.append(
                    ("Scaled", f"Deployment {owner.name} from {have} to {want} replicas ({bounds})")
                )
        drifted = needs_apply(desired, current)
        if drifted or handover:
            current = self.remember(await self.client.apply(desired))
        if drifted:
            actions.append(("Updated", f"Deployment {owner.name}"))
        return current

    async def _apply_replicas(self, deployment: dict, replicas: int) -> dict:
        """Set spec.replicas under the replicas manager, only if nothing moved meanwhile.

        The one writer of a tier Deployment's replicas (bounds, the tick, the
        wake endpoint). The resourceVersion precondition turns a race with an
        autoscaler (which scales through the scale subresource) into a 409
        and a retry with fresh data, instead of silently undoing its decision.
        """
        meta = deployment["metadata"]
        patch = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": {"replicas": replicas},
        }
        try:
            return self.remember(await self.client.apply(patch, manager=REPLICAS_MANAGER))
        except ApiError as e:
            if e.status == 409:
                # Our copy is stale: drop it so the retry reads the live object.
                self.cache.pop(Key("Deployment", meta["namespace"], meta["name"]))
            raise

    # ---------------------------------------------------------- nodes, pods

    async def _pod_nodes(self, namespace: str, name: str) -> set[str]:
        sel = ch.selector_string(ch.tier_selector(name))
        body = await self.client.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": sel}
        )
        nodes = set()
        for pod in (body or {}).get("items", []):
            node = (pod.get("spec") or {}).get("nodeName")
            phase = (pod.get("status") or {}).get("phase")
            if node and phase not in ("Succeeded", "Failed"):
                nodes.add(node)
        return nodes

    async def _node_annotations(self, name: str) -> dict[str, str] | None:
        body = await self.client.request("GET", f"/api/v1/nodes/{name}")
        if body is None:
            return None
        return dict((body.get("metadata") or {}).get("annotations") or {})

    async def _patch_node_annotations(self, name: str, annotations: dict) -> None:
        await self.client.merge_patch(
            f"/api/v1/nodes/{name}", {"metadata": {"annotations": annotations}}
        )
