"""KServe Open Inference Protocol v2 (REST): health, model metadata, infer,
with the binary tensor data extension (tensors.py decodes and encodes).

Errors use the protocol's shape `{"error": "<message>"}`: 400 for a request
the model cannot take (wrong name, shape, datatype, data), 404 for another
model's name, 429 with Retry-After when the queue is full, 503 while not ready.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__
from .batching import BatcherClosed, QueueFull
from .http import (
    DECODE_ERRORS,
    MAX_BODY_BYTES,
    BadBody,
    BodyTooLarge,
    ClientGone,
    dumps,
    instrumented,
    json_body,
    json_response,
    loads,
    state_of,
    unless_client_leaves,
)
from .state import RuntimeState
from .tensors import InvalidRequest, decode_inputs, decode_outputs, encode_outputs

# Binary tensor data extension: the byte length of the JSON part of a body
# whose tensors' binary data follow it (requests and answers alike).
BINARY_HEADER = "Inference-Header-Content-Length"

# onnxruntime's exception classes for bad feeds (out-of-range ids, ...): the
# client's fault, so 400 rather than 500.
CLIENT_FAULTS = {"InvalidArgument", "InvalidGraph", "NotImplemented", "INVALID_ARGUMENT"}


def _error(
    state: RuntimeState, status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    state.metrics.error(kind)
    return json_response({"error": message}, status, headers)


async def server_metadata(request: Request) -> Response:
    return json_response(
        {"name": "terrace-runtime", "version": __version__, "extensions": ["binary_tensor_data"]}
    )


async def live(request: Request) -> Response:
    return json_response({"live": True})


async def ready(request: Request) -> Response:
    state = state_of(request)
    if state.ready:
        return json_response({"ready": True})
    return json_response({"ready": False, "reason": state.reason}, 503)


def _model_or_error(request: Request) -> tuple[RuntimeState, Response | None]:
    state = state_of(request)
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != state.name or version not in (None, "1"):
        what = f"{name!r}" + (f" version {version!r}" if version else "")
        return state, _error(
            state, 404, "not_found", f"model {what} not found; this runtime serves {state.name!r}"
        )
    return state, None


async def model_ready(request: Request) -> Response:
    state, error = _model_or_error(request)
    if error is not None:
        return error
    if state.ready:
        return json_response({"name": state.name, "ready": True})
    return json_response({"name": state.name, "ready": False, "reason": state.reason}, 503)


async def model_metadata(request: Request) -> Response:
    state, error = _model_or_error(request)
    if error is not None:
        return error
    info = state.info
    if info is None:
        return _error(state, 503, "not_ready", f"model {state.name!r} is not ready: {state.reason}")
    body: dict[str, Any] = {
        "name": state.name,
        "versions": ["1"],
        "platform": info.platform,
        "inputs": [s.to_json() for s in info.inputs],
        "outputs": [s.to_json() for s in info.outputs],
        "parameters": {
            "task": info.task,
            "device": info.device,
            "threads": info.threads,
            "quantization": info.quantization,
            "max_batch_size": state.settings.max_batch_size if info.batchable else 0,
        },
    }
    return json_response(body)


async def infer(request: Request) -> Response:
    state, error = _model_or_error(request)
    if error is not None:
        return error
    if not state.ready or state.batcher is None or state.info is None:
        return _error(state, 503, "not_ready", f"model {state.name!r} is not ready: {state.reason}")
    try:
        body, binary = await _read_body(request)
        arrays = decode_inputs(body, state.info.inputs, binary)
        outputs = decode_outputs(body, state.info.outputs)
    except (BadBody, InvalidRequest) as exc:
        return _error(state, 400, "invalid_request", str(exc))
    try:
        # A client that leaves takes its request out of the batch queue (499).
        result = await unless_client_leaves(request, state.batcher.infer(arrays, list(outputs)))
    except QueueFull as exc:
        return _error(state, 429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after_s)})
    except BatcherClosed as exc:
        return _error(state, 503, "not_ready", str(exc))
    except InvalidRequest as exc:  # the backend's own check (an ONNX string that is not UTF-8)
        return _error(state, 400, "invalid_request", str(exc))
    except Exception as exc:
        if type(exc).__name__ in CLIENT_FAULTS:
            return _error(state, 400, "invalid_request", f"the model rejected the inputs: {exc}")
        state.metrics.error("inference")
        return json_response({"error": f"inference failed: {type(exc).__name__}"}, 500)
    state.metrics.observe_request_energy(result.joules)
    try:
        tensors, tail = encode_outputs(result.outputs, outputs)
    except InvalidRequest as exc:  # non-UTF-8 BYTES asked for as JSON
        return _error(state, 400, "invalid_request", str(exc))
    answer: dict[str, Any] = {"model_name": state.name, "model_version": "1", "outputs": tensors}
    if isinstance(body.get("id"), str):
        answer["id"] = body["id"]
    if not any(outputs.values()):
        return json_response(answer)
    head = dumps(answer)
    return Response(
        head + tail, 200, {BINARY_HEADER: str(len(head))}, media_type="application/octet-stream"
    )


async def _read_body(request: Request) -> tuple[Any, bytes]:
    """The JSON part of an infer request and the binary tensor data after it
    (none without the Inference-Header-Content-Length header). Raises BadBody
    as json_body does, ClientGone when the client leaves while sending it."""
    header = request.headers.get(BINARY_HEADER)
    if header is None:
        return await json_body(request), b""
    too_big = BodyTooLarge(f"request body over {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone from None
    if len(raw) > MAX_BODY_BYTES:
        raise too_big
    if not (header.isascii() and header.isdigit() and int(header) <= len(raw)):
        raise BadBody(
            f"{BINARY_HEADER} must be the byte length of the body's JSON part, "
            f"0 to {len(raw)}; got {header!r}"
        )
    length = int(header)
    try:
        return loads(raw[:length]), raw[length:]
    except DECODE_ERRORS as exc:
        raise BadBody(f"the first {length} bytes of the body are not valid JSON: {exc}") from None


def routes() -> list[Route]:
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2/models/{name}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{name}/infer", instrumented("infer", infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route(
            "/v2/models/{name}/versions/{version}/infer",
            instrumented("infer", infer),
            methods=["POST"],
        ),
    ]
