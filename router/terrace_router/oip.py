"""Open Inference Protocol v2 (KServe): passed to the tier serving the model.

A tensor request names its model, and the tier that serves it (by tier name
or `upstreamModel`, v2 tiers first) answers: the decision is pinned (see
`policy.decide_pinned`), so a v2 request never escalates to another tier: a
different model would not take the same tensors. Within the tier it uses the
one attempt path (`attempts.py`): endpoints balanced and health-checked,
another endpoint only when the request never went out. Errors use the
protocol's `{"error": "..."}` shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from time import perf_counter

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import policy, upstream
from .attempts import MALFORMED, SOUND, Exchange, Outgoing, attempt
from .disconnect import ClientGone, unless_gone
from .errors import RouterError
from .metrics import RouterMetrics
from .proxy import CLIENT_CLOSED, authorize, read_body
from .state import RouterState, Tier
from .upstream import Head

# Headers of the binary tensor extension travel with the body.
_FORWARD_HEADERS = ("content-type", "inference-header-content-length")


class V2Exchange(Exchange):
    """A v2 request: the same bytes, on the same path, with the model named
    as the tier calls it."""

    def __init__(
        self,
        state: RouterState,
        tier: Tier,
        *,
        method: str,
        suffix: str,
        body: bytes | None,
        headers: dict[str, str],
        t0: float,
    ) -> None:
        decision = policy.decide_pinned(state.tiers.index(tier), "v2 model")
        super().__init__(state, state.tiers, decision, stream=False, t0=t0)
        self.method = method
        self.suffix = suffix  # what follows the model name in the path
        self.body = body
        self.headers = headers

    def outgoing(self, tier: Tier, check: bool) -> Outgoing:
        name = tier.upstream_model or tier.name
        return Outgoing(self.method, f"/v2/models/{name}{self.suffix}", self.body, self.headers)

    def judge(
        self, tier: Tier, head: Head, body: bytes, out: Outgoing, check: bool
    ) -> tuple[str, bytes]:
        """A JSON answer must parse (binary tensor answers are passed as they are)."""
        binary = "inference-header-content-length" in head.headers
        if not binary and head.headers.get("content-type", "").startswith("application/json"):
            try:
                json.loads(body)
            except (ValueError, RecursionError):
                return MALFORMED, body
        return SOUND, body


class OipProxy:
    def __init__(
        self,
        current: Callable[[], RouterState],
        metrics: RouterMetrics,
        client: Callable[[], upstream.Session | None],
        version: str,
    ) -> None:
        self.current = current
        self.metrics = metrics
        self.client = client
        self.version = version

    async def server_metadata(self, request: Request) -> Response:
        # Binary tensor bodies and their header are forwarded as they come.
        return JSONResponse(
            {
                "name": "terrace-router",
                "version": self.version,
                "extensions": ["binary_tensor_data"],
            }
        )

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def model(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{version}][/ready] and POST .../infer."""
        state = self.current()
        t0 = perf_counter()
        name = request.path_params["name"]
        tier = None
        post = request.method == "POST"
        try:
            await authorize(state, request)
            tier = state.v2_models.get(name)
            if tier is None:
                if post:
                    await read_body(request, state.max_body_bytes)
                raise RouterError(404, f"Model '{name}' is not served by this router.")
            body = None
            headers = {}
            if post:
                body = await read_body(request, state.max_body_bytes)
                headers = {h: v for h in _FORWARD_HEADERS if (v := request.headers.get(h))}
            suffix = request.url.path.split("/models/", 1)[1][len(name) :]
            x = V2Exchange(
                state, tier, method=request.method, suffix=suffix, body=body, headers=headers, t0=t0
            )
            if post:
                self.metrics.chose(tier.name)
            client = self.client()
            assert client is not None
            answer = await unless_gone(request.receive, attempt(x, client, self.metrics))
        except RouterError as err:
            self.metrics.observe_request(tier.name if tier else "none", err.status, None)
            return err.v2_response()
        except ClientGone:
            self.metrics.observe_request(tier.name if tier else "none", CLIENT_CLOSED, None)
            return Response(status_code=CLIENT_CLOSED)
        out_headers = {"x-terrace-tier": answer.tier.name}
        for h in _FORWARD_HEADERS:
            if (v := answer.headers.get(h)) is not None:
                out_headers[h] = v
        if post:
            self.metrics.observe_request(answer.tier.name, answer.status, perf_counter() - t0)
            if answer.status < 300 and answer.tier.index >= 0:
                state.share.record(answer.tier.index)
        return Response(answer.body, status_code=answer.status, headers=out_headers)


def ready_response(ready: bool) -> Response:
    return Response(
        json.dumps({"ready": ready}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )
