"""The operator's one way to the Kubernetes API: the `Kube` interface, and
`KubeClient`, its implementation on the official `kubernetes` client.

kopf watches; everything the operator writes or reads outside the watch
(server-side apply, merge patches, Events, the leader Lease, a tier's pods,
a Node's annotations) goes through `Kube`. The controllers take any `Kube`,
so their unit tests pass a recording fake; the real one runs against the real
API server in tests/integration.

Why the official client: it is the library the power agent and the dev
tools already use, so the project has one Kubernetes library; it loads
credentials the way kopf does (in-cluster service account, then
`$KUBECONFIG` / `~/.kube/config`), and refreshes a rotated service-account
token by itself. Its calls block, so `KubeClient` runs them on a small
thread pool of its own (urllib3 keeps one connection per thread) and parses
the JSON itself: the operator works on plain dicts, never on the client's
generated model classes, which also keeps fields of newer API versions that
the models do not know.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import urllib3
from kubernetes import client, config

log = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE = "application/merge-patch+json"

# kind -> (API prefix, plural). Only what the operator touches.
RESOURCES: dict[str, tuple[str, str]] = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "Event": ("/api/v1", "events"),
    "ModelTier": ("/apis/terrace.dev/v1alpha1", "modeltiers"),
    "TierRouter": ("/apis/terrace.dev/v1alpha1", "tierrouters"),
}


def path_for(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class ApiError(Exception):
    """A non-2xx answer from the apiserver, with its Status reason and message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        """Conflicts, throttling and server errors pass; other 4xx need a change first."""
        return self.status in (409, 429) or self.status >= 500


class Kube(Protocol):
    """What the operator asks of the API server. Objects are plain dicts;
    every method raises `ApiError` for an answer other than 2xx (and 404
    where it returns None), `OSError` when the server cannot be reached."""

    field_manager: str

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content_type: str = "application/json",
    ) -> dict | None:
        """Any call by path: the JSON answer; None for 404."""
        ...

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object of a kind in `RESOURCES`; None when it does not exist."""
        ...

    async def apply(
        self,
        obj: dict,
        *,
        subresource: str | None = None,
        manager: str | None = None,
        force: bool = True,
    ) -> dict:
        """Server-side apply of `obj`; the object as the server now has it."""
        ...

    async def merge_patch(self, path: str, patch: dict) -> dict | None:
        """A JSON merge patch (RFC 7386) by path; None for 404."""
        ...

    async def event(
        self, involved: dict, reason: str, message: str, type: str = "Normal", *, now: str
    ) -> None:
        """Record an Event about `involved`; a failure is logged, never raised."""
        ...


def load_configuration() -> client.Configuration:
    """In-cluster service account first, then `$KUBECONFIG` / ~/.kube/config
    (kopf's order). ConfigException when there is neither."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return cfg


class KubeClient:
    """`Kube` on the official client: one connection pool and one small
    thread pool per process; close it on shutdown."""

    def __init__(
        self,
        field_manager: str,
        timeout: float = 30.0,
        configuration: client.Configuration | None = None,
        threads: int = 16,
    ) -> None:
        self.field_manager = field_manager
        self.timeout = timeout
        cfg = configuration or load_configuration()
        cfg.connection_pool_maxsize = threads
        self._api = client.ApiClient(cfg)
        self._api.user_agent = f"terrace.dev/{field_manager}"
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kube")

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()

    def _call(
        self, method: str, path: str, params: Mapping[str, str] | None, body: Any, ctype: str
    ) -> dict | None:
        api = self._api
        _, url, headers, serialized, _ = api.param_serialize(
            method,
            path,
            query_params=list((params or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": ctype},
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = api.call_api(
                method, url, header_params=headers, body=serialized, _request_timeout=self.timeout
            )
            data = response.read()
        except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out
            raise ConnectionError(f"{method} {path}: {e}") from e
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise _error(response.status, response.reason, data)
        return json.loads(data) if data else {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        content_type: str = "application/json",
    ) -> dict | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, self._call, method, path, params, json, content_type
        )

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return await self.request("GET", path_for(kind, namespace, name))

    async def apply(
        self,
        obj: dict,
        *,
        subresource: str | None = None,
        manager: str | None = None,
        force: bool = True,
    ) -> dict:
        """force=True takes fields back from other managers (hand edits), which
        is what drift correction means. A metadata.resourceVersion in `obj`
        is a precondition: the apply fails with 409 if the object moved on."""
        meta = obj["metadata"]
        path = path_for(obj["kind"], meta["namespace"], meta["name"], subresource)
        params = {"fieldManager": manager or self.field_manager, "force": str(force).lower()}
        out = await self.request(
            "PATCH", path, params=params, json=obj, content_type=APPLY_CONTENT_TYPE
        )
        if out is None:
            raise ApiError(404, "NotFound", f"{path} does not exist")
        return out

    async def merge_patch(self, path: str, patch: dict) -> dict | None:
        return await self.request(
            "PATCH",
            path,
            params={"fieldManager": self.field_manager},
            json=patch,
            content_type=MERGE_CONTENT_TYPE,
        )

    async def event(
        self, involved: dict, reason: str, message: str, type: str = "Normal", *, now: str
    ) -> None:
        meta = involved["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": involved["apiVersion"],
                "kind": involved["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type,
            "source": {"component": self.field_manager},
            "reportingComponent": f"terrace.dev/{self.field_manager}",
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.request("POST", path_for("Event", meta["namespace"]), json=body)
        except (ApiError, OSError) as e:
            log.warning(
                "could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e
            )


def _error(status: int, phrase: str | None, data: bytes | None) -> ApiError:
    """An ApiError from a non-2xx answer, with the Status object's reason and message."""
    text = (data or b"").decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return ApiError(status, body.get("reason") or phrase or "", body.get("message") or text)
    return ApiError(status, phrase or "", text)
