"""kopf handlers: thin. Watch events go to the controller's queue, nothing more.

Only `@kopf.on.event` handlers are used: they neither retry nor store progress
annotations nor add finalizers on the watched objects, so kopf writes nothing
to the cluster; all writes are the controller's (server-side apply) and
deleting a custom resource is left to owner references and the garbage
collector.
"""

from __future__ import annotations

from typing import Any

import kopf

from .api import GROUP, VERSION
from .controller import Controller
from .kube import Credentials

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


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Attach the operator's handlers to `registry` (no global state)."""

    @kopf.on.login(registry=registry)
    def _login(settings: kopf.OperatorSettings, logger: Any, **kwargs: Any) -> Any:
        info = login(settings=settings, logger=logger, **kwargs)
        controller.client.configure(Credentials.from_kopf(info))
        return info

    for group, version, plural, kind in WATCHED:
        _watch(registry, controller, group, version, plural, kind)


def _watch(
    registry: kopf.OperatorRegistry,
    controller: Controller,
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
        controller.observe(kind, obj, deleted=event.get("type") == "DELETED")

    kopf.on.event(group, version, plural, id=f"observe-{plural}", registry=registry)(handler)
