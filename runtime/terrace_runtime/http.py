"""Small HTTP helpers shared by the protocol modules: JSON bodies, error
shapes, and per-endpoint request metrics (streams are timed to their end)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .state import RuntimeState

Handler = Callable[[Request], Awaitable[Response]]


try:  # orjson parses and writes tensors several times faster; optional
    import orjson

    def loads(raw: bytes) -> Any:
        return orjson.loads(raw)

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    DECODE_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError)
except ImportError:  # pragma: no cover - depends on the environment

    def loads(raw: bytes) -> Any:
        return json.loads(raw)

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    DECODE_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)


class BadBody(ValueError):
    pass


async def json_body(request: Request, limit: int = 64 << 20) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadBody(f"request body over {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise BadBody(f"request body over {limit} bytes")
    try:
        return loads(raw)
    except DECODE_ERRORS as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None


def state_of(request: Request) -> RuntimeState:
    return request.app.state.runtime  # type: ignore[no-any-return]


def instrumented(endpoint: str, handler: Handler) -> Handler:
    """Count and time every answer of `handler` by status."""

    async def wrapped(request: Request) -> Response:
        state = state_of(request)
        m = state.metrics
        started = time.perf_counter()
        m.child(m.inflight).inc()
        try:
            response = await handler(request)
        except BaseException:
            m.child(m.inflight).dec()
            m.child(m.requests, endpoint, "500").inc()
            raise
        if isinstance(response, StreamingResponse):
            response.body_iterator = _timed_stream(
                response.body_iterator, state, endpoint, started, response.status_code
            )
        else:
            _done(state, endpoint, started, response.status_code)
        return response

    return wrapped


async def _timed_stream(
    body: AsyncIterable[Any], state: RuntimeState, endpoint: str, started: float, status: int
) -> AsyncIterator[Any]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        _done(state, endpoint, started, status)


def _done(state: RuntimeState, endpoint: str, started: float, status: int) -> None:
    m = state.metrics
    m.child(m.inflight).dec()
    m.child(m.requests, endpoint, str(status)).inc()
    m.child(m.request_duration, endpoint).observe(time.perf_counter() - started)


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(dumps(content), status, headers, media_type="application/json")
