"""A batch input file, checked: OpenAI's JSONL of requests, one per line.

Each line is a JSON object `{"custom_id", "method", "url", "body"}`:
`custom_id` a non-empty string unique in the file, `method` "POST", `url`
one of `ENDPOINTS`, `body` an object naming a `model`. Limits are OpenAI's:
50,000 lines, 200 MB. Every problem is a `BatchFileError` naming the line
(1-based) and the parameter, which the API turns into a 400 (a file over
the size limit: 413).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024


class BatchFileError(ValueError):
    def __init__(self, message: str, line: int | None = None, param: str | None = None) -> None:
        where = f"line {line}: " if line is not None else ""
        super().__init__(where + message)
        self.line = line
        self.param = param


@dataclass(frozen=True)
class Request:
    line: int  # 1-based
    custom_id: str
    url: str
    body: dict


def parse(content: bytes) -> list[Request]:
    """Every request of a batch input file; BatchFileError at the first problem."""
    if len(content) > MAX_BYTES:
        raise BatchFileError(f"the file is {len(content)} bytes; the limit is {MAX_BYTES}")
    try:
        text = content.decode("utf-8-sig")  # a leading byte-order mark is fine
    except UnicodeDecodeError as e:
        raise BatchFileError(f"the file is not UTF-8 text ({e.reason} at byte {e.start})") from e
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(requests) == MAX_LINES:
            raise BatchFileError(f"more than {MAX_LINES} requests", n)
        try:
            item = json.loads(raw)
        except ValueError as e:
            raise BatchFileError(f"not JSON ({e.msg})", n) from e
        if not isinstance(item, dict):
            raise BatchFileError("a request must be a JSON object", n)
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise BatchFileError("custom_id must be a non-empty string", n, "custom_id")
        if custom_id in seen:
            raise BatchFileError(
                f"custom_id {custom_id!r} is also on line {seen[custom_id]}; each must be unique",
                n,
                "custom_id",
            )
        seen[custom_id] = n
        if item.get("method") != "POST":
            raise BatchFileError("method must be POST", n, "method")
        url = item.get("url")
        if url not in ENDPOINTS:
            raise BatchFileError(f"url must be one of {', '.join(ENDPOINTS)}", n, "url")
        body = item.get("body")
        if not isinstance(body, dict):
            raise BatchFileError("body must be a JSON object", n, "body")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise BatchFileError("body.model must be a non-empty string", n, "body.model")
        if body.get("stream"):
            raise BatchFileError("streaming is not available in a batch", n, "body.stream")
        requests.append(Request(n, custom_id, url, body))
    if not requests:
        raise BatchFileError("the file holds no request")
    return requests


def check_for_batch(requests: Iterable[Request], endpoint: str, models: set[str] | None) -> None:
    """Every request goes to the batch's endpoint and names a model served
    here (`models`; None: not checked)."""
    for r in requests:
        if r.url != endpoint:
            raise BatchFileError(
                f"url {r.url} does not match the batch's endpoint {endpoint}", r.line, "url"
            )
        if models is not None and r.body["model"] not in models:
            served = ", ".join(sorted(models))
            raise BatchFileError(
                f"model {r.body['model']!r} is not served here (one of {served})",
                r.line,
                "body.model",
            )
