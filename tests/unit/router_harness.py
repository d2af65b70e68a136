"""What the router's tests stand on: the router served by uvicorn on
127.0.0.1, in front of stub tiers that are real HTTP servers speaking OpenAI
chat/completions (with logprobs) and OIP v2 and that can be told to fail,
stall or answer unsure, and raw TCP tiers for the answers no well-behaved
server gives. Fixtures `servers` and `stubs` are in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families
from served import ServerThread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from terrace_router.app import create_app
from terrace_router.config import RouterConfig

KEY = "sk-terrace-test"
EASY = "What is 2 + 2?"
HARD = (
    "Let G be a finite group and H a subgroup of index p, the smallest prime dividing |G|. "
    "Prove that H is normal in G, then determine, with justification, the number of Sylow "
    "3-subgroups of a simple group of order 168 and explain how the class equation constrains "
    "the conjugacy classes of elements of order 7. Statement 1 | Every integral domain with "
    "finitely many elements is a field. Statement 2 | The polynomial x^4 + 1 is irreducible "
    "over Q but reducible modulo every prime p."
)


# -- stub tiers ---------------------------------------------------------------


@dataclass
class StubControl:
    name: str
    mode: str = "ok"  # ok | fail (500) | slow (sleeps `delay` first)
    delay: float = 0.0
    logprob: float = -0.05  # per sampled token, when logprobs are asked for
    token_delay: float = 0.0  # between streamed tokens
    stream_error: bool = False  # end streams with an in-band error event
    healthy: bool = True  # GET /v1/models and /v2/health/ready answer 200 (else 500)
    gate: threading.Event | None = None  # when set up: requests wait until it is set
    health_checks: int = 0  # GET /v1/models and /v2/health/ready answered
    streams_completed: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0
    max_inflight_seen: int = 0


def stub_app(ctl: StubControl) -> Starlette:
    async def _behave() -> Response | None:
        while ctl.gate is not None and not ctl.gate.is_set():
            await asyncio.sleep(0.01)
        if ctl.mode == "fail":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        if ctl.mode == "slow" or ctl.delay:
            await asyncio.sleep(ctl.delay)
        return None

    async def openai_endpoint(request: Request) -> Response:
        body = await request.json()
        ctl.requests.append(body)
        ctl.inflight += 1
        ctl.max_inflight_seen = max(ctl.max_inflight_seen, ctl.inflight)
        try:
            failure = await _behave()
            if failure is not None:
                return failure
            chat = request.url.path.endswith("/chat/completions")
            text = f"answer from {ctl.name}"
            tokens = text.split()
            if body.get("stream"):
                return StreamingResponse(_sse(body, chat, tokens), media_type="text/event-stream")
            if chat:
                logprobs = (
                    {
                        "content": [
                            {"token": t, "logprob": ctl.logprob, "bytes": None, "top_logprobs": []}
                            for t in tokens
                        ]
                    }
                    if body.get("logprobs")
                    else None
                )
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
                obj = "chat.completion"
            else:
                logprobs = (
                    {
                        "tokens": tokens,
                        "token_logprobs": [ctl.logprob] * len(tokens),
                        "top_logprobs": None,
                        "text_offset": list(range(len(tokens))),
                    }
                    if body.get("logprobs") is not None
                    else None
                )
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "stop"}
                obj = "text_completion"
            return JSONResponse(
                {
                    "id": "cmpl-1",
                    "object": obj,
                    "created": 1,
                    "model": body["model"],
                    "choices": [choice],
                    "usage": {
                        "prompt_tokens": 3,
                        "completion_tokens": len(tokens),
                        "total_tokens": 6,
                    },
                }
            )
        finally:
            ctl.inflight -= 1

    async def _sse(body: dict[str, Any], chat: bool, tokens: list[str]):
        for i, tok in enumerate(tokens):
            if ctl.token_delay:
                await asyncio.sleep(ctl.token_delay)
            piece = tok if i == 0 else " " + tok
            if chat:
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
                obj = "text_completion"
            chunk = {
                "id": "c1",
                "object": obj,
                "created": 1,
                "model": body["model"],
                "choices": [choice],
            }
            yield f"data: {json.dumps(chunk)}\n\n"
        if ctl.stream_error:
            yield 'data: {"error": {"message": "out of memory", "type": "server_error"}}\n\n'
        yield "data: [DONE]\n\n"
        ctl.streams_completed += 1

    async def health(request: Request) -> Response:
        ctl.health_checks += 1
        if not ctl.healthy:
            return JSONResponse({"error": {"message": "broken", "type": "server_error"}}, 500)
        return JSONResponse({"object": "list", "data": [{"id": ctl.name, "object": "model"}]})

    async def v2_model(request: Request) -> Response:
        return JSONResponse(
            {
                "name": request.path_params["name"],
                "platform": "stub",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
            }
        )

    async def v2_infer(request: Request) -> Response:
        body = await request.json()
        ctl.requests.append(body)
        data = body["inputs"][0]["data"]
        return JSONResponse(
            {
                "model_name": request.path_params["name"],
                "id": body.get("id", ""),
                "outputs": [
                    {
                        "name": "y",
                        "datatype": "FP32",
                        "shape": [len(data)],
                        "data": [2 * v for v in data],
                    }
                ],
            }
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", openai_endpoint, methods=["POST"]),
            Route("/v1/completions", openai_endpoint, methods=["POST"]),
            Route("/v1/models", health, methods=["GET"]),
            Route("/v2/health/ready", health, methods=["GET"]),
            Route("/v2/models/{name}", v2_model, methods=["GET"]),
            Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        ]
    )


class RawTier:
    """A TCP server on 127.0.0.1 whose behaviour per connection is a function
    `handler(conn, n)` (the n-th connection): for the answers no well-behaved
    HTTP server gives (stale keep-alive, garbage, truncation, breaking off
    mid-stream)."""

    def __init__(self, handler: Callable[[socket.socket, int], None]) -> None:
        self.handler = handler
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # so the accept loop sees `stop`
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopping = threading.Event()
        self.open: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> RawTier:
        self.thread.start()
        return self

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, n: int) -> None:
        try:
            self.handler(conn, n)
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()
        for conn in self.open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def read_request(conn: socket.socket) -> bytes | None:
    """One HTTP/1.1 request (head and Content-Length body), None at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return None
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            return None
        body += more
    return head


def chat_answer(text: str) -> bytes:
    body = json.dumps(
        {
            "id": "raw",
            "object": "chat.completion",
            "created": 1,
            "model": "small",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


def make_config(
    stubs: dict[str, tuple[StubControl, str]],
    *,
    tiers: tuple[str, ...] = ("small", "large"),
    thresholds: list[float] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "terrace",
        "tiers": [{"name": t, "endpoints": [stubs[t][1]]} for t in tiers],
        "auth": {"apiKeysEnv": "TERRACE_TEST_KEYS"},
        "cache": {"enabled": False},
    }
    if thresholds is not None:
        cfg["calibration"] = {"thresholds": thresholds}
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def serve_router(
    servers: list[Any],
    cfg: dict[str, Any],
    config_path: Path | None = None,
) -> str:
    if config_path is not None:
        app = create_app(config_path=config_path, reload_interval=0.1)
    else:
        app = create_app(RouterConfig.model_validate(cfg))
    srv = ServerThread(app).start()
    servers.append(srv)
    return srv.url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Values of one metric from the router's /metrics, keyed by sorted labels."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def chat(c: openai.OpenAI, prompt: str, model: str = "auto", **kw: Any):
    raw = c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], **kw
    )
    return raw.headers, raw.parse()
