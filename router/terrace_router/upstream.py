"""The router's upstream HTTP client: one `aiohttp.ClientSession` per process.

Why aiohttp rather than httpx: httpx's default httpcore/anyio stack costs
about 0.5 ms of CPU per request on the CI machine, which alone breaks the
router's 1 ms added-latency budget; aiohttp (C llhttp parser, asyncio-native
pool) costs a fraction of that. The session is created in the app's
lifespan (`open_session`) and shared by every request.

This is the only module that knows the HTTP client library. A failed
exchange becomes an `UpstreamFailure` whose `kind` is what the router acts
on:

- `connect`: the request provably never reached the upstream (the
  connection could not be made, or a pooled connection was already closing
  when the request was to be written). Safe to send elsewhere, or again.
- `timeout`: no bytes for longer than the tier's read timeout.
- `error`: anything else (reset after the request went out, a malformed
  answer). The upstream may have read the request, so it is never re-sent
  to the same tier: inference is not idempotent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from . import policy

CONNECT = "connect"  # nothing was sent
TIMEOUT = policy.TIMEOUT
ERROR = policy.ERROR

# Idle upstream connections are closed before uvicorn's and llama.cpp's 5 s
# keep-alive timeout, so the router rarely writes into a socket the upstream
# is closing. The race left ends as `error` (escalated), never as a resend.
KEEPALIVE_SECONDS = 4.0


# The names the rest of the router uses for the client and its timeouts.
Session = aiohttp.ClientSession
Timeout = aiohttp.ClientTimeout


class UpstreamFailure(Exception):
    """`kind` (connect, timeout, error) and what the upstream did, in the
    router's own words (safe to show a client: no upstream bytes)."""

    def __init__(self, kind: str, detail: str, cause: BaseException | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.cause = repr(cause) if cause is not None else detail  # for the router's log


def open_session() -> aiohttp.ClientSession:
    """The shared client. No connection limit here: the per-endpoint
    in-flight limits of the tiers bound the connection count."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_SECONDS,
        ttl_dns_cache=10,  # Service names resolve to a stable ClusterIP
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep upstream cookies
        headers={"accept-encoding": "identity"},  # bodies are relayed as they come
        skip_auto_headers=("User-Agent",),
        trust_env=False,
        raise_for_status=False,
    )


def timeout(connect_seconds: float, read_seconds: float) -> aiohttp.ClientTimeout:
    """`sock_read` bounds each wait for upstream bytes (so each SSE chunk),
    not the whole answer: a long generation that keeps streaming is fine."""
    return aiohttp.ClientTimeout(
        total=None, connect=None, sock_connect=connect_seconds, sock_read=read_seconds
    )


_URLS: dict[str, URL] = {}


def url(base: str, path: str) -> URL:
    """A parsed URL, cached: parsing one per request costs ~20 us."""
    key = base + path
    parsed = _URLS.get(key)
    if parsed is None:
        if len(_URLS) > 4096:  # v2 paths carry model names: keep the cache bounded
            _URLS.clear()
        parsed = _URLS[key] = URL(key)
    return parsed


def _failure(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return UpstreamFailure(TIMEOUT, "timed out", exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamFailure(ERROR, "closed or reset the connection", exc)
    return UpstreamFailure(ERROR, "answered malformed bytes", exc)


def _unwritten(exc: BaseException) -> bool:
    """True when the request could not be written at all: aiohttp raises
    its ClientConnectionResetError (itself or as the cause of the
    ClientOSError it wraps writes in) only when the transport was already
    closing at the write. A reset while reading the answer is a plain
    ConnectionResetError: the upstream may have read the request."""
    reset = aiohttp.ClientConnectionResetError
    return isinstance(exc, reset) or isinstance(exc.__cause__, reset)


class Head:
    """An upstream response whose head is in and whose body is not read yet.

    Whoever holds it ends it: `read()` and `chunks()` to the end hand the
    connection back to the pool; `close()` drops it (so an upstream still
    generating sees the client leave)."""

    __slots__ = ("_resp", "status", "headers")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers  # case-insensitive, read-only

    async def read(self) -> bytes:
        """The whole body. Raises UpstreamFailure (timeout, error)."""
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._resp.close()
            raise _failure(exc) from None
        finally:
            self._resp.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises UpstreamFailure (timeout, error)."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _failure(exc) from None

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


async def healthy(
    session: aiohttp.ClientSession, target: URL, timeout: aiohttp.ClientTimeout
) -> bool:
    """Whether a GET of `target` answers 200 (a health check; never raises)."""
    try:
        async with session.get(target, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


async def notify(
    session: aiohttp.ClientSession, target: URL, timeout: aiohttp.ClientTimeout
) -> int:
    """POST with no body to `target` (a wake-up call); its status, 0 when
    nothing answered (never raises)."""
    try:
        async with session.post(target, timeout=timeout, allow_redirects=False) as resp:
            await resp.read()
            return resp.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


async def send(
    session: aiohttp.ClientSession,
    method: str,
    target: URL,
    data: bytes | None,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
) -> Head:
    """One request, returned once the response head is in. A pooled
    connection found closing before anything was written is replaced once;
    nothing else is ever re-sent."""
    for attempt in (0, 1):
        try:
            resp = await session.request(
                method,
                target,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
            return Head(resp)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            raise UpstreamFailure(CONNECT, "refused the connection") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            if _unwritten(exc):
                if attempt == 0:
                    continue
                raise UpstreamFailure(CONNECT, "closed the connection before the request") from None
            raise _failure(exc) from None
    raise AssertionError("unreachable")
