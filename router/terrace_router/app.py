"""The router's ASGI app factory (Starlette).

`create_app(config)` or `create_app(config_path=...)` (the latter also
watches the file and reloads). The one shared upstream session (`upstream.py`)
is created in the lifespan; nothing starts at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .batch.forward import BATCH_ROUTES, forward
from .config import RouterConfig, load
from .errors import RouterError, internal, model_not_found
from .metrics import RouterMetrics
from .oip import OipProxy, ready_response
from .openapi import document
from .proxy import Proxy
from .reload import ConfigWatcher, StateHolder
from .state import RouterState
from .upstream import open_session

log = logging.getLogger(__name__)

try:
    from importlib.metadata import version as _dist_version

    VERSION = _dist_version("terrace")
except Exception:  # running from a source tree without the distribution installed
    VERSION = "0.0.0"

# A handler answers with an ASGI app: a Response, or relay.SseRelay for SSE.
Handler = Callable[[Request], Awaitable[ASGIApp]]


def _guard(fn: Handler, shape: str = "openai") -> Handler:
    """No traceback ever reaches a client: anything unexpected is a 500 in
    the protocol's error shape (and a log line with the traceback here)."""

    async def guarded(request: Request) -> ASGIApp:
        try:
            return await fn(request)
        except RouterError as err:
            return err.openai_response() if shape == "openai" else err.v2_response()
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            fallback = internal()
            return fallback.openai_response() if shape == "openai" else fallback.v2_response()

    return guarded


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods, in the shape of the protocol the path
    belongs to: OIP v2's under /v2, OpenAI's envelope elsewhere."""
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    err = RouterError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
    )
    err.extra_headers = dict(exc.headers or {})
    path = request.url.path
    return err.v2_response() if path == "/v2" or path.startswith("/v2/") else err.openai_response()


def create_app(
    config: RouterConfig | None = None,
    *,
    config_path: str | Path | None = None,
    reload_interval: float = 1.0,
) -> Starlette:
    """The router app."""
    if config is None:
        if config_path is None:
            raise ValueError("create_app needs a config or a config_path")
        config = load(config_path)
    holder = StateHolder(RouterState.build(config))
    metrics = RouterMetrics(holder)
    proxy = Proxy(holder, metrics)
    oip = OipProxy(holder, metrics, lambda: proxy.client, VERSION)
    watcher = ConfigWatcher(config_path, holder, metrics, reload_interval) if config_path else None
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One pooled keep-alive session for every upstream. Timeouts are set
        # per tier on each request (state.py).
        async with open_session() as client:
            proxy.client = client
            task = asyncio.create_task(watcher.run()) if watcher else None
            holder.ready = True
            try:
                yield
            finally:
                holder.ready = False
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                proxy.client = None

    async def chat(request: Request) -> ASGIApp:
        return await proxy.openai(request, "chat")

    async def completions(request: Request) -> ASGIApp:
        return await proxy.openai(request, "completions")

    def _model_card(model_id: str) -> dict[str, object]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "terrace"}

    async def models(request: Request) -> Response:
        state = holder.state
        state.keys.check(request.headers.get("authorization"))
        ids = [state.config.name] + (["auto"] if state.config.name != "auto" else [])
        ids += [t.name for t in state.openai_tiers]
        return JSONResponse({"object": "list", "data": [_model_card(i) for i in ids]})

    async def model(request: Request) -> Response:
        state = holder.state
        state.keys.check(request.headers.get("authorization"))
        name = request.path_params["model"]
        if name in state.auto_names or name in state.by_name:
            return JSONResponse(_model_card(name))
        raise model_not_found(name)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi = JSONResponse(document(VERSION))

    async def openapi_endpoint(request: Request) -> Response:
        return openapi

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        return ready_response(holder.ready)

    async def v2_ready(request: Request) -> Response:
        return ready_response(holder.ready)

    async def batch_api(request: Request) -> Response:
        return await forward(holder.state, proxy.client, request)

    v2_model = _guard(oip.model, "v2")
    routes = [
        *(Route(path, _guard(batch_api), methods=methods) for path, methods in BATCH_ROUTES),
        Route("/v1/chat/completions", _guard(chat), methods=["POST"]),
        Route("/v1/completions", _guard(completions), methods=["POST"]),
        Route("/v1/models", _guard(models), methods=["GET"]),
        Route("/v1/models/{model:path}", _guard(model), methods=["GET"]),
        Route("/v2", _guard(oip.server_metadata, "v2"), methods=["GET"]),
        Route("/v2/health/live", _guard(oip.live, "v2"), methods=["GET"]),
        Route("/v2/health/ready", _guard(v2_ready, "v2"), methods=["GET"]),
        Route("/v2/models/{name}", v2_model, methods=["GET"]),
        Route("/v2/models/{name}/ready", v2_model, methods=["GET"]),
        Route("/v2/models/{name}/infer", v2_model, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", v2_model, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", v2_model, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/infer", v2_model, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
    # `/v1/completions/` is an unknown path (404 in the protocol's shape), not
    # a 307 with an empty body that clients do not follow for a POST.
    app.router.redirect_slashes = False
    app.state.holder = holder
    app.state.metrics = metrics
    app.state.watcher = watcher
    return app


__all__ = ["create_app"]
