"""The TierRouter controller: a router's table, its Deployment and Service, its status.

One controller owns the TierRouter kind and is the only writer of its
status. A sync renders the routing table from the ModelTiers it names (read
from the watch cache, never written: they are the ModelTier controller's)
into a ConfigMap, applies the router Deployment and Service, and writes
status (Ready, TiersReady, each tier's endpoint and readiness). A tier that
appears, goes, changes its spec or its readiness queues the routers naming
it (handlers.py).
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from . import children as ch
from .api import ModelTierSpec, TierRouterSpec
from .budget import Share, router_share
from .cache import Key
from .conditions import get_condition
from .controller import Conflict, Controller
from .kube import ApiError
from .reconcile import Readiness, TierView, router_status

log = logging.getLogger("terrace_operator")


LIMITED = ("PowerCapped", "Saturated")


class TierRouterController(Controller):
    kind = "TierRouter"

    @staticmethod
    def _share(spec: TierRouterSpec, budget: list[tuple[str, dict, int | None]]) -> Share:
        """The budget-following cut-off (budget.py) over the router's tiers'
        statuses; the target itself with classifier.followBudget false."""
        target = spec.classifier.target_large_share_percent / 100
        if not spec.classifier.follow_budget:
            return Share(target, "Target", f"target {target:.0%}: classifier.followBudget is false")
        return router_share(target, budget)

    async def _batch_children(self, owner: ch.Owner, spec: TierRouterSpec) -> list[dict]:
        """terrace-batch's Deployment, Service and (SQLite) claim with
        spec.batch; without it, an existing terrace-batch of this router is
        scaled to 0 (the operator deletes nothing; the claim keeps the store)."""
        if spec.batch is not None:
            pvc = ch.batch_pvc(owner, spec)
            return [
                *([pvc] if pvc is not None else []),
                ch.batch_deployment(owner, spec, self.settings),
                ch.batch_service(owner),
            ]
        name = ch.batch_name(owner.name)
        existing = await self.current("Deployment", owner.namespace, name)
        if existing is None or not ch.is_controlled_by(existing, owner.uid):
            return []
        return [ch.batch_deployment(owner, spec, self.settings, replicas=0)]

    async def sync(self, key: Key) -> None:
        body = self.cache.get(key.kind, key.namespace, key.name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return
        owner = ch.Owner.from_body(body)
        conditions = (body.get("status") or {}).get("conditions")
        try:
            spec = TierRouterSpec.model_validate(body.get("spec") or {})
        except ValidationError as e:
            invalid = Readiness(False, "InvalidSpec", str(e).replace("\n", " ")[:1000])
            await self.report_problem(body, invalid)
            await self.write_status(
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
        budget: list[tuple[str, dict, int | None]] = []  # what the cut-off reads
        for ref in spec.tiers:
            tier = await self.current("ModelTier", owner.namespace, ref.name)
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
            if tier_spec.model.task != "tensor":  # v2 tiers are not in the calibration
                power = tier_spec.power if tier_spec.device == "gpu" else None
                max_watts = power.max_watts if power is not None else None
                budget.append((ref.name, (tier or {}).get("status") or {}, max_watts))
        share = self._share(spec, budget)

        config_hash = None
        problem: Readiness | None = None
        deployment = None
        actions: list[tuple[str, str]] = []
        try:
            config = ch.render_router_config(
                spec,
                resolved,
                self.settings.wake_url,
                owner.namespace,
                ch.batch_url(owner) if spec.batch else None,
                share.percent / 100 if share.reason in LIMITED else None,
            )
            desired_cm = ch.router_configmap(owner, config)
            config_hash = desired_cm["metadata"]["annotations"][ch.HASH_ANNOTATION]
            _, action = await self.ensure(owner, desired_cm)
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
                *await self._batch_children(owner, spec),
            ):
                obj, action = await self.ensure(owner, desired)
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
            await self.report(body, actions)

        status = router_status(
            generation=owner.generation,
            conditions=conditions,
            tiers=views,
            deployment=deployment,
            namespace=owner.namespace,
            endpoint=ch.router_endpoint(owner, spec),
            config_hash=config_hash,
            problem=problem,
            share=share,
        )
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        if ready["status"] != "True" and ready["reason"] in (
            "TierNotFound",
            "ChildConflict",
            "ChildRejected",
        ):
            await self.report_problem(body, Readiness(False, ready["reason"], ready["message"]))
        await self.write_status(body, status)
        if problem is not None:
            raise (
                Conflict(problem.message)
                if problem.reason == "ChildConflict"
                else ApiError(422, problem.reason, problem.message)
            )
