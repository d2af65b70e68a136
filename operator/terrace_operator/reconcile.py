"""Pure decisions of the reconcile: compare desired with observed, say what to do.

tiers.py and routers.py read the cluster and apply; everything they decide comes
from here, as plain functions over plain dicts, tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import Replicas
from .budget import Share
from .children import HASH_ANNOTATION, MANAGER
from .conditions import set_condition

# Field manager that owns a tier Deployment's spec.replicas after creation.
# The main manager leaves replicas out of its applies, so the autoscaler
# (which patches the scale subresource) is never undone by a reconcile.
REPLICAS_MANAGER = "terrace-operator-replicas"


def desired_replicas(bounds: Replicas, current: int | None) -> int:
    """Replicas the tier's Deployment should have.

    A new Deployment starts at replicas.min. After that the operator only
    clamps what is there into [min, max], so edits of min or max take effect
    and the autoscaler's choices inside the bounds stand. When replicas.count
    is set (the scale subresource, driven by kubectl scale, HPA or KEDA) it
    is the count, clamped.
    """
    if bounds.count is not None:
        return bounds.clamp(bounds.count)
    if current is None:
        return bounds.min
    return bounds.clamp(current)


def owns_field(obj: dict, manager: str, operation: str, *path: str) -> bool:
    """Whether `manager` holds `path` (e.g. "spec", "replicas") in obj's managedFields."""
    for entry in obj.get("metadata", {}).get("managedFields") or []:
        if entry.get("manager") != manager or entry.get("operation") != operation:
            continue
        node = entry.get("fieldsV1") or {}
        for part in path:
            node = node.get(f"f:{part}")
            if node is None:
                break
        else:
            return True
    return False


def replicas_need_handover(deployment: dict) -> bool:
    """The main manager still owns spec.replicas (right after creation).

    Left like that, the next apply without replicas would drop the field and
    the Deployment would fall back to 1 replica; the replicas manager must
    co-own it first.
    """
    return owns_field(deployment, MANAGER, "Apply", "spec", "replicas")


