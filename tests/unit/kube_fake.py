"""A recording stand-in for `terrace_operator.kube.Kube`, for unit tests of
the controllers: it keeps objects by API path, applies server-side-apply
bodies as a merge (enough for the controllers' reads back), honours a
resourceVersion precondition with a 409, and records every write and Event.
The real API server's behaviour is tested in tests/integration."""

from __future__ import annotations

import copy
from typing import Any

from terrace_operator.kube import ApiError, path_for


def merged(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class RecordingKube:
    field_manager = "terrace-operator"

    def __init__(self) -> None:
        self.objects: dict[str, dict] = {}
        self.writes: list[tuple[str, str, str | None]] = []  # (verb, path, field manager)
        self.events: list[tuple[str, str, str, str]] = []  # (object, reason, message, type)
        self.version = 0

    def put(self, path: str, obj: dict) -> dict:
        self.version += 1
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.version)
        meta.setdefault("uid", f"uid-{self.version}")
        meta.setdefault("generation", 1)
        self.objects[path] = obj
        return copy.deepcopy(obj)

    def writes_to(self, path: str) -> list[tuple[str, str, str | None]]:
        return [w for w in self.writes if w[1] == path]

    async def request(self, method, path, *, params=None, json=None, content_type=""):
        if method == "GET":
            if path in self.objects:
                return copy.deepcopy(self.objects[path])
            items = [o for p, o in self.objects.items() if p.rsplit("/", 1)[0] == path]
            return {"items": copy.deepcopy(items)} if items else None
        raise AssertionError(f"unexpected {method} {path}")

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return await self.request("GET", path_for(kind, namespace, name))

    async def apply(self, obj, *, subresource=None, manager=None, force=True) -> dict:
        meta = obj["metadata"]
        path = path_for(obj["kind"], meta["namespace"], meta["name"])
        self.writes.append(("apply" + (f"/{subresource}" if subresource else ""), path,
                            manager or self.field_manager))  # fmt: skip
        current = self.objects.get(path)
        want = meta.get("resourceVersion")
        if want is not None and (current is None or current["metadata"]["resourceVersion"] != want):
            raise ApiError(409, "Conflict", "the object has been modified")
        body = {k: v for k, v in obj.items() if k != "metadata"}
        if subresource == "status":
            if current is None:
                raise ApiError(404, "NotFound", path)
            return self.put(path, {**current, "status": obj["status"]})
        base = current or {"metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
        out = merged(base, body)
        out["metadata"] = merged(base["metadata"],
                                 {k: v for k, v in meta.items() if k != "resourceVersion"})  # fmt: skip
        return self.put(path, out)

    async def merge_patch(self, path: str, patch: dict) -> dict | None:
        self.writes.append(("merge", path, self.field_manager))
        if path not in self.objects:
            return None
        return self.put(path, merged(self.objects[path], patch))

    async def event(self, involved, reason, message, type="Normal", *, now: str) -> None:
        meta = involved["metadata"]
        self.events.append((f"{involved['kind']} {meta['namespace']}/{meta['name']}", reason,
                            message, type))  # fmt: skip

    async def close(self) -> None:
        return None


def tier_body(name: str = "small", namespace: str = "demo", **spec: Any) -> dict:
    s = {
        "model": {"uri": f"file:///models/{name}.onnx"},
        "device": "cpu",
        "replicas": {"min": 1, "max": 3},
        **spec,
    }
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1},
        "spec": s,
    }
