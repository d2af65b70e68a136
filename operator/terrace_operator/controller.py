"""The reconcile loop: watch events in, converged children and status out.

kopf's event handlers (handlers.py) feed `observe()`; it keeps the latest
copy of every ModelTier, TierRouter and child in memory and queues the
owning custom resource. Workers take keys off the queue and reconcile by
level: build the desired children (children.py), apply whatever differs
(server-side apply, field manager `terrace-operator`), and write status.
Running it twice changes nothing. Decisions live in reconcile.py.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from . import children as ch
from .api import API_VERSION, ModelTierSpec, TierRouterSpec
from .conditions import get_condition, now_rfc3339
from .kube import ApiError, KubeClient
from .metrics import Metrics
from .reconcile import (
    REPLICAS_MANAGER,
    Readiness,
    TierView,
    desired_replicas,
    needs_apply,
    replicas_need_handover,
    router_status,
    status_differs,
    tier_status,
)
from .settings import OperatorSettings
from .workqueue import WorkQueue

log = logging.getLogger("terrace_operator")

OWNER_KINDS = ("ModelTier", "TierRouter")
CHILD_KINDS = ("Deployment", "Service", "PodDisruptionBudget", "ConfigMap")
# Managers whose managedFields entries the cache keeps (the rest is dropped to save memory).
KEPT_MANAGERS = {ch.MANAGER, REPLICAS_MANAGER}


@dataclass(frozen=True)
class Key:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


class Conflict(Exception):
    """A child with our name exists but is not ours: refuse to adopt it."""


def _slim(obj: dict) -> dict:
    """A cache copy without other managers' managedFields (big, never read).

    Shallow on purpose: watch events and API answers are never mutated after
    they arrive, and deep copies of every Deployment were the operator's
    biggest CPU cost at a few hundred tiers.
    """
    meta = obj.get("metadata") or {}
    if "managedFields" not in meta:
        return obj
    slim = dict(obj)
    slim["metadata"] = {
        **meta,
        "managedFields": [m for m in meta["managedFields"] if m.get("manager") in KEPT_MANAGERS],
    }
    return slim


class Controller:
    def __init__(
        self, settings: OperatorSettings, client: KubeClient, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics or Metrics()
        self.queue = WorkQueue()
        self._objects: dict[Key, dict] = {}

    # ------------------------------------------------------------ events in

    def observe(self, kind: str, obj: dict, deleted: bool) -> None:
        """Record one watch event and queue whatever it affects."""
        meta = obj.get("metadata", {})
        key = Key(kind, meta.get("namespace", ""), meta.get("name", ""))
        if kind in CHILD_KINDS:
            previous = self._objects.get(key)
            owner = ch.controller_of(obj)
            if deleted or owner is None:
                self._objects.pop(key, None)
            else:
                self._objects[key] = _slim(obj)
            # Queue the owner (and the previous owner, if the reference was edited away).
            for source in (obj, previous):
                ref = ch.controller_of(source) if source else None
                if ref and ref[0] in OWNER_KINDS:
                    self.queue.add(Key(ref[0], key.namespace, ref[1]))
            return

        if deleted:
            self._objects.pop(key, None)
        else:
            self._objects[key] = _slim(obj)
            self.queue.add(key)
        if kind == "ModelTier":
            # Routers naming this tier re-render their table (appeared, gone, changed).
            for router in self.routers_naming(key.namespace, key.name):
                self.queue.add(router)

    def routers_naming(self, namespace: str, tier: str) -> list[Key]:
        found = []
        for key, obj in list(self._objects.items()):
            if key.kind != "TierRouter" or key.namespace != namespace:
                continue
            tiers = (obj.get("spec") or {}).get("tiers") or []
            if any(t.get("name") == tier for t in tiers):
                found.append(key)
        return found

    def cached(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._objects.get(Key(kind, namespace, name))

    def owners(self) -> list[Key]:
        return [k for k in self._objects if k.kind in OWNER_KINDS]

    # -------------------------------------------------------------- workers

    async def run(self) -> None:
        """Workers plus the periodic resync; runs until cancelled."""
        tasks = [asyncio.create_task(self._worker(i)) for i in range(self.settings.workers)]
        tasks.append(asyncio.create_task(self._resync()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.queue.shutdown()

    async def _resync(self) -> None:
        # Level-based safety net: everything is looked at again now and then,
        # whatever events were missed.
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            for key in self.owners():
                self.queue.add(key)

    async def _worker(self, index: int) -> None:
        while True:
            key = await self.queue.get()
            assert isinstance(key, Key)
            self.metrics.queue_depth.set(len(self.queue))
            started = time.perf_counter()
            result = "success"
            try:
                await self.reconcile(key)
                self.queue.forget(key)
            except asyncio.CancelledError:
                raise
            except Conflict as e:
                result = "conflict"
                delay = self.queue.retry(key)
                log.info("%s: %s; retrying in %.1fs", key, e, delay)
            except ApiError as e:
                result = "error"
                delay = self.queue.retry(key)
                level = logging.INFO if e.status == 409 else logging.WARNING
                log.log(level, "%s: apiserver said %s; retrying in %.1fs", key, e, delay)
            except (httpx.HTTPError, OSError) as e:
                result = "error"
                delay = self.queue.retry(key)
                log.warning("%s: %s; retrying in %.1fs", key, e, delay)
            except Exception:
                result = "error"
                delay = self.queue.retry(key)
                log.exception("%s: reconcile failed; retrying in %.1fs", key, delay)
            finally:
                self.queue.done(key)
                self.metrics.reconcile_total.labels(key.kind, result).inc()
                self.metrics.reconcile_seconds.labels(key.kind).observe(
                    time.perf_counter() - started
                )

    async def reconcile(self, key: Hashable) -> None:
        assert isinstance(key, Key)
        if key.kind == "ModelTier":
            await self.reconcile_model_tier(key)
        elif key.kind == "TierRouter":
            await self.reconcile_tier_router(key)

    # --------------------------------------------------------------- helpers

    async def _current(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object from the cache, or from the apiserver on a cache miss.

        A miss is normal right after start-up (the watch has not listed it
        yet) and after a deletion; asking keeps both cases correct.
        """
        obj = self.cached(kind, namespace, name)
        if obj is None:
            obj = await self.client.get(kind, namespace, name)
        return obj

    def _remember(self, obj: dict) -> dict:
        meta = obj["metadata"]
        key = Key(obj["kind"], meta["namespace"], meta["name"])
        self._objects[key] = _slim(obj)
        return obj

    async def _ensure(
        self, owner_body: dict, owner: ch.Owner, desired: dict
    ) -> tuple[dict, str | None]:
        """Apply `desired` if it differs from what is there; say what was done."""
        meta = desired["metadata"]
        current = await self._current(desired["kind"], meta["namespace"], meta["name"])
        if current is not None and not ch.is_controlled_by(current, owner.uid):
            raise Conflict(
                f"{desired['kind']} {meta['name']} exists and is not controlled by this "
                f"{owner.kind}; refusing to adopt it"
            )
        if not needs_apply(desired, current):
            return current, None  # type: ignore[return-value]
        applied = self._remember(await self.client.apply(desired))
        return applied, "Created" if current is None else "Updated"

    async def _event(self, body: dict, reason: str, message: str, type: str = "Normal") -> None:
        await self.client.event(body, reason, message, type, now=now_rfc3339())

    async def _write_status(self, body: dict, status: dict) -> None:
        if not status_differs(status, body.get("status")):
            return
        meta = body["metadata"]
        patch = {
            "apiVersion": API_VERSION,
            "kind": body["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"]},
            "status": status,
        }
        self._remember(await self.client.apply(patch, subresource="status"))

    async def _set_problem(self, key: Key, body: dict, problem: Readiness) -> None:
        """Report a problem that stops the reconcile, once per change."""
        previous = get_condition((body.get("status") or {}).get("conditions"), "Ready")
        if (
            previous is None
            or previous.get("reason") != problem.reason
            or previous.get("message") != problem.message
        ):
            await self._event(body, problem.reason, problem.message, "Warning")

    # ------------------------------------------------------------- ModelTier

    async def reconcile_model_tier(self, key: Key) -> None:
        body = self.cached(key.kind, key.namespace, key.name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # gone: the garbage collector removes the children
        owner = ch.Owner.from_body(body)
        selector = ch.selector_string(ch.tier_selector(owner.name))
        endpoint = ch.tier_endpoint(owner.name, owner.namespace)

        def status_with(deployment: dict | None, problem: Readiness | None = None) -> dict:
            return tier_status(
                generation=owner.generation,
                conditions=(body.get("status") or {}).get("conditions"),
                deployment=deployment,
                selector=selector,
                endpoint=endpoint,
                problem=problem,
            )

        try:
            spec = ModelTierSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            # The CRD schema should make this impossible; never crash on it.
            problem = Readiness(False, "InvalidSpec", str(e).replace("\n", " ")[:1000])
            await self._set_problem(key, body, problem)
            await self._write_status(body, status_with(None, problem))
            return

        actions: list[tuple[str, str]] = []
        try:
            deployment = await self._ensure_runtime_deployment(body, owner, spec, actions)
            for desired in (ch.tier_service(owner, spec), ch.tier_pdb(owner, spec)):
                _, action = await self._ensure(body, owner, desired)
                if action:
                    actions.append((action, f"{desired['kind']} {desired['metadata']['name']}"))
        except Conflict as e:
            problem = Readiness(False, "ChildConflict", str(e))
            await self._set_problem(key, body, problem)
            await self._write_status(body, status_with(None, problem))
            raise
        except ApiError as e:
            if e.retryable:
                raise
            # A child the apiserver refuses (bad quantity, quota, RBAC): say so, retry slowly.
            problem = Readiness(False, "ChildRejected", f"{e.reason}: {e.message}"[:1000])
            await self._set_problem(key, body, problem)
            await self._write_status(body, status_with(None, problem))
            raise
        finally:
            await self._report(body, actions)

        await self._write_status(body, status_with(deployment))

    async def _report(self, body: dict, actions: list[tuple[str, str]]) -> None:
        """One Event per reason for what a reconcile changed ("Created Deployment x, Service x")."""
        for reason in dict.fromkeys(a for a, _ in actions):
            what = ", ".join(w for a, w in actions if a == reason)
            await self._event(body, reason, f"{reason} {what}")

    async def _ensure_runtime_deployment(
        self, body: dict, owner: ch.Owner, spec: ModelTierSpec, actions: list[tuple[str, str]]
    ) -> dict:
        desired = ch.runtime_deployment(owner, spec, self.settings)
        current = await self._current("Deployment", owner.namespace, owner.name)
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
            created = self._remember(await self.client.apply(first))
            actions.append(("Created", f"Deployment {owner.name} ({want} replicas)"))
            # Hand spec.replicas over to the replicas manager, then apply
            # without it so the main manager lets go of the field.
            await self._apply_replicas(created, want)
            return self._remember(await self.client.apply(desired))

        handover = replicas_need_handover(current)
        if want != have or handover:
            current = await self._apply_replicas(current, want)
            if want != have:
                actions.append(
                    (
                        "Scaled",
                        f"Deployment {owner.name} from {have} to {want} replicas "
                        f"(bounds [{spec.replicas.min}, {spec.replicas.max}]"
                        + (
                            f", count {spec.replicas.count})"
                            if spec.replicas.count is not None
                            else ")"
                        ),
                    )
                )
        drifted = needs_apply(desired, current)
        if drifted or handover:
            current = self._remember(await self.client.apply(desired))
        if drifted:
            actions.append(("Updated", f"Deployment {owner.name}"))
        return current

    async def _apply_replicas(self, deployment: dict, replicas: int) -> dict:
        """Set spec.replicas under the replicas manager, only if nothing moved meanwhile.

        The resourceVersion precondition turns a race with the autoscaler
        (which scales through the scale subresource) into a 409 and a retry
        with fresh data, instead of silently undoing its decision.
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
            return self._remember(await self.client.apply(patch, manager=REPLICAS_MANAGER))
        except ApiError as e:
            if e.status == 409:
                # Our copy is stale: drop it so the retry reads the live object.
                self._objects.pop(Key("Deployment", meta["namespace"], meta["name"]), None)
            raise

    # ------------------------------------------------------------ TierRouter

    async def reconcile_tier_router(self, key: Key) -> None:
        body = self.cached(key.kind, key.namespace, key.name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        owner = ch.Owner.from_body(body)
        conditions = (body.get("status") or {}).get("conditions")
        try:
            spec = TierRouterSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            invalid = Readiness(False, "InvalidSpec", str(e).replace("\n", " ")[:1000])
            await self._set_problem(key, body, invalid)
            await self._write_status(
                body,
                router_status(
                    generation=owner.generation,
                    conditions=conditions,
                    tiers=[],
                    deployment=None,
                    namespace=owner.namespace,
                    endpoint="",
                    config_hash=None,
                    problem=invalid,
                ),
            )
            return

        views: list[TierView] = []
        resolved: list[ch.ResolvedTier] = []
        for ref in spec.tiers:
            tier = await self._current("ModelTier", owner.namespace, ref.name)
            tier_spec = None
            if tier is not None:
                try:
                    tier_spec = ModelTierSpec.model_validate(tier.get("spec") or {})
                except ValidationError:
                    tier_spec = None
            if tier_spec is None:
                views.append(TierView(ref.name, found=False, ready=False, endpoint=None))
                continue
            ready = get_condition((tier.get("status") or {}).get("conditions"), "Ready")  # type: ignore[union-attr]
            views.append(
                TierView(
                    ref.name,
                    found=True,
                    ready=bool(ready and ready.get("status") == "True"),
                    endpoint=ch.tier_endpoint(ref.name, owner.namespace),
                )
            )
            resolved.append(ch.ResolvedTier(ref.name, owner.namespace, tier_spec))

        config_hash = None
        problem: Readiness | None = None
        deployment = None
        actions: list[tuple[str, str]] = []
        try:
            # With no tier at all there is no table to render: keep the last one
            # (or none: the router pod waits for its ConfigMap).
            if resolved:
                config = ch.render_router_config(spec, resolved, self.settings.wake_url)
                desired_cm = ch.router_configmap(owner, config)
                config_hash = desired_cm["metadata"]["annotations"][ch.HASH_ANNOTATION]
                _, action = await self._ensure(body, owner, desired_cm)
                if action:
                    actions.append(
                        (
                            action,
                            f"ConfigMap {desired_cm['metadata']['name']} "
                            f"({len(resolved)} of {len(spec.tiers)} tiers)",
                        )
                    )
            for desired in (
                ch.router_deployment(owner, spec, self.settings),
                ch.router_service(owner, spec),
            ):
                obj, action = await self._ensure(body, owner, desired)
                if desired["kind"] == "Deployment":
                    deployment = obj
                if action:
                    actions.append((action, f"{desired['kind']} {desired['metadata']['name']}"))
        except Conflict as e:
            problem = Readiness(False, "ChildConflict", str(e))
        except ApiError as e:
            if e.retryable:
                raise
            problem = Readiness(False, "ChildRejected", f"{e.reason}: {e.message}"[:1000])
        finally:
            await self._report(body, actions)

        status = router_status(
            generation=owner.generation,
            conditions=conditions,
            tiers=views,
            deployment=deployment,
            namespace=owner.namespace,
            endpoint=ch.router_endpoint(owner, spec),
            config_hash=config_hash,
            problem=problem,
        )
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        if ready["status"] != "True" and ready["reason"] in (
            "TierNotFound",
            "ChildConflict",
            "ChildRejected",
        ):
            await self._set_problem(key, body, Readiness(False, ready["reason"], ready["message"]))
        await self._write_status(body, status)
        if problem is not None:
            raise (
                Conflict(problem.message)
                if problem.reason == "ChildConflict"
                else ApiError(422, problem.reason, problem.message)
            )
