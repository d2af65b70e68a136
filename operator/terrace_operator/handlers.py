"""kopf handlers: thin. Watch events go to the cache and the controllers' queues.

Only `@kopf.on.event` handlers are used: they neither retry nor store progress
annotations nor add finalizers on the watched objects, so kopf writes nothing
to the cluster; all writes are the controller's (server-side apply) and
deleting a custom resource is left to owner references and the garbage
collector.
"""

from __future__ import annotations

from typing import Any

import kopf

from . import children as ch
from .api import GROUP, VERSION
from .budget import BUDGET_FIELDS
from .cache import CHILD_KINDS, OWNER_KINDS, Cache, Key
from .conditions import get_condition
from .controller import Controller
from .workqueue import WorkQueue

# (group, version, plural, kind) of everything the operator watches.
WATCHED = [
    (GROUP, VERSION, "modeltiers", "ModelTier"),
    (GROUP, VERSION, "tierrouters", "TierRouter"),
    ("apps", "v1", "deployments", "Deployment"),
    ("", "v1", "services", "Service"),
    ("", "v1", "configmaps", "ConfigMap"),
    ("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
]


def login(settings: kopf.OperatorSettings, logger: Any, **kwargs: Any) -> Any:
    """In-cluster service account first, then $KUBECONFIG / ~/.kube/config."""
    info = kopf.login_with_service_account(settings=settings, logger=logger, **kwargs)
    if info is None:
        info = kopf.login_with_kubeconfig(settings=settings, logger=logger, **kwargs)
    if info is None:
        raise kopf.LoginError("no service account token and no kubeconfig to log in with")
    return info


def register(
    registry: kopf.OperatorRegistry, cache: Cache, tiers: Controller, routers: Controller
) -> None:
    """Attach the operator's handlers to `registry` (no global state)."""
    kopf.on.login(registry=registry)(login)

    queues = {"ModelTier": tiers.queue, "TierRouter": routers.queue}
    for group, version, plural, kind in WATCHED:
        _watch(registry, cache, queues, group, version, plural, kind)


def _watch(
    registry: kopf.OperatorRegistry,
    cache: Cache,
    queues: dict[str, WorkQueue],
    group: str,
    version: str,
    plural: str,
    kind: str,
) -> None:
    async def handler(**kwargs: Any) -> None:
        event = kwargs["event"]
        obj = event.get("object")
        if not isinstance(obj, dict):
            return
        for key in observe(cache, kind, obj, deleted=event.get("type") == "DELETED"):
            queues[key.kind].add(key)

    kopf.on.event(group, version, plural, id=f"observe-{plural}", registry=registry)(handler)


def _identity(obj: dict) -> tuple:
    """What a change of an owner must touch to matter to its own controller:
    not its status (which that controller writes itself)."""
    meta = obj.get("metadata") or {}
    return (
        meta.get("uid"),
        meta.get("generation"),
        meta.get("deletionTimestamp"),
        meta.get("labels"),
        meta.get("annotations"),
    )


def _tier_face(obj: dict) -> tuple:
    """What a router's table and status read from a ModelTier: its spec
    (by generation), whether it is Ready, and what the budget-following
    cut-off reads (demand, capacity, power limit; budget.py)."""
    status = obj.get("status") or {}
    ready = get_condition(status.get("conditions"), "Ready") or {}
    return (
        *_identity(obj)[:3],
        ready.get("status"),
        *(status.get(f) for f in BUDGET_FIELDS),
    )


def observe(cache: Cache, kind: str, obj: dict, deleted: bool) -> list[Key]:
    """Record one watch event in the cache; return the keys it makes stale.

    A child queues its controlling owner (and its previous one, if the
    reference was edited away). An owner queues itself unless only its
    status moved, which its own controller wrote; a ModelTier also queues
    the TierRouters naming it when its spec or readiness changed.
    """
    key = Key.of(obj, kind)
    if kind in CHILD_KINDS:
        owner = ch.controller_of(obj)
        previous = cache.pop(key) if deleted or owner is None else cache.put(key, obj)
        stale = []
        for source in (obj, previous):
            ref = ch.controller_of(source) if source else None
            if ref and ref[0] in OWNER_KINDS:
                stale.append(Key(ref[0], key.namespace, ref[1]))
        return list(dict.fromkeys(stale))

    if deleted:
        cache.pop(key)
    else:
        cache.put(key, obj)
    summary = None if deleted else (_identity(obj), _tier_face(obj))
    before = cache.watched(key, summary)
    now = summary or ((), ())
    before = before or ((), ())
    stale = []
    if deleted or before[0] != now[0]:
        stale.append(key)
    if kind == "ModelTier" and before[1] != now[1]:
        # Routers naming this tier re-render their table (appeared, gone, changed).
        stale += cache.routers_naming(key.namespace, key.name)
    return stale
