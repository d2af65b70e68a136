"""Errors the router answers with, in the shape each protocol's clients parse.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}` and the
status code (the `openai` package maps 400/401/404/413/429/5xx to its own
exception classes and honours `Retry-After`). Open Inference Protocol v2
clients read `{"error": "message"}`. Nothing here ever carries a traceback.
"""

from __future__ import annotations

import json

from starlette.responses import Response


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


def overloaded(retry_after: int) -> RouterError:
    return RouterError(
        429,
        "Every tier that could serve this request is at its in-flight limit; retry shortly.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after=retry_after,
    )


def unavailable(retry_after: int, detail: str) -> RouterError:
    return RouterError(
        503,
        f"No tier could serve this request ({detail}); retry shortly.",
        type="server_error",
        code="service_unavailable",
        retry_after=retry_after,
    )


def internal() -> RouterError:
    return RouterError(500, "The router failed to handle this request.", type="server_error")
