"""The router's address for the Batch API: `/v1/files` and `/v1/batches`
are forwarded to the TierRouter's `terrace-batch` (`RouterConfig.batch_url`),
so one `base_url` serves both interactive and deferred requests.

The router checks the API key first (the same keys as for chat), then
relays method, path, query, body (streamed: files go up to 200 MB) and the
answer's status and body. No batch service configured: 404 naming it; one
that cannot be reached: 503 with Retry-After. Errors are OpenAI's envelope.
"""

from __future__ import annotations

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from .. import upstream
from ..errors import RouterError
from ..state import RouterState
from .jsonl import MAX_BYTES

HEADERS = ("content-type", "authorization", "accept")
UPLOAD_OVERHEAD = 1024 * 1024  # multipart framing around a file of MAX_BYTES
# The Batch API's paths and methods (batch/api.py serves them).
BATCH_ROUTES = (
    ("/v1/files", ["GET", "POST"]),
    ("/v1/files/{file_id}", ["GET", "DELETE"]),
    ("/v1/files/{file_id}/content", ["GET"]),
    ("/v1/batches", ["GET", "POST"]),
    ("/v1/batches/{batch_id}", ["GET"]),
    ("/v1/batches/{batch_id}/cancel", ["POST"]),
)
READ_TIMEOUT_SECONDS = 300.0


async def forward(
    state: RouterState, client: aiohttp.ClientSession | None, request: Request
) -> Response:
    state.keys.check(request.headers.get("authorization"))
    base = state.config.batch_url
    if not base:
        raise RouterError(
            404,
            f"{request.url.path}: the Batch API is not enabled on this router "
            "(set the TierRouter's spec.batch)",
            code="not_found",
        )
    if client is None:
        raise RouterError(503, "the router is starting", type="server_error", retry_after=1)
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BYTES + UPLOAD_OVERHEAD:
        # Said at once, from the header: not after streaming 200 MB on.
        raise RouterError(413, f"a file may hold at most {MAX_BYTES} bytes", param="file")
    target = upstream.url(base.rstrip("/"), request.url.path).with_query(request.url.query)
    headers = {h: request.headers[h] for h in HEADERS if h in request.headers}
    try:
        async with client.request(
            request.method,
            target,
            data=request.stream() if request.method in ("POST", "PUT") else None,
            headers=headers,
            timeout=upstream.timeout(5.0, READ_TIMEOUT_SECONDS),
        ) as resp:
            body = await resp.read()
            media = resp.headers.get("content-type", "application/json")
            return Response(
                body, status_code=resp.status, media_type=None, headers={"content-type": media}
            )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise RouterError(
            503,
            f"the batch service at {base} cannot be reached ({type(e).__name__})",
            type="server_error",
            retry_after=5,
        ) from None
