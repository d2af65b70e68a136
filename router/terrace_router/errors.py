"""Errors the router answers with, in the shape each protocol's clients parse.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}` and the
status code (the `openai` package maps 400/401/404/413/429/5xx to its own
exception classes and honours `Retry-After`). Open Inference Protocol v2
clients read `{"error": "message"}`. Nothing here ever carries a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.responses import Response

from .policy import OVERLOAD, TIMEOUT, UNAVAILABLE, retry_after_seconds


class RouterError(Exception):
    """An answer the router gives instead of an upstream's, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.extra_headers: dict[str, str] | None = None

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.retry_after is not None:
            h["retry-after"] = str(self.retry_after)
        if self.status == 401:
            h["www-authenticate"] = "Bearer"
        if self.extra_headers:
            h.update(self.extra_headers)
        return h

    def openai_response(self, extra_headers: dict[str, str] | None = None) -> Response:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = self.headers()
        if extra_headers:
            headers.update(extra_headers)
        return Response(
            json.dumps(body),
            status_code=self.status,
            headers=headers,
            media_type="application/json",
        )

    def v2_response(self) -> Response:
        return Response(
            json.dumps({"error": self.message}),
            status_code=self.status,
            headers=self.headers(),
            media_type="application/json",
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code=code)


def unauthorized(message: str) -> RouterError:
    return RouterError(401, message, code="invalid_api_key")


def too_large(limit: int) -> RouterError:
    return RouterError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        code="request_too_large",
    )


def model_not_found(model: str) -> RouterError:
    return RouterError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one tier did not answer a request.

    `kind` is a policy reason (overload, unavailable, timeout, error);
    `status`, `retry_after` and `detail` are the upstream's own, when it
    answered (a 429 or a 5xx): they reach the client intact. Without a
    status, `detail` says what the upstream did in the router's words."""

    tier: str
    kind: str
    status: int | None = None
    retry_after: int | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.status is not None:
            said = f" ({self.detail})" if self.detail else ""
            return f"tier '{self.tier}' answered {self.status}{said}"
        return f"tier '{self.tier}' {self.detail or _KIND_TEXT.get(self.kind, 'failed')}"


_KIND_TEXT = {
    OVERLOAD: "is at its in-flight limit",
    UNAVAILABLE: "has no reachable endpoint",
    TIMEOUT: "timed out",
}

# The router's status when the last tier tried failed without an HTTP
# answer of its own: a gateway's usual codes.
_STATUS = {OVERLOAD: 429, UNAVAILABLE: 503, TIMEOUT: 504}


def no_answer(failures: list[Failure], wait_seconds: float) -> RouterError:
    """The error for a request no tier answered, naming every tier's cause.

    Every failure an overload (an in-flight limit or an upstream 429): 429
    with the soonest Retry-After any upstream gave (else 1 s). Otherwise the
    last tier's failure decides the status: its own HTTP status when it
    answered, else 503 (no endpoint), 504 (timeout) or 502 (reset, malformed
    answer). Retry-After: the last tier's, else the soonest another tier
    gave, else (429, 503) `wait_seconds` until an endpoint leaves ejection,
    at least 1."""
    causes = "; ".join(f.describe() for f in failures) or "no tier was tried"
    message = f"No tier could serve this request: {causes}. Retry shortly."
    if failures and all(f.kind == OVERLOAD for f in failures):
        given = [f.retry_after for f in failures if f.retry_after is not None]
        return RouterError(
            429,
            message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=min(given) if given else 1,
        )
    last = failures[-1] if failures else Failure("none", UNAVAILABLE)
    status = last.status or _STATUS.get(last.kind, 502)
    given = [f.retry_after for f in failures if f.retry_after is not None]
    retry_after = last.retry_after if last.retry_after is not None else min(given, default=None)
    if retry_after is None and status in (429, 503):
        retry_after = retry_after_seconds(wait_seconds)
    if status == 429:
        return RouterError(
            429,
            message,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            retry_after=retry_after,
        )
    code = {503: "service_unavailable", 504: "upstream_timeout", 502: "bad_gateway"}
    return RouterError(
        status,
        message,
        type="server_error",
        code=code.get(status, "upstream_error"),
        retry_after=retry_after,
    )


def internal() -> RouterError:
    return RouterError(500, "The router failed to handle this request.", type="server_error")
