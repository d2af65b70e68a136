"""OpenAI's Files and Batch APIs, as `terrace-batch` serves them (Starlette).

    POST   /v1/files                 multipart: file, purpose=batch
    GET    /v1/files                 ?purpose=&limit=&after=&order=
    GET    /v1/files/{id}            the file object
    GET    /v1/files/{id}/content    its bytes (input, output or error JSONL)
    DELETE /v1/files/{id}
    POST   /v1/batches               {input_file_id, endpoint, completion_window, metadata}
    GET    /v1/batches               ?after=&limit=   (newest first, OpenAI's cursor)
    GET    /v1/batches/{id}
    POST   /v1/batches/{id}/cancel

Shapes are OpenAI's (the `openai` client's types parse them unchanged);
errors are OpenAI's envelope with the parameter named. Beyond OpenAI, a
`completion_window` may be any `<n>s|m|h|d` within the service's bounds
(default 1h to 72h), not only `24h`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..auth import ApiKeys
from ..errors import RouterError, bad_request
from .jsonl import MAX_BYTES, BatchFileError, check_for_batch, parse
from .store import Store

WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
Models = Callable[[], Awaitable[set[str] | None]]


def window_seconds(text: object, lo: int, hi: int) -> int:
    """`24h` -> 86400; a RouterError naming completion_window otherwise."""
    m = WINDOW.match(text) if isinstance(text, str) else None
    if m is None:
        raise bad_request(
            "completion_window must be a duration like 24h (a number and s, m, h or d)",
            "completion_window",
        )
    seconds = int(m.group(1)) * UNIT_SECONDS[m.group(2)]
    if not lo <= seconds <= hi:
        raise bad_request(
            f"completion_window must be between {lo} s and {hi} s, got {text}",
            "completion_window",
        )
    return seconds


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(row: dict, counts: object) -> dict:
    total, completed, failed = (
        getattr(counts, "total", 0),
        getattr(counts, "completed", 0),
        getattr(counts, "failed", 0),
    )
    meta = json.loads(row["metadata"]) if row["metadata"] else None
    out = {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": row["created_at"],
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": meta,
    }
    # Terrace's extension (the openai client keeps unknown fields): what the
    # answered lines cost, as far as the tiers' energy and the grid were known.
    out["terrace"] = {
        "energy_joules": round(row["joules"], 3),
        "co2_grams": round(row["grams_co2"], 6),
        "lines_measured": row["lines_measured"],
        "lines_with_carbon": row["lines_with_carbon"],
    }
    for stamp in (
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ):
        out[stamp] = row[stamp]
    return out


def _limit(request: Request, default: int = 20) -> int:
    raw = request.query_params.get("limit", str(default))
    try:
        n = int(raw)
    except ValueError:
        raise bad_request("limit must be an integer from 1 to 100", "limit") from None
    if not 1 <= n <= 100:
        raise bad_request("limit must be an integer from 1 to 100", "limit")
    return n


def _not_found(what: str, ident: str) -> RouterError:
    return RouterError(404, f"No such {what}: {ident}", code="not_found")


def create_batch_app(
    store: Store,
    keys: ApiKeys,
    models: Models,
    window_bounds: tuple[int, int] = (3600, 72 * 3600),
) -> Starlette:
    """The Files and Batch APIs over `store`; `models` lists the served
    model names (None when unknown: the check is skipped)."""

    def guard(fn: Callable[[Request], Awaitable[Response]]) -> Callable:
        async def guarded(request: Request) -> Response:
            try:
                keys.check(request.headers.get("authorization"))
                return await fn(request)
            except RouterError as err:
                return err.openai_response()

        return guarded

    async def run(fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def upload(request: Request) -> Response:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BYTES + 64 * 1024:
            raise RouterError(413, f"a file may hold at most {MAX_BYTES} bytes", param="file")
        try:
            form = await request.form(max_part_size=MAX_BYTES + 1)
        except Exception as e:  # not multipart, or a part over the limit
            raise bad_request(f"expected multipart/form-data with file and purpose: {e}") from e
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise bad_request("purpose must be batch (the only one served here)", "purpose")
        if upload is None or isinstance(upload, str):
            raise bad_request("file is required (multipart file part)", "file")
        content = await upload.read()
        if len(content) > MAX_BYTES:
            raise RouterError(413, f"a file may hold at most {MAX_BYTES} bytes", param="file")
        try:
            parse(content)
        except BatchFileError as e:
            raise bad_request(str(e), e.param or "file", "invalid_file") from None
        row = await run(store.add_file, upload.filename or "batch.jsonl", purpose, content)
        return JSONResponse(file_object(row))

    async def list_files(request: Request) -> Response:
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise bad_request("order must be asc or desc", "order")
        limit = _limit(request, 100)
        after = request.query_params.get("after")
        if after is not None and await run(store.file, after) is None:
            raise bad_request(f"after: no file {after!r} to continue from", "after")
        rows = await run(
            store.files,
            request.query_params.get("purpose"),
            request.query_params.get("after"),
            limit + 1,
            order,
        )
        return JSONResponse(_page([file_object(r) for r in rows], limit))

    async def get_file(request: Request) -> Response:
        row = await run(store.file, request.path_params["file_id"])
        if row is None:
            raise _not_found("file", request.path_params["file_id"])
        return JSONResponse(file_object(row))

    async def file_content(request: Request) -> Response:
        row = await run(store.file, request.path_params["file_id"])
        if row is None:
            raise _not_found("file", request.path_params["file_id"])
        return Response(row["content"] or b"", media_type="application/jsonl")

    async def delete_file(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if not await run(store.delete_file, file_id):
            raise _not_found("file", file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    async def create_batch(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise bad_request("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object")
        endpoint = body.get("endpoint")
        if endpoint not in ("/v1/chat/completions", "/v1/completions"):
            raise bad_request(
                "endpoint must be /v1/chat/completions or /v1/completions", "endpoint"
            )
        seconds = window_seconds(body.get("completion_window"), *window_bounds)
        meta = body.get("metadata")
        if meta is not None and not (
            isinstance(meta, dict)
            and len(meta) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        ):
            raise bad_request("metadata must map at most 16 strings to strings", "metadata")
        file_id = body.get("input_file_id")
        row = await run(store.file, file_id) if isinstance(file_id, str) else None
        if row is None or row["kind"] != "input":
            raise bad_request(f"no input file {file_id!r}", "input_file_id")
        requests = parse(row["content"])
        try:
            check_for_batch(requests, endpoint, await models())
        except BatchFileError as e:
            raise bad_request(str(e), e.param, "invalid_file") from None
        created = await run(
            store.add_batch,
            endpoint,
            file_id,
            body["completion_window"],
            seconds,
            meta,
            [(r.custom_id, r.body) for r in requests],
        )
        return JSONResponse(batch_object(created, await run(store.counts, created["id"])))

    async def get_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        row = await run(store.batch, batch_id)
        if row is None:
            raise _not_found("batch", batch_id)
        return JSONResponse(batch_object(row, await run(store.counts, batch_id)))

    async def list_batches(request: Request) -> Response:
        limit = _limit(request)
        after = request.query_params.get("after")
        if after is not None and await run(store.batch, after) is None:
            raise bad_request(f"after: no batch {after!r} to continue from", "after")
        rows = await run(store.batches, after, limit + 1)
        data = [batch_object(r, await run(store.counts, r["id"])) for r in rows]
        return JSONResponse(_page(data, limit))

    async def cancel_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        row = await run(store.batch, batch_id)
        if row is None:
            raise _not_found("batch", batch_id)
        if row["status"] not in ("in_progress", "validating", "cancelling"):
            raise RouterError(
                409, f"batch {batch_id} is {row['status']}: it cannot be cancelled", code="conflict"
            )
        await run(lambda: store.set_status(batch_id, "cancelling", cancelling_at=int(time.time())))
        row = await run(store.batch, batch_id)
        return JSONResponse(batch_object(row, await run(store.counts, batch_id)))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not_found" if exc.status_code == 404 else None
        return RouterError(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code
        ).openai_response()

    routes = [
        Route("/v1/files", guard(upload), methods=["POST"]),
        Route("/v1/files", guard(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", guard(get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", guard(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", guard(file_content), methods=["GET"]),
        Route("/v1/batches", guard(create_batch), methods=["POST"]),
        Route("/v1/batches", guard(list_batches), methods=["GET"]),
        Route("/v1/batches/{batch_id}", guard(get_batch), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", guard(cancel_batch), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _page(data: list[dict], limit: int) -> dict:
    more = len(data) > limit
    data = data[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
