"""The router's OpenAPI 3.1 document, served at GET /openapi.json.

Built from the request validators themselves (`schemas.py`), so the document
and what the router accepts cannot drift apart. The router forwards fields
it does not know (upstream extensions), so its request schemas allow extra
properties; an upstream's own refusal (any 4xx) is passed through as the
upstream answered it. Every status the router can answer is listed with its
body: OpenAI's error envelope under /v1, OIP v2's `{"error": "..."}` under
/v2.
"""

from __future__ import annotations

from typing import Any

from .schemas import ChatCompletionRequest, CompletionRequest

_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}
}
_WHY = {
    "400": "The request is invalid (the `param` names the field), or an upstream refused it.",
    "401": "No or an unknown API key.",
    "404": "Unknown model or path.",
    "409": "The batch has ended: it cannot be cancelled.",
    "413": "The body is over the router's `maxBodyBytes` (a batch file: over 200 MB).",
    "429": "Every tier that could serve it is at its in-flight limit or answered 429.",
    "500": "An upstream answered 500 (its message is quoted), or the router failed.",
    "502": "An upstream reset the connection or answered malformed bytes.",
    "503": "No endpoint of the tier is reachable, or an upstream answered 503.",
    "504": "An upstream sent nothing for longer than the tier's read timeout.",
    "4XX": "An upstream's own refusal, passed through.",
    "5XX": "An upstream's own server error status, passed through with its Retry-After.",
}


def _errors(schema: dict[str, Any], codes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        resp: dict[str, Any] = {
            "description": _WHY[code],
            "content": {"application/json": {"schema": schema}},
        }
        if code in ("429", "503", "5XX"):
            resp["headers"] = _RETRY_AFTER
        out[code] = resp
    return out


_UPSTREAM_CODES = ["400", "401", "404", "413", "429", "500", "502", "503", "504", "4XX", "5XX"]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _completion(name: str, summary: str) -> dict[str, Any]:
    answer = {
        "description": "The tier's answer: JSON, or server-sent events when `stream` is true. "
        "Headers `x-terrace-tier`, `x-terrace-complexity`, `x-terrace-escalated` say "
        "where it was served and why.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                },
            },
            "responses": {"200": answer, **_errors(_OPENAI_ERROR, _UPSTREAM_CODES)},
        }
    }


def _v2(method: str, summary: str, body: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "The tier's answer (JSON, or the binary tensor extension).",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string"}},
                },
            },
            **_errors(_V2_ERROR, _UPSTREAM_CODES),
        },
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object", "required": ["inputs"]}},
                "application/octet-stream": {"schema": {"type": "string"}},
            },
        }
    return {method: op}


_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_VERSION = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]


def _batch_paths() -> dict[str, Any]:
    """OpenAI's Files and Batch APIs, forwarded to terrace-batch (docs/batch.md)."""
    codes = ["400", "401", "404", "409", "413", "503"]

    def op(summary: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "summary": summary + " (forwarded to the TierRouter's terrace-batch; 404 without one)",
            "responses": {
                "200": _json({"type": "object"}, "As OpenAI's API."),
                **_errors(_OPENAI_ERROR, codes),
            },
        }
        if body is not None:
            out["requestBody"] = {"required": True, "content": body}
        return out

    def param(name: str) -> list[dict[str, Any]]:
        return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]

    upload = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"const": "batch"},
                },
            }
        }
    }
    create = {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["input_file_id", "endpoint", "completion_window"],
                "properties": {
                    "input_file_id": {"type": "string"},
                    "endpoint": {"enum": ["/v1/chat/completions", "/v1/completions"]},
                    "completion_window": {"type": "string"},
                    "metadata": {"type": "object"},
                },
            }
        }
    }
    content = {
        "description": "The file's bytes (JSONL).",
        "content": {"application/jsonl": {"schema": {"type": "string"}}},
    }
    return {
        "/v1/files": {"get": op("List files"), "post": op("Upload a batch input file", upload)},
        "/v1/files/{file_id}": {
            "parameters": param("file_id"),
            "get": op("A file"),
            "delete": op("Delete a file"),
        },
        "/v1/files/{file_id}/content": {
            "parameters": param("file_id"),
            "get": {
                **op("A file's content"),
                "responses": {"200": content, **_errors(_OPENAI_ERROR, codes)},
            },
        },
        "/v1/batches": {"get": op("List batches"), "post": op("Create a batch", create)},
        "/v1/batches/{batch_id}": {"parameters": param("batch_id"), "get": op("A batch")},
        "/v1/batches/{batch_id}/cancel": {
            "parameters": param("batch_id"),
            "post": op("Cancel a batch"),
        },
    }


def document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a JSON-able dict) of a router at `version`."""
    schemas: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    ready = {
        "200": _json({"type": "object"}, "Ready."),
        "503": _json({"type": "object"}, "Not ready."),
    }
    model_card = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}},
    }
    v1_auth = _errors(_OPENAI_ERROR, ["401"])
    paths: dict[str, Any] = {
        "/v1/chat/completions": _completion("ChatCompletionRequest", "OpenAI chat completions"),
        "/v1/completions": _completion("CompletionRequest", "OpenAI legacy completions"),
        "/v1/models": {
            "get": {
                "summary": "The router's model names: its own, `auto`, and each tier",
                "responses": {"200": _json({"type": "object"}, "A model list."), **v1_auth},
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model card",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _json(model_card, "The model card."),
                    **_errors(_OPENAI_ERROR, ["401", "404"]),
                },
            }
        },
        **_batch_paths(),
        "/v2": {
            "get": {
                "summary": "Server metadata",
                "responses": {"200": _json({"type": "object"}, "Metadata.")},
            }
        },
        "/v2/health/live": {
            "get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"}, "Live.")}}
        },
        "/v2/health/ready": {"get": {"summary": "Readiness", "responses": ready}},
        "/v2/models/{name}": {"parameters": _NAME, **_v2("get", "Model metadata")},
        "/v2/models/{name}/ready": {"parameters": _NAME, **_v2("get", "Model readiness")},
        "/v2/models/{name}/infer": {"parameters": _NAME, **_v2("post", "Inference", body=True)},
        "/v2/models/{name}/versions/{version}": {
            "parameters": _NAME + _VERSION,
            **_v2("get", "Model version metadata"),
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "parameters": _NAME + _VERSION,
            **_v2("get", "Model version readiness"),
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "parameters": _NAME + _VERSION,
            **_v2("post", "Inference on a model version", body=True),
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
        "/healthz": {
            "get": {
                "summary": "Process liveness",
                "responses": {"200": _json({"type": "object"}, "OK.")},
            }
        },
        "/readyz": {"get": {"summary": "Readiness", "responses": ready}},
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Terrace router", "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
