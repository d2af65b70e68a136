"""The ASGI app of one runtime process: `create_app(settings)`.

The model loads in the background after startup, so /v2/health/live answers
at once and /v2/health/ready turns true only once the model is loaded and
warmed up (or explains why it is not). GET /openapi.json describes the API.

Errors outside the handlers (no route 404, wrong method 405, an unexpected
exception 500) speak the protocol of their path: OpenAI's envelope under
/v1, `{"error": "<message>"}` elsewhere (OIP v2's shape). Never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import oip, openai_api, openapi
from .http import json_response, state_of
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


def _error(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None
) -> Response:
    """An error in the protocol of the request's path."""
    path = request.url.path
    if path == "/v1" or path.startswith("/v1/"):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return json_response(openai_api.error_envelope(message, kind), status, headers)
    return json_response({"error": message}, status, headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers: no route (404), wrong method (405, with Allow)."""
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"Invalid URL ({where})"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow")
        message = f"Method not allowed ({where}); allowed: {allowed}"
    else:
        message = f"{exc.detail} ({where})"
    return _error(request, exc.status_code, message, dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    # Never a stack trace to the client; the log has it.
    return _error(request, 500, "internal server error")


def create_app(settings: ServeSettings, state: RuntimeState | None = None) -> Starlette:
    runtime = state or RuntimeState.from_settings(settings)
    api_document = openapi.document(settings)

    async def openapi_json(request: Request) -> Response:
        return json_response(api_document)

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
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, 500: server_error},
    )
    app.state.runtime = runtime
    return app
