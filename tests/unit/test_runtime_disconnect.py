"""A client that goes away stops its generation, streaming or not: the
runtime watches the connection while it generates and cancels the request's
sequences in the engine when the client disconnects. Metrics count such a
request once (status 499 when no answer was sent), never as a server error."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from runtime_harness import MODEL, PROBE_TOKENS, ServedRuntime, build_byte_model

# Far more than the test waits for: ~20 s of generation on the byte model.
MAX_TOKENS = 100_000


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRuntime]:
    model = build_byte_model(tmp_path_factory.mktemp("byte-model"))
    with ServedRuntime(model, max_tokens_limit=MAX_TOKENS) as served:
        yield served


def _leave_generating(runtime: ServedRuntime, path: str, body: dict[str, object]) -> None:
    """POST `body` on a raw socket and close it once the runtime generates
    for it, while the answer is still coming (a stream; its head has come)
    or has not come (otherwise)."""
    raw = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    before = runtime.metric("terrace_runtime_tokens_generated_total")
    with socket.create_connection(("127.0.0.1", runtime.port)) as conn:
        conn.sendall(head + raw)
        runtime.wait_generating(before)
        if body.get("stream"):
            conn.settimeout(30)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        else:
            conn.settimeout(0)
            with pytest.raises(BlockingIOError):
                conn.recv(1)  # no answer yet: it is still generating


CASES = {
    "completions": ("/v1/completions", "completions", {"prompt": "Once"}),
    "completions-n2": ("/v1/completions", "completions", {"prompt": ["a", "b"], "n": 2}),
    "chat": (
        "/v1/chat/completions",
        "chat_completions",
        {"messages": [{"role": "user", "content": "Hi"}]},
    ),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_stops_its_generation(runtime, case, stream):
    path, endpoint, extra = CASES[case]
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream}
    start = runtime.settled_tokens()
    statuses = {
        s: runtime.metric("terrace_runtime_requests_total", endpoint=endpoint, status=s)
        for s in ("200", "499", "500")
    }

    _leave_generating(runtime, path, {**body, **extra})

    runtime.wait_idle()
    idle = runtime.metric("terrace_runtime_tokens_generated_total")
    generated = idle - start
    sequences = 4 if case == "completions-n2" else 1
    assert 0 < generated < MAX_TOKENS * sequences / 4, generated
    # Counted once: a stream had sent its 200; an unanswered request is a 499.
    counted = "200" if stream else "499"
    for status, was in statuses.items():
        now = runtime.metric("terrace_runtime_requests_total", endpoint=endpoint, status=status)
        assert now - was == (1 if status == counted else 0), status
    # Nothing generates on: a new request adds exactly its own tokens.
    assert runtime.settled_tokens() - idle == PROBE_TOKENS
    assert runtime.metric("terrace_runtime_errors_total", kind="inference") == 0


def test_the_engine_serves_on_after_a_client_left(runtime):
    """The cancelled sequences left the batch: a new request is answered in full."""
    _leave_generating(
        runtime,
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": MAX_TOKENS, "ignore_eos": True},
    )
    runtime.settled_tokens()
    r = httpx.post(
        runtime.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 5, "ignore_eos": True},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert runtime.state.engine is not None and runtime.state.engine.depth == 0
