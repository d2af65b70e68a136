"""Small HTTP helpers shared by the protocol modules: JSON bodies, error
shapes, per-endpoint request metrics (streams are timed to their end), and
cancelling a handler's work when its client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
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

    def _no_constant(name: str) -> Any:
        raise json.JSONDecodeError(f"{name} is not JSON", name, 0)

    def loads(raw: bytes) -> Any:
        return json.loads(raw, parse_constant=_no_constant)  # NaN and Infinity are not JSON

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    DECODE_ERRORS = (json.JSONDecodeError, UnicodeDecodeError)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class BadBody(ValueError):
    """The body is not JSON (HTTP 400)."""

    status = 400


class BodyTooLarge(BadBody):
    """The body is over the limit (HTTP 413)."""

    status = 413


MAX_BODY_BYTES = 64 << 20


# orjson reads an integer outside int64/uint64 (19 digits and more) as a
# float: 10**30 would become 1e30, which strict validation calls the wrong
# type rather than too large. A body with a run of 19 digits is read again.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19


def _may_hold_a_long_integer(raw: bytes) -> bool:
    """Whether `raw` has 19 digits in a row (C speed: a translate and a find)."""
    return _LONG_RUN in raw.translate(_DIGITS_AS_ZERO)


async def json_body(
    request: Request, limit: int = MAX_BODY_BYTES, *, exact_integers: bool = False
) -> Any:
    """The request's JSON body (orjson: no NaN or Infinity literals). Raises
    BodyTooLarge over `limit` bytes, BadBody when it is not JSON, ClientGone
    when the client leaves while sending it.

    With `exact_integers` every integer is a Python int however large (the
    OpenAI bodies: `max_tokens: 10**30` is then an integer out of range)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone from None
    if len(raw) > limit:
        raise BodyTooLarge(f"request body over {limit} bytes")
    try:
        body = loads(raw)
    except DECODE_ERRORS as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None
    if exact_integers and _may_hold_a_long_integer(raw):
        # orjson has checked it (valid UTF-8 and JSON, every number finite):
        # the standard library reads it again with exact integers, unless it
        # nests deeper than Python's recursion limit (no OpenAI field does).
        with contextlib.suppress(RecursionError):
            body = json.loads(raw)
    return body


def state_of(request: Request) -> RuntimeState:
    return request.app.state.runtime  # type: ignore[no-any-return]


# nginx's "client closed request": what the metrics record for an answer
# nobody was left to receive.
CLIENT_CLOSED = 499

T = TypeVar("T")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # an empty trailing body message


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`await work`, unless the client disconnects first: then `work` is
    cancelled (and has finished cleaning up) and ClientGone is raised.

    Call it only once the body has been read: it reads the ASGI receive
    channel, where nothing but `http.disconnect` is left to come. Starlette
    does not cancel a plain handler whose client left; streams are watched
    by StreamingResponse itself."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((job, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled: so is its work
        job.cancel()
        raise
    finally:
        gone.cancel()
    if job.done():
        return job.result()
    job.cancel()
    await asyncio.gather(job, return_exceptions=True)  # its cleanup (cancelling sequences) ran
    raise ClientGone


def instrumented(endpoint: str, handler: Handler) -> Handler:
    """Count and time every answer of `handler` by status; an answer whose
    client left first (ClientGone) counts once, as 499, and is not sent."""

    async def wrapped(request: Request) -> Response:
        state = state_of(request)
        m = state.metrics
        started = time.perf_counter()
        m.child(m.inflight).inc()
        try:
            response = await handler(request)
        except ClientGone:
            _done(state, endpoint, started, CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
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
