"""The ASGI app of one runtime process: `create_app(settings)`.

The model loads in the background after startup, so /v2/health/live answers
at once and /v2/health/ready turns true only once the model is loaded and
warmed up (or explains why it is not).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import oip, openai_api
from .http import state_of
from .settings import ServeSettings
from .state import RuntimeState


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = state_of(request)
    if state.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": state.status, "reason": state.reason}, status_code=503)


async def not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"error": f"no route for {request.method} {request.url.path}"},
        status_code=getattr(exc, "status_code", 404),
    )


async def server_error(request: Request, exc: Exception) -> Response:
    # Never a stack trace to the client; the log has it.
    return JSONResponse({"error": "internal server error"}, status_code=500)


def create_app(settings: ServeSettings, state: RuntimeState | None = None) -> Starlette:
    runtime = state or RuntimeState.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(runtime.load(), name="model-loader")
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            await runtime.close()

    app = Starlette(
        routes=[
            *oip.routes(),
            *openai_api.routes(),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found, 500: server_error},
    )
    app.state.runtime = runtime
    return app