def is_subset(desired: object, actual: object) -> bool:
    """Every value in `desired` is present and equal in `actual`.

    Lists must match in length and element-wise. Extra keys in `actual`
    (defaults the apiserver filled in, fields others own) are ignored.
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        return all(k in actual and is_subset(v, actual[k]) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(desired) != len(actual):
            return False
        return all(is_subset(d, a) for d, a in zip(desired, actual, strict=True))
    return desired == actual


def needs_apply(desired: dict, actual: dict | None) -> bool:
    """Whether applying `desired` would change anything.

    The digest annotation catches spec changes that only remove fields (which
    a subset test cannot see); the subset test catches hand edits and deletions.
    """
    if actual is None:
        return True
    want = desired["metadata"].get("annotations", {}).get(HASH_ANNOTATION)
    have = (actual.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return want != have or not is_subset(desired, actual)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str
    message: str


def deployment_readiness(deployment: dict | None, what: str = "pods") -> Readiness:
    """Is a Deployment rolled out, with every desired pod ready?"""
    if deployment is None:
        return Readiness(False, "DeploymentMissing", "the Deployment does not exist yet")
    meta = deployment.get("metadata", {})
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    want = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration", 0)) < int(meta.get("generation", 0)):
        return Readiness(
            False, "Progressing", "the Deployment controller has not seen the latest spec"
        )
    total = int(status.get("replicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    if want == 0:
        if total == 0:
            return Readiness(True, "ScaledToZero", "scaled to zero replicas")
        return Readiness(False, "Progressing", f"scaling down to zero: {total} {what} left")
    if updated < want or total > want:
        return Readiness(
            False, "Progressing", f"rolling out: {updated}/{want} {what} updated, {total} running"
        )
    if ready < want or available < want:
        return Readiness(False, "PodsNotReady", f"{ready}/{want} {what} ready")
    return Readiness(True, "Available", f"{ready}/{want} {what} ready")


def tier_status(
    *,
    generation: int,
    conditions: list[dict] | None,
    deployment: dict | None,
    selector: str,
    endpoint: str,
    problem: Readiness | None = None,
    now: str | None = None,
) -> dict:
    """The status fields the operator core owns on a ModelTier.

    `problem` (a child the operator may not touch, an invalid spec) wins over
    what the Deployment says.
    """
    readiness = problem or deployment_readiness(deployment)
    dep_status = (deployment or {}).get("status") or {}
    ready_condition = _own_conditions(conditions, [("Ready", readiness)], generation, now)
    return {
        "observedGeneration": generation,
        "replicas": int(dep_status.get("replicas", 0)),
        "readyReplicas": int(dep_status.get("readyReplicas", 0)),
        "selector": selector,
        "endpoint": endpoint,
        "conditions": ready_condition,
    }


@dataclass(frozen=True)
class TierView:
    """What a TierRouter knows about one of its tiers."""

    name: str
    found: bool
    ready: bool
    endpoint: str | None


def router_readiness(tiers: list[TierView], deployment: dict | None, namespace: str) -> Readiness:
    missing = [t.name for t in tiers if not t.found]
    if missing:
        names = ", ".join(f'"{n}"' for n in missing)
        noun = "ModelTier" if len(missing) == 1 else "ModelTiers"
        verb = "does" if len(missing) == 1 else "do"
        return Readiness(
            False, "TierNotFound", f"{noun} {names} {verb} not exist in namespace {namespace}"
        )
    return deployment_readiness(deployment, what="router pods")


def tiers_readiness(tiers: list[TierView]) -> Readiness:
    waiting = [t.name for t in tiers if t.found and not t.ready]
    if waiting:
        return Readiness(False, "TiersNotReady", "not ready: " + ", ".join(waiting))
    if any(not t.found for t in tiers):
        return Readiness(False, "TierNotFound", "some tiers do not exist")
    return Readiness(True, "AllTiersReady", f"{len(tiers)} of {len(tiers)} tiers ready")


def router_status(
    *,
    generation: int,
    conditions: list[dict] | None,
    tiers: list[TierView],
    deployment: dict | None,
    namespace: str,
    endpoint: str,
    config_hash: str | None,
    problem: Readiness | None = None,
    now: str | None = None,
    share: Share | None = None,
) -> dict:
    """A TierRouter's whole status. `share`: the budget-following cut-off
    (budget.py), shown as effectiveLargeSharePercent and the
    LargeShareReduced condition."""
    ready = problem or router_readiness(tiers, deployment, namespace)
    mine = [("Ready", ready), ("TiersReady", tiers_readiness(tiers))]
    if share is not None:
        reduced = share.reason in ("PowerCapped", "Saturated")
        mine.append(("LargeShareReduced", Readiness(reduced, share.reason, share.message)))
    dep_status = (deployment or {}).get("status") or {}
    status = {
        "observedGeneration": generation,
        "replicas": int(dep_status.get("replicas", 0)),
        "readyReplicas": int(dep_status.get("readyReplicas", 0)),
        "endpoint": endpoint,
        "tierCount": len(tiers),
        "tiers": [
            {"name": t.name, "endpoint": t.endpoint or "", "found": t.found, "ready": t.ready}
            for t in tiers
        ],
        "conditions": _own_conditions(conditions, mine, generation, now),
    }
    if config_hash:
        status["configHash"] = config_hash
    if share is not None:
        status["effectiveLargeSharePercent"] = share.percent
    return status


def _own_conditions(
    current: list[dict] | None,
    mine: list[tuple[str, Readiness]],
    generation: int,
    now: str | None,
) -> list[dict]:
    """Only the conditions this writer owns, with transition times carried over."""
    merged = list(current or [])
    for type_, r in mine:
        merged = set_condition(
            merged, type_, "True" if r.ready else "False", r.reason, r.message, generation, now
        )
    wanted = {t for t, _ in mine}
    return [c for c in merged if c["type"] in wanted]


def status_differs(desired: dict, current: dict | None) -> bool:
    """Whether writing `desired` (the writer's whole status) would change `current`.

    Conditions are compared by type, ignoring lastTransitionTime (which
    set_condition already carried over when nothing flipped); a field or a
    condition `current` has and `desired` drops is a change too.
    """
    current = current or {}
    if set(current) - set(desired):
        return True
    for key, value in desired.items():
        if key == "conditions":
            have = {c.get("type"): c for c in current.get("conditions") or []}
            if set(have) - {c["type"] for c in value}:
                return True
            for c in value:
                h = have.get(c["type"])
                if h is None or any(
                    h.get(k) != c.get(k)
                    for k in ("status", "reason", "message", "observedGeneration")
                ):
                    return True
        elif current.get(key) != value:
            return True
    return False
