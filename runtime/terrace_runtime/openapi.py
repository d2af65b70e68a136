"""The runtime's OpenAPI 3.1 document, served at GET /openapi.json.

`document(settings)` describes every endpoint the runtime serves: the OpenAI
API (/v1/completions, /v1/chat/completions, /v1/models, /v1/models/{model}),
KServe's Open Inference Protocol v2 (/v2, health, model metadata and
readiness, infer), and the process's own /healthz, /readyz, /metrics and
/openapi.json. The OpenAI request schemas are the pydantic request
models' own (`model_json_schema`), so the document and the validation cannot
drift apart; answers are described by hand. Errors: OpenAI's envelope under
/v1, `{"error": "<message>"}` under /v2. Each operation lists every status
the code can answer.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from . import __version__
from .openai_requests import ChatRequest, CompletionRequest
from .settings import ServeSettings

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    """A JSON object schema: `properties`, of which `required` (default: all)."""
    names = list(properties) if required is None else required
    return {"type": "object", "required": names, "properties": properties}


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

USAGE = _obj(prompt_tokens=INTEGER, completion_tokens=INTEGER, total_tokens=INTEGER)
FINISH = _nullable({"enum": ["stop", "length"]})
COMPLETION_LOGPROBS = _nullable(
    _obj(
        tokens=_array(STRING),
        token_logprobs=_array(NUMBER),
        top_logprobs=_array({"type": "object", "additionalProperties": NUMBER}),
        text_offset=_array(INTEGER),
    )
)
CHAT_TOKEN = _obj(token=STRING, logprob=NUMBER, bytes=_nullable(_array(INTEGER)))
CHAT_LOGPROBS = _nullable(
    _obj(
        content=_array({"allOf": [CHAT_TOKEN, _obj(top_logprobs=_array(CHAT_TOKEN))]}),
        refusal={"type": "null"},
    )
)


def _completion(object_: str, choice: Schema, *, chunk: bool) -> Schema:
    """A whole answer, or one streamed chunk (usage only in the last, when asked)."""
    schema = _obj(
        id=STRING,
        object={"const": object_},
        created=INTEGER,
        model=STRING,
        choices=_array(choice),
        usage=USAGE,
        system_fingerprint={"type": "null"},
    )
    if chunk:
        schema["required"] = ["id", "object", "created", "model", "choices"]
    return schema


def _events(chunk: str) -> Schema:
    """One server-sent event of a stream: a JSON chunk, `[DONE]` (the end of a
    whole stream), or an in-band error (the end of a broken one: no `[DONE]`)."""
    return _obj(
        ["data"],
        data={
            "anyOf": [
                {"const": "[DONE]"},
                {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [_ref(chunk), _ref("OpenAIError")]},
                },
            ]
        },
        event=STRING,
    )


COMPLETION_CHOICE = _obj(
    index=INTEGER, text=STRING, logprobs=COMPLETION_LOGPROBS, finish_reason=FINISH
)
ASSISTANT = {"const": "assistant"}

RESPONSE_SCHEMAS: dict[str, Schema] = {
    "OpenAIError": _obj(
        error=_obj(
            message=STRING,
            type=STRING,
            param=_nullable(STRING),
            code=_nullable(STRING),
        )
    ),
    "Completion": _completion("text_completion", COMPLETION_CHOICE, chunk=False),
    "CompletionChunk": _completion("text_completion", COMPLETION_CHOICE, chunk=True),
    "CompletionEvent": _events("CompletionChunk"),
    "ChatCompletion": _completion(
        "chat.completion",
        _obj(
            index=INTEGER,
            message=_obj(role=ASSISTANT, content=STRING, refusal={"type": "null"}),
            logprobs=CHAT_LOGPROBS,
            finish_reason=FINISH,
        ),
        chunk=False,
    ),
    "ChatCompletionChunk": _completion(
        "chat.completion.chunk",
        _obj(
            index=INTEGER,
            delta=_obj([], role=ASSISTANT, content=STRING),
            logprobs=CHAT_LOGPROBS,
            finish_reason=FINISH,
        ),
        chunk=True,
    ),
    "ChatCompletionEvent": _events("ChatCompletionChunk"),
    "Model": _obj(id=STRING, object={"const": "model"}, created=INTEGER, owned_by=STRING),
    "ModelList": _obj(object={"const": "list"}, data=_array(_ref("Model"))),
    "OIPError": _obj(error=STRING),
    "ServerMetadata": _obj(name=STRING, version=STRING, extensions=_array(STRING)),
    "Live": _obj(live=BOOLEAN),
    "Ready": _obj(["ready"], name=STRING, ready=BOOLEAN, reason=STRING),
    "Healthz": _obj(status={"const": "ok"}),
    "Readyz": _obj(["status"], status={"enum": ["ready", "loading", "failed"]}, reason=STRING),
    "TensorMetadata": _obj(name=STRING, datatype={"enum": DATATYPES}, shape=_array(INTEGER)),
    "ModelMetadata": _obj(
        name=STRING,
        versions=_array(STRING),
        platform=STRING,
        inputs=_array(_ref("TensorMetadata")),
        outputs=_array(_ref("TensorMetadata")),
        parameters=OBJECT,
    ),
    "InferenceRequest": _obj(
        ["inputs"],
        id=STRING,
        parameters=_obj([], binary_data_output=BOOLEAN),
        inputs={
            "type": "array",
            "minItems": 1,
            "items": _obj(
                ["name", "shape", "datatype"],
                name=STRING,
                shape=_array({"type": "integer", "minimum": 0}),
                datatype={"enum": DATATYPES},
                data={"type": "array"},
                parameters=_obj([], binary_data_size={"type": "integer", "minimum": 0}),
            ),
        },
        outputs=_array(_obj(["name"], name=STRING, parameters=_obj([], binary_data=BOOLEAN))),
    ),
    "InferenceResponse": _obj(
        ["model_name", "model_version", "outputs"],
        model_name=STRING,
        model_version=STRING,
        id=STRING,
        outputs=_array(
            _obj(
                ["name", "datatype", "shape"],
                name=STRING,
                datatype={"enum": DATATYPES},
                shape=_array(INTEGER),
                data={"type": "array"},
                parameters=OBJECT,
            )
        ),
    ),
}

OPENAI_STATUS = {
    400: "Invalid request: the envelope's `param` names the field (also a request of "
    "more sequences, prompts x n, than the runtime can ever queue: `prompt` or `n`).",
    404: "Another model's name.",
    413: "The body is over 64 MiB.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    500: "Generation failed (no stack trace; the log has it).",
    503: "The model is not ready, or the runtime is shutting down.",
}
OIP_STATUS = {
    400: "A request the model cannot take (names, shapes, datatypes, data, JSON).",
    404: "Another model's name or version.",
    429: "The queue is full; retry after `Retry-After` seconds.",
    500: "The model failed on valid input.",
    503: "The model is not ready.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


def _errors(statuses: dict[int, str], codes: tuple[int, ...], schema: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        out[str(code)] = {"description": statuses[code], "content": _json(schema)}
        if code == 429:
            out[str(code)]["headers"] = RETRY_AFTER
    return out


def _generation(summary: str, request: str, answer: str) -> dict[str, Any]:
    """A generation endpoint: JSON `answer`, or with `stream: true` its events."""
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(request)},
            "responses": {
                "200": {
                    "description": "The answer; with `stream: true`, server-sent events "
                    "(`data: {chunk}` per token, then `data: [DONE]`; a stream that fails "
                    "mid-way ends with a `data: {error}` event instead, without `[DONE]`).",
                    "content": {
                        **_json(answer),
                        "text/event-stream": {"schema": _ref(f"{answer}Event")},
                    },
                },
                **_errors(OPENAI_STATUS, (400, 404, 413, 429, 500, 503), "OpenAIError"),
            },
        }
    }


def _path_params(params: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": STRING, "description": text}
        for name, text in params.items()
    ]


def _get(summary: str, ok: str, errors: dict[str, Any], **params: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": _json(ok)}, **errors},
    }
    if params:
        operation["parameters"] = _path_params(params)
    return {"get": operation}


def _oip_model_paths(prefix: str, **params: str) -> dict[str, Any]:
    """The per-model OIP v2 endpoints under `prefix` (with or without a version)."""
    not_ready = {"description": OIP_STATUS[503], "content": _json("Ready")}
    infer_errors = _errors(OIP_STATUS, (400, 404, 429, 500, 503), "OIPError")
    infer_ok = {
        "description": "The outputs; with binary outputs, the JSON part followed by their "
        "bytes (`Inference-Header-Content-Length` gives the JSON part's length).",
        "content": {
            **_json("InferenceResponse"),
            "application/octet-stream": {"schema": STRING},
        },
    }
    return {
        prefix: _get(
            "Model metadata",
            "ModelMetadata",
            _errors(OIP_STATUS, (404, 503), "OIPError"),
            **params,
        ),
        f"{prefix}/ready": _get(
            "Model readiness",
            "Ready",
            {**_errors(OIP_STATUS, (404,), "OIPError"), "503": not_ready},
            **params,
        ),
        f"{prefix}/infer": {
            "post": {
                "summary": "Inference on tensors",
                "parameters": _path_params(params),
                "requestBody": {"required": True, "content": _json("InferenceRequest")},
                "responses": {"200": infer_ok, **infer_errors},
            }
        },
    }


def _request_schemas(settings: ServeSettings) -> dict[str, Schema]:
    """The OpenAI request models' JSON schemas, with this runtime's token limit."""
    _, top = models_json_schema(
        [(CompletionRequest, "validation"), (ChatRequest, "validation")], ref_template=REF
    )
    schemas: dict[str, Schema] = top["$defs"]
    limit = settings.max_tokens_limit
    for name in ("CompletionRequest", "ChatRequest"):
        for field in ("max_tokens", "max_completion_tokens"):
            prop = schemas[name]["properties"].get(field)
            if prop is not None:
                prop["anyOf"][0]["maximum"] = limit
    return schemas


def _probe_paths() -> dict[str, Any]:
    """The process's own endpoints: probes, metrics and this document."""
    not_ready = {"description": "Not ready; `reason` says why.", "content": _json("Readyz")}
    return {
        "/healthz": _get("Liveness (for probes that prefer /healthz)", "Healthz", {}),
        "/readyz": _get("Readiness (for probes that prefer /readyz)", "Readyz", {"503": not_ready}),
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "The text exposition format.",
                        "content": {"text/plain": {"schema": STRING}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": OBJECT}},
                    }
                },
            }
        },
    }


def document(settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a runtime serving `settings` (JSON-ready)."""
    model = "The model's name (`--name`)."
    ready_errors = {"503": {"description": "Not ready", "content": _json("Ready")}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "terrace-runtime",
            "version": __version__,
            "description": f"Serves one model, {settings.name!r}: the OpenAI API for "
            "text generation and KServe's Open Inference Protocol v2.",
        },
        "paths": {
            "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("Chat completion", "ChatRequest", "ChatCompletion"),
            "/v1/models": _get("The served model", "ModelList", {}),
            "/v1/models/{model}": _get(
                "One model",
                "Model",
                _errors(OPENAI_STATUS, (404,), "OpenAIError"),
                model=model,
            ),
            "/v2": _get("Server metadata", "ServerMetadata", {}),
            "/v2/health/live": _get("Liveness", "Live", {}),
            "/v2/health/ready": _get("Readiness", "Ready", ready_errors),
            **_oip_model_paths("/v2/models/{name}", name=model),
            **_oip_model_paths(
                "/v2/models/{name}/versions/{version}", name=model, version="Only `1`."
            ),
            **_probe_paths(),
        },
        "components": {"schemas": {**_request_schemas(settings), **RESPONSE_SCHEMAS}},
    }
