"""The operator's watch cache: the latest copy of every object it watches.

kopf's watch events (handlers.py) are written here and nowhere else; the
controllers read from here instead of asking the API server (an informer's
store, in client-go's terms). Children are kept only while a ModelTier or
TierRouter controls them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from . import children as ch
from .reconcile import REPLICAS_MANAGER

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

    @classmethod
    def of(cls, obj: dict, kind: str | None = None) -> Key:
        meta = obj.get("metadata") or {}
        return cls(kind or obj["kind"], meta.get("namespace", ""), meta.get("name", ""))


def slim(obj: dict) -> dict:
    """A cache copy without other managers' managedFields (big, never read).

    Shallow on purpose: watch events and API answers are never mutated after
    they arrive, and deep copies of every Deployment were the operator's
    biggest CPU cost at a few hundred tiers.
    """
    meta = obj.get("metadata") or {}
    if "managedFields" not in meta:
        return obj
    out = dict(obj)
    out["metadata"] = {
        **meta,
        "managedFields": [m for m in meta["managedFields"] if m.get("manager") in KEPT_MANAGERS],
    }
    return out


class Cache:
    def __init__(self) -> None:
        self._objects: dict[Key, dict] = {}
        # What the last watch event of each owner said, as a small summary.
        # Apart from the objects because a controller also stores its own
        # writes (`put`): a change is judged against the watch, not them.
        self._watched: dict[Key, tuple] = {}

    def watched(self, key: Key, summary: tuple | None) -> tuple:
        """Record the summary of `key`'s latest watch event (None: deleted);
        returns the previous one (() when there was none)."""
        previous = self._watched.pop(key, ())
        if summary is not None:
            self._watched[key] = summary
        return previous

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._objects.get(Key(kind, namespace, name))

    def put(self, key: Key, obj: dict) -> dict | None:
        """Store `obj`; returns the copy it replaced."""
        previous = self._objects.get(key)
        self._objects[key] = slim(obj)
        return previous

    def pop(self, key: Key) -> dict | None:
        return self._objects.pop(key, None)

    def keys(self, kind: str) -> list[Key]:
        return [k for k in self._objects if k.kind == kind]

    def items(self, kind: str) -> Iterator[tuple[Key, dict]]:
        for key, obj in list(self._objects.items()):
            if key.kind == kind:
                yield key, obj

    def routers_naming(self, namespace: str, tier: str) -> list[Key]:
        found = []
        for key, obj in self.items("TierRouter"):
            if key.namespace != namespace:
                continue
            tiers = (obj.get("spec") or {}).get("tiers") or []
            if any(t.get("name") == tier for t in tiers):
                found.append(key)
        return found
