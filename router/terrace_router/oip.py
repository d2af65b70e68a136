"""Open Inference Protocol v2 (KServe): passed through to the tier serving the model.

There is no complexity routing here: a tensor request names its model, and
the tier that serves it (by tier name or `upstreamModel`, v2 tiers first)
answers. Endpoints of that tier are balanced and health-checked like any
other; a connection that cannot be made moves on to the tier's next endpoint.
Errors use the protocol's `{"error": "..."}` shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from time import monotonic, perf_counter

import aiohttp
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import policy
from .errors import RouterError
from .metrics import RouterMetrics
from .pool import Endpoint
from .proxy import read_body
from .state import RouterState, Tier
from .upstream import CONNECT, TIMEOUT, Reply, UpstreamFailure, fetch

# Headers of the binary tensor extension travel with the body.
_FORWARD_HEADERS = ("content-type", "inference-header-content-length")


class OipProxy:
    def __init__(
        self,
        current: Callable[[], RouterState],
        metrics: RouterMetrics,
        client: Callable[[], aiohttp.ClientSession | None],
        version: str,
    ) -> None:
        self.current = current
        self.metrics = metrics
        self.client = client
        self.version = version

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": "terrace-router", "version": self.version, "extensions": []})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def model(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}][/ready] and POST .../infer."""
        state = self.current()
        t0 = perf_counter()
        name = request.path_params["name"]
        tier = None
        try:
            state.keys.check(request.headers.get("authorization"))
            tier = state.v2_models.get(name)
            if tier is None:
                raise RouterError(404, f"Model '{name}' is not served by this router.")
            upstream_name = tier.upstream_model or name
            # Same path upstream, with the model renamed to what the tier calls it.
            suffix = request.url.path.split("/models/", 1)[1][len(name) :]
            path = f"/v2/models/{upstream_name}{suffix}"
            body = None
            headers = {}
            if request.method == "POST":
                body = await read_body(request, state.max_body_bytes)
                headers = {h: v for h in _FORWARD_HEADERS if (v := request.headers.get(h))}
            resp = await self._send(tier, request.method, path, body, headers)
        except RouterError as err:
            self.metrics.observe_request(tier.name if tier else "none", err.status, None)
            return err.v2_response()
        out_headers = {"x-terrace-tier": tier.name}
        for h in _FORWARD_HEADERS:
            if (v := resp.headers.get(h)) is not None:
                out_headers[h] = v
        if request.method == "POST":
            self.metrics.observe_request(tier.name, resp.status, perf_counter() - t0)
            if resp.status < 300 and tier.index >= 0:
                state.share.record(tier.index)
        return Response(resp.body, status_code=resp.status, headers=out_headers)

    async def _send(
        self, tier: Tier, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> Reply:
        client = self.client()
        assert client is not None
        pool = tier.pool
        tried: set[Endpoint] = set()
        while True:
            ep = pool.pick(monotonic(), tried)
            if isinstance(ep, str):
                if ep == "overloaded":
                    raise RouterError(
                        429, f"Tier '{tier.name}' is at its in-flight limit.", retry_after=1
                    )
                wait = pool.seconds_until_available(monotonic())
                raise RouterError(
                    503,
                    f"No endpoint of tier '{tier.name}' is reachable.",
                    retry_after=policy.retry_after_seconds(wait),
                )
            ep.inflight += 1
            try:
                resp = await fetch(client, method, ep.base + path, body, headers, tier.timeout)
            except UpstreamFailure as failure:
                pool.failed(ep, monotonic())
                if failure.kind is CONNECT:
                    tried.add(ep)
                    continue
                if failure.kind is TIMEOUT:
                    raise RouterError(504, f"Tier '{tier.name}' timed out.") from None
                raise RouterError(502, f"Tier '{tier.name}' failed.") from None
            finally:
                ep.inflight -= 1
            if resp.status >= 500:
                pool.failed(ep, monotonic())
            else:
                pool.succeeded(ep)
            return resp


def ready_response(ready: bool) -> Response:
    return Response(
        json.dumps({"ready": ready}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )
