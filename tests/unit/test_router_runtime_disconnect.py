"""Through the router, a client that goes away stops the runtime's work: the
router cancels its attempt and closes the upstream connection, and the
runtime (a byte-level model served by its real app) cancels the
generation. Unary and streaming alike."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from runtime_harness import MODEL, PROBE_TOKENS, ServedRuntime, build_byte_model
from served import ServerThread
from terrace_router.app import create_app
from terrace_router.config import RouterConfig

MAX_TOKENS = 100_000  # ~20 s of generation on the byte model: far more than the test waits


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServedRuntime, int]]:
    model = build_byte_model(tmp_path_factory.mktemp("byte-model"))
    with ServedRuntime(model, max_tokens_limit=MAX_TOKENS) as runtime:
        tier = {"endpoints": [runtime.url], "upstreamModel": MODEL, "readTimeoutSeconds": 60}
        cfg = RouterConfig.model_validate(
            {"tiers": [{"name": "small", **tier}], "cache": {"enabled": False}}
        )
        router = ServerThread(create_app(cfg)).start()
        try:
            yield runtime, router.port
        finally:
            router.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_leaving_the_router_stops_the_runtime(served, stream):
    runtime, port = served
    start = runtime.settled_tokens()
    statuses = {
        s: runtime.metric("terrace_runtime_requests_total", endpoint="completions", status=s)
        for s in ("200", "499", "500")
    }
    body = json.dumps(
        {
            "model": "small",
            "prompt": "def main():",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(head + body)
        runtime.wait_generating(start)  # the router's attempt reached the runtime
        if stream:
            conn.settimeout(30)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        else:
            conn.settimeout(0)
            with pytest.raises(BlockingIOError):
                conn.recv(1)  # no answer yet: still generating
    # The runtime's own evidence: no request in flight any more, the
    # generation stopped short, and the request counted once (a stream had
    # its 200 sent; an unanswered request is a 499).
    runtime.wait_idle()
    assert runtime.metric("terrace_runtime_inflight_requests") == 0
    idle = runtime.metric("terrace_runtime_tokens_generated_total")
    generated = idle - start
    assert 0 < generated < MAX_TOKENS / 10, generated
    counted = "200" if stream else "499"
    for status, was in statuses.items():
        now = runtime.metric(
            "terrace_runtime_requests_total", endpoint="completions", status=status
        )
        assert now - was == (1 if status == counted else 0), (status, was, now)
    # Nothing generates on: a new request adds exactly its own tokens.
    assert runtime.settled_tokens() - idle == PROBE_TOKENS
