"""GET /openapi.json: the runtime's OpenAPI document, and schemathesis
holding a served byte-level model to it: generated requests (valid and
invalid) get no server error and no answer the document does not describe
(status, content type, headers, body), and requests that break the
document's request schemas are refused.

Schemathesis reads a document built here for the same settings as the
served one: it parametrizes at import time, before any server runs, and its
lazy `from_fixture` loader does not work with this pytest. The served
document is checked against the app's own routes and a list written out
here, never against the function that builds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from runtime_harness import MODEL, OPENAPI_CHECKS, ServedRuntime, build_byte_model
from terrace_runtime.openai_requests import ChatRequest, CompletionRequest
from terrace_runtime.openapi import document
from terrace_runtime.settings import ServeSettings

TOKEN_LIMIT = 24  # every generation stays short
SETTINGS = {"name": MODEL, "threads": 1, "max_tokens_limit": TOKEN_LIMIT}
DOCUMENT = document(ServeSettings(model="text-small.onnx", format="onnx", **SETTINGS))


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRuntime]:
    model = build_byte_model(tmp_path_factory.mktemp("byte-model"))
    with ServedRuntime(model, max_tokens_limit=TOKEN_LIMIT) as served:
        yield served


def test_the_document_describes_every_endpoint(runtime):
    doc = httpx.get(runtime.url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert operations(doc) == {
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models", "get"),
        ("/v1/models/{model}", "get"),
        ("/v2", "get"),
        ("/v2/health/live", "get"),
        ("/v2/health/ready", "get"),
        ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/ready", "get"),
        ("/v2/models/{name}/infer", "post"),
        ("/v2/models/{name}/versions/{version}", "get"),
        ("/v2/models/{name}/versions/{version}/ready", "get"),
        ("/v2/models/{name}/versions/{version}/infer", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    }
    completions = paths["/v1/completions"]["post"]["responses"]
    assert set(completions) == {"200", "400", "404", "413", "429", "500", "503"}
    assert "Retry-After" in completions["429"]["headers"]
    schemas = doc["components"]["schemas"]
    # The request schemas are the validators' own, with this runtime's token limit.
    properties = schemas["CompletionRequest"]["properties"]
    assert properties["max_tokens"]["anyOf"][0]["maximum"] == TOKEN_LIMIT
    assert {"type": "null"} in properties["temperature"]["anyOf"]  # the null rule
    assert schemas["CompletionRequest"]["additionalProperties"] is False
    assert set(properties) == set(CompletionRequest.model_fields)
    assert set(schemas["ChatRequest"]["properties"]) == set(ChatRequest.model_fields)


HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def operations(doc: dict) -> set[tuple[str, str]]:
    """(path, method) of every operation in an OpenAPI document."""
    return {(p, m) for p, item in doc["paths"].items() for m in item if m in HTTP_METHODS}


def test_every_served_route_is_in_the_document(runtime):
    """What the app routes and what the served document lists are the same set."""
    served = {
        (re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path), method.lower())
        for route in runtime.app.routes
        for method in (route.methods or ()) - {"HEAD"}
    }
    doc = httpx.get(runtime.url + "/openapi.json").json()
    assert served == operations(doc)


schema = schemathesis.openapi.from_dict(DOCUMENT)


def _aim_at_the_model(case: schemathesis.Case) -> None:
    """Generated names become the served model's, except one-character ones
    (repeatable, and common enough): so generation runs, and 404s still come."""
    params = case.path_parameters or {}
    for key, served in (("name", MODEL), ("model", MODEL), ("version", "1")):
        if isinstance(params.get(key), str) and len(params[key]) != 1:
            params[key] = served
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) != 1:
        body["model"] = MODEL


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_runtime_keeps_its_openapi_promises(case, runtime):
    _aim_at_the_model(case)
    case.call_and_validate(base_url=runtime.url, checks=OPENAPI_CHECKS, timeout=60)
