"""GET /openapi.json: the router's OpenAPI document, and schemathesis holding
the router to it, in front of a real runtime (a byte-level model served by
`terrace-runtime`'s app on uvicorn): generated requests, valid and invalid,
get no server error from the router and no answer the document does not
describe, and requests that break the document's request schemas are
refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from router_harness import ServerThread
from runtime_harness import MODEL, OPENAPI_CHECKS, ServedRuntime, build_byte_model
from starlette.applications import Starlette
from terrace_router.app import VERSION, create_app
from terrace_router.config import RouterConfig
from terrace_router.openapi import document
from terrace_router.schemas import ChatCompletionRequest, CompletionRequest

DOCUMENT = document(VERSION)
TOKEN_LIMIT = 24
MODELS = ("auto", "small", "large")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Starlette]]:
    """The router's URL and its app, in front of a real runtime."""
    model = build_byte_model(tmp_path_factory.mktemp("byte-model"))
    with ServedRuntime(model, max_tokens_limit=TOKEN_LIMIT) as runtime:
        tier = {"endpoints": [runtime.url], "upstreamModel": MODEL, "readTimeoutSeconds": 30}
        cfg = RouterConfig.model_validate(
            {
                "tiers": [
                    {"name": "small", **tier},
                    {"name": "large", **tier},
                    {"name": "tensor", **tier, "protocol": "v2"},
                ],
                "cache": {"enabled": False},
            }
        )
        app = create_app(cfg)
        server = ServerThread(app).start()
        try:
            yield server.url, app
        finally:
            server.stop()


@pytest.fixture
def router(served: tuple[str, Starlette]) -> str:
    return served[0]


HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The endpoints the router's documentation promises, written out here.
DOCUMENTED = {
    ("/v1/chat/completions", "post"),
    ("/v1/completions", "post"),
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
    # OpenAI's Files and Batch APIs, forwarded to terrace-batch (docs/batch.md).
    ("/v1/files", "get"),
    ("/v1/files", "post"),
    ("/v1/files/{file_id}", "get"),
    ("/v1/files/{file_id}", "delete"),
    ("/v1/files/{file_id}/content", "get"),
    ("/v1/batches", "get"),
    ("/v1/batches", "post"),
    ("/v1/batches/{batch_id}", "get"),
    ("/v1/batches/{batch_id}/cancel", "post"),
}


def operations(doc: dict) -> set[tuple[str, str]]:
    """(path, method) of every operation in an OpenAPI document."""
    return {(p, m) for p, item in doc["paths"].items() for m in item if m in HTTP_METHODS}


def routed(app: Starlette) -> set[tuple[str, str]]:
    """(path, method) the app routes, in OpenAPI's spelling of a path."""
    return {
        (re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path), method.lower())
        for route in app.routes
        for method in (route.methods or ()) - {"HEAD"}
    }


def test_the_document_describes_every_endpoint(served):
    router, app = served
    doc = httpx.get(router + "/openapi.json").json()
    assert doc["openapi"] == "3.1.0"
    # Every route the app serves, and nothing else, is documented; and that
    # is the list written out here.
    assert operations(doc) == routed(app)
    assert operations(doc) == DOCUMENTED
    paths = doc["paths"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"200", "400", "429", "502", "503", "504"} <= set(responses)
        assert "Retry-After" in responses["429"]["headers"]
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    schemas = doc["components"]["schemas"]
    assert set(schemas["CompletionRequest"]["properties"]) == set(CompletionRequest.model_fields)
    assert set(schemas["ChatCompletionRequest"]["properties"]) == set(
        ChatCompletionRequest.model_fields
    )


schema = schemathesis.openapi.from_dict(DOCUMENT)


def _aim_at_the_tiers(case: schemathesis.Case) -> None:
    """Generated model names become served ones, except names of 0 or 1 characters
    (repeatable, and common enough): so requests reach the tiers, and 404s
    still come."""
    params = case.path_parameters or {}
    for key, served in (("name", "tensor"), ("model", "small"), ("version", "1")):
        if isinstance(params.get(key), str) and len(params[key]) > 1:
            params[key] = served
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str) and len(body["model"]) > 1:
        body["model"] = MODELS[len(body["model"]) % len(MODELS)]


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_router_keeps_its_openapi_promises(case, router):
    _aim_at_the_tiers(case)
    case.call_and_validate(base_url=router, checks=OPENAPI_CHECKS, timeout=60)
