"""A small async Kubernetes API client: get, server-side apply, events.

kopf watches; this client writes. It is one shared httpx.AsyncClient per
process, configured from the same credentials kopf logs in with (kopf's
login handlers), and re-reads them when the apiserver answers 401 (rotated
service-account tokens).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"

# kind -> (API prefix, plural). Only what the operator touches.
RESOURCES: dict[str, tuple[str, str]] = {
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
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


@dataclass(frozen=True)
class Credentials:
    """Where and how to reach the apiserver (mirrors kopf's ConnectionInfo)."""

    server: str
    ca_path: str | None = None
    ca_data: str | None = None  # PEM text
    insecure: bool = False
    token: str | None = None
    scheme: str | None = None
    cert_path: str | None = None
    key_path: str | None = None

    @classmethod
    def from_kopf(cls, info: Any) -> Credentials:
        """Translate kopf's ConnectionInfo (data fields are base64, paths are paths)."""

        def pem(data: str | bytes | None) -> str | None:
            if data is None:
                return None
            raw = data if isinstance(data, bytes) else data.encode()
            try:
                decoded = base64.b64decode(raw, validate=True)
            except ValueError:
                decoded = raw  # already PEM
            return decoded.decode()

        cert_path = _path(info.certificate_path)
        key_path = _path(info.private_key_path)
        # ssl wants files for client certificates; kubeconfigs often inline them.
        if info.certificate_data:
            cert_path = _private_file("cert", pem(info.certificate_data) or "")
        if info.private_key_data:
            key_path = _private_file("key", pem(info.private_key_data) or "")
        return cls(
            server=info.server,
            ca_path=_path(info.ca_path),
            ca_data=pem(info.ca_data),
            insecure=bool(info.insecure),
            token=info.token,
            scheme=info.scheme,
            cert_path=cert_path,
            key_path=key_path,
        )


def _path(p: Any) -> str | None:
    return os.fsdecode(p) if p else None


def _private_file(kind: str, content: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"terrace-operator-{kind}-", suffix=".pem")
    with os.fdopen(fd, "w") as f:
        f.write(content)
    return path


def _ssl_context(c: Credentials) -> ssl.SSLContext | bool:
    if c.insecure:
        return False
    ctx = ssl.create_default_context(cafile=c.ca_path, cadata=c.ca_data)
    if c.cert_path:
        ctx.load_cert_chain(c.cert_path, c.key_path)
    return ctx


class KubeClient:
    """Async apiserver access for the reconcile: one pooled client per process."""

    def __init__(
        self,
        field_manager: str,
        timeout: float = 30.0,
        relogin: Callable[[], Any] | None = None,
    ) -> None:
        self.field_manager = field_manager
        self.timeout = timeout
        self._relogin = relogin
        self._client: httpx.AsyncClient | None = None
        self._ready = asyncio.Event()
        self._lock = asyncio.Lock()

    def configure(self, creds: Credentials) -> None:
        """Use these credentials from now on (called from kopf's login handler)."""
        old = self._client
        headers = {"Accept": "application/json", "User-Agent": "terrace-operator"}
        if creds.token:
            headers["Authorization"] = f"{creds.scheme or 'Bearer'} {creds.token}"
        self._client = httpx.AsyncClient(
            base_url=creds.server,
            verify=_ssl_context(creds),
            headers=headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        self._ready.set()
        if old is not None:
            # Requests in flight keep the old client; close it once they are done.
            asyncio.get_running_loop().call_later(60, lambda: asyncio.ensure_future(old.aclose()))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        await self._ready.wait()
        assert self._client is not None
        response = await self._client.request(method, path, **kwargs)
        if response.status_code == 401 and self._relogin is not None:
            # Tokens rotate; fetch fresh credentials once and retry this call.
            async with self._lock:
                creds = await asyncio.to_thread(self._relogin)
                if creds is not None:
                    self.configure(creds)
            response = await self._client.request(method, path, **kwargs)
        return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            body = response.json()
            reason, message = body.get("reason", ""), body.get("message", response.text)
        except ValueError:
            reason, message = response.reason_phrase, response.text
        raise ApiError(response.status_code, reason or response.reason_phrase, message)

    async def request(self, method: str, path: str, **kwargs: Any) -> dict | None:
        """Any API call by path: the JSON answer, None for 404, ApiError otherwise."""
        response = await self._request(method, path, **kwargs)
        if response.status_code == 404:
            return None
        self._raise(response)
        return response.json()

    async def get(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object, or None when it does not exist."""
        response = await self._request("GET", path_for(kind, namespace, name))
        if response.status_code == 404:
            return None
        self._raise(response)
        return response.json()

    async def apply(
        self,
        obj: dict,
        *,
        subresource: str | None = None,
        manager: str | None = None,
        force: bool = True,
    ) -> dict:
        """Server-side apply `obj` (its apiVersion/kind/metadata name and namespace).

        force=True takes fields back from other managers (hand edits), which
        is what drift correction means. A metadata.resourceVersion in `obj`
        is a precondition: the apply fails with 409 if the object moved on.
        """
        meta = obj["metadata"]
        response = await self._request(
            "PATCH",
            path_for(obj["kind"], meta["namespace"], meta["name"], subresource),
            params={"fieldManager": manager or self.field_manager, "force": str(force).lower()},
            content=json.dumps(obj),
            headers={"Content-Type": APPLY_CONTENT_TYPE},
        )
        self._raise(response)
        return response.json()

    async def event(
        self,
        involved: dict,
        reason: str,
        message: str,
        type: str = "Normal",
        *,
        now: str,
    ) -> None:
        """Record a Kubernetes Event about `involved`; failures are only logged."""
        meta = involved["metadata"]
        event = {
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
            response = await self._request(
                "POST",
                path_for("Event", meta["namespace"]),
                content=json.dumps(event),
                headers={"Content-Type": "application/json"},
            )
            self._raise(response)
        except (ApiError, httpx.HTTPError) as e:
            log.warning(
                "could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e
            )
