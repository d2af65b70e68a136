"""The router's upstream HTTP client: one `aiohttp.ClientSession` per process.

Why aiohttp rather than httpx: httpx's default httpcore/anyio stack costs
about 0.5 ms of CPU per request on the CI machine, which alone breaks the
router's 1 ms added-latency budget; aiohttp (C llhttp parser, asyncio-native
pool) costs a fraction of that. The session is created in the app's
lifespan (`open_session`) and shared by every request.

This module is the only place that knows aiohttp's exceptions: a failed
attempt becomes an `UpstreamFailure` whose `kind` is what the router acts on
(`connect`: nothing was sent, try another endpoint; `timeout`; `error`).
"""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from . import policy

CONNECT = "connect"  # the connection could not be made: nothing was sent
TIMEOUT = policy.TIMEOUT
ERROR = policy.ERROR

# Idle upstream connections are closed before uvicorn's default 5 s
# keep-alive timeout, so the router rarely writes into a socket the upstream
# is closing. (The rare race left is retried once, see `send`.)
KEEPALIVE_SECONDS = 4.0


class UpstreamFailure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


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


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL | str,
    data: bytes | None,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
) -> aiohttp.ClientResponse:
    """One request, returned once the response head is in (body unread: the
    caller reads or streams it, then releases the response)."""
    for attempt in (0, 1):
        try:
            return await session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailure(CONNECT, str(exc)) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # The keep-alive race: a pooled idle connection that the upstream
            # closed as the request went out. aiohttp retries this once for
            # idempotent methods only; inference POSTs are safe to repeat
            # (no answer came back), so one retry on a fresh connection here.
            if attempt == 0:
                continue
            raise UpstreamFailure(ERROR, str(exc) or type(exc).__name__) from None
        except TimeoutError as exc:  # aiohttp's read timeouts are TimeoutErrors too
            raise UpstreamFailure(TIMEOUT, str(exc) or "read timeout") from None
        except aiohttp.ClientError as exc:  # malformed answers, bad framing
            raise UpstreamFailure(ERROR, str(exc) or type(exc).__name__) from None
    raise AssertionError("unreachable")


class Reply:
    """A fully read upstream answer."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: URL | str,
    data: bytes | None,
    headers: dict[str, str],
    timeout: aiohttp.ClientTimeout,
) -> Reply:
    """`send`, then the whole body. The connection goes back to the pool when
    the body was read to its end, and is closed otherwise (error, timeout,
    cancellation by a client that left)."""
    resp = await send(session, method, url, data, headers, timeout)
    try:
        body = await resp.read()
    except TimeoutError as exc:
        raise UpstreamFailure(TIMEOUT, str(exc) or "read timeout") from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure(ERROR, str(exc) or type(exc).__name__) from None
    finally:
        resp.release()
    return Reply(resp.status, resp.headers, body)


# What reading a streamed body can raise when the upstream fails mid-way.
STREAM_ERRORS = (TimeoutError, aiohttp.ClientError)
