"""The router end to end: the real `openai` client (sync, async, streaming)
against the router served by uvicorn on 127.0.0.1, in front of stub tiers
that are real HTTP servers speaking OpenAI chat/completions (with logprobs)
and OIP v2, and that can be told to fail, stall or answer unsure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families
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
    streams_completed: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    inflight: int = 0
    max_inflight_seen: int = 0


def stub_app(ctl: StubControl) -> Starlette:
    async def _behave() -> Response | None:
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
        yield "data: [DONE]\n\n"
        ctl.streams_completed += 1

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
            Route("/v2/models/{name}", v2_model, methods=["GET"]),
            Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        ]
    )


class ServerThread:
    """A uvicorn server on 127.0.0.1 (a port the OS picks) in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


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


@pytest.fixture
def servers() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for s in reversed(started):
        s.stop()


@pytest.fixture
def stubs(servers: list[ServerThread]) -> dict[str, tuple[StubControl, str]]:
    out = {}
    for name in ("small", "medium", "large", "small-b"):
        ctl = StubControl(name)
        srv = ServerThread(stub_app(ctl)).start()
        servers.append(srv)
        out[name] = (ctl, srv.url)
    return out


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


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TERRACE_TEST_KEYS", f"other-key,{KEY}")


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


# -- routing ------------------------------------------------------------------


def test_easy_prompt_goes_to_first_tier_and_hard_to_last(stubs, servers):
    from terrace_router.classifier import Classifier

    clf = Classifier.load("builtin")
    easy, hard = clf.score(EASY), clf.score(HARD)
    assert easy < hard, (easy, hard)  # the built-in classifier tells them apart
    url = serve_router(
        servers,
        make_config(
            stubs,
            tiers=("small", "medium", "large"),
            thresholds=[(easy + hard) / 2, (hard + 1.0) / 2 + 1],
        ),
    )
    c = client(url)
    headers, resp = chat(c, EASY)
    assert headers["x-terrace-tier"] == "small"
    assert resp.choices[0].message.content == "answer from small"
    assert abs(float(headers["x-terrace-complexity"]) - easy) < 1e-3
    assert "x-terrace-escalated" not in headers
    # The upstream is asked for its own model name, not "auto".
    assert stubs["small"][0].requests[-1]["model"] == "small"

    headers, resp = chat(c, HARD)
    assert headers["x-terrace-tier"] == "medium"

    url = serve_router(
        servers, make_config(stubs, tiers=("small", "large"), thresholds=[(easy + hard) / 2])
    )
    headers, resp = chat(client(url), HARD)
    assert headers["x-terrace-tier"] == "large"
    assert resp.choices[0].message.content == "answer from large"


def test_router_scores_a_long_prompt_as_the_cli_does(stubs, servers, capsys):
    """One owner for clipping: a 20,000-character exam prompt gets the same score
    from the router as from `terrace-classifier score` (no second clip)."""
    from terrace_router.classifier import cli

    stem = "A contract dispute arose between a builder and a homeowner over delays. " * 280
    long = stem[:19950] + "\nA. breach\nB. waiver\nC. estoppel\nD. novation\nAnswer:"
    assert len(long) > 19_990
    assert cli.main(["score", long]) == 0
    expected = float(capsys.readouterr().out)
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    headers, _ = chat(client(url), long)
    assert headers["x-terrace-complexity"] == f"{expected:.4f}"
    raw = client(url).completions.with_raw_response.create(model="auto", prompt=long,
                                                           max_tokens=5)
    assert raw.headers["x-terrace-complexity"] == f"{expected:.4f}"


def test_a_lone_surrogate_in_an_exam_prompt_is_routed_not_a_500(stubs, servers):
    # JSON can carry a lone surrogate (\\ud800); the encoder must still read it.
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    body = ('{"model": "auto", "messages": [{"role": "user", "content": "Which organelle '
            'is the site of aerobic respiration in eukaryotic cells, the mito\\ud800chondrion or '
            'another?\\nA. Ribosome\\nB. Mitochondrion\\nC. Golgi apparatus\\nD. Lysosome'
            '\\nAnswer:"}]}')
    r = httpx.post(url + "/v1/chat/completions", content=body,
                   headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert 0.0 <= float(r.headers["x-terrace-complexity"]) <= 1.0


def test_an_encoder_failure_routes_by_the_prior_not_a_lost_request(stubs, servers,
                                                                  monkeypatch):
    from terrace_router.classifier import Classifier
    from terrace_router.classifier.encoder import SentenceEncoder

    exam = ("Which organelle is the site of aerobic respiration in eukaryotic cells?\n"
            "A. Ribosome\nB. Mitochondrion\nC. Golgi apparatus\nD. Lysosome\nAnswer:")
    clf = Classifier.load("builtin")
    assert clf.needs_encoder(clf.features(exam))
    prior = float(clf.model.prior(clf.features(exam))[0])

    def broken(self, texts, batch_size=32):
        raise RuntimeError("onnxruntime failed")

    monkeypatch.setattr(SentenceEncoder, "embed", broken)
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    headers, resp = chat(client(url), exam)
    assert resp.choices[0].message.content == "answer from small"
    assert headers["x-terrace-complexity"] == f"{prior:.4f}"


def test_live_calibration_routes_with_the_builtin_classifier(stubs, servers):
    # No pinned thresholds: the calibrator decides. Whatever it picks, the
    # answer comes from a real tier and the header says which.
    url = serve_router(servers, make_config(stubs))
    c = client(url)
    seen = set()
    for prompt in (EASY, HARD) * 3:
        headers, resp = chat(c, prompt)
        assert headers["x-terrace-tier"] in ("small", "large")
        assert resp.choices[0].message.content == f"answer from {headers['x-terrace-tier']}"
        seen.add(headers["x-terrace-tier"])
    metrics = httpx.get(url + "/metrics").text
    assert 'terrace_router_tier_share{tier="small"}' in metrics
    assert "terrace_router_complexity_count 6.0" in metrics


def test_tier_name_pins_the_tier_and_unknown_model_is_404(stubs, servers):
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))  # auto -> small
    c = client(url)
    headers, resp = chat(c, EASY, model="large")
    assert headers["x-terrace-tier"] == "large"
    headers, resp = chat(c, EASY, model="terrace")  # the router's own name = auto
    assert headers["x-terrace-tier"] == "small"
    with pytest.raises(openai.NotFoundError) as exc:
        chat(c, EASY, model="gpt-99")
    assert exc.value.body["param"] == "model"
    ids = [m.id for m in c.models.list()]
    assert ids == ["terrace", "auto", "small", "large"]


def test_completions_sync_and_async(stubs, servers):
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    raw = client(url).completions.with_raw_response.create(model="auto", prompt=EASY, max_tokens=5)
    assert raw.headers["x-terrace-tier"] == "small"
    assert raw.parse().choices[0].text == "answer from small"

    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        try:
            results = await asyncio.gather(
                *[
                    ac.chat.completions.create(
                        model="auto", messages=[{"role": "user", "content": EASY}]
                    )
                    for _ in range(20)
                ]
            )
        finally:
            await ac.close()
        return [r.choices[0].message.content for r in results]

    assert asyncio.run(run()) == ["answer from small"] * 20


# -- escalation ---------------------------------------------------------------


def test_low_confidence_answer_is_escalated_using_logprobs(stubs, servers):
    small = stubs["small"][0]
    small.logprob = -6.0  # the small model is guessing
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    headers, resp = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "large"
    assert headers["x-terrace-escalated"] == "low_confidence"
    assert resp.choices[0].message.content == "answer from large"
    assert small.requests[-1]["logprobs"] is True  # the router asked for the signal
    assert "logprobs" not in stubs["large"][0].requests[-1]  # ... only where it checks
    assert resp.choices[0].logprobs is None

    small.logprob = -0.1  # sure: kept, and the logprobs the router added are stripped
    headers, resp = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "small"
    assert resp.choices[0].logprobs is None
    # Asked for by the client: kept.
    headers, resp = chat(client(url), EASY, logprobs=True)
    assert resp.choices[0].logprobs.content[0].logprob == pytest.approx(-0.1)

    metrics = httpx.get(url + "/metrics").text
    assert 'terrace_router_escalations_total{reason="low_confidence"} 1.0' in metrics


def test_low_confidence_escalation_can_be_switched_off(stubs, servers):
    stubs["small"][0].logprob = -6.0
    url = serve_router(
        servers, make_config(stubs, thresholds=[2.0], escalation={"onLowConfidence": False})
    )
    headers, _ = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "small"
    assert "logprobs" not in stubs["small"][0].requests[-1]


def test_tier_returning_500_is_escalated_past(stubs, servers):
    stubs["small"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    headers, resp = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "large"
    assert headers["x-terrace-escalated"] == "error"
    assert resp.choices[0].message.content == "answer from large"


def test_tier_timing_out_is_escalated_past(stubs, servers):
    small = stubs["small"][0]
    small.mode, small.delay = "slow", 3.0
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["readTimeoutSeconds"] = 0.3
    url = serve_router(servers, cfg)
    headers, resp = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "large"
    assert headers["x-terrace-escalated"] == "timeout"
    metrics = httpx.get(url + "/metrics").text
    assert 'terrace_router_escalations_total{reason="timeout"} 1.0' in metrics


def test_every_tier_failing_is_a_503_with_retry_after(stubs, servers):
    stubs["small"][0].mode = stubs["large"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client(url), EASY)
    assert exc.value.status_code == 503
    assert int(exc.value.response.headers["retry-after"]) >= 1
    assert exc.value.body["code"] == "service_unavailable"
    assert exc.value.response.headers["x-terrace-escalated"] == "error"
    assert exc.value.response.headers["x-terrace-tier"] == "none"
    assert float(exc.value.response.headers["x-terrace-complexity"]) >= 0


def test_errors_escalation_off_gives_503_not_the_next_tier(stubs, servers):
    stubs["small"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0], escalation={"onError": False}))
    with pytest.raises(openai.InternalServerError):
        chat(client(url), EASY)
    assert stubs["large"][0].requests == []


def test_failing_endpoint_is_ejected_and_its_peer_serves(stubs, servers):
    bad, good = stubs["small"][0], stubs["small-b"][0]
    bad.mode = "fail"
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [stubs["small"][1], stubs["small-b"][1]]
    cfg["tiers"][0]["ejectAfterFailures"] = 2
    cfg["tiers"][0]["ejectSeconds"] = 60
    url = serve_router(servers, cfg)
    c = client(url)
    tiers = [chat(c, EASY)[0]["x-terrace-tier"] for _ in range(12)]
    # At most two requests met the bad endpoint (then escalated); the rest
    # stayed on the small tier through its healthy peer.
    assert len(bad.requests) == 2
    assert tiers.count("large") == 2 and tiers.count("small") == 10
    assert len(good.requests) == 10


def test_overloaded_tier_sheds_to_the_next(stubs, servers):
    small = stubs["small"][0]
    small.mode, small.delay = "slow", 1.0
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["maxInflightPerEndpoint"] = 2
    url = serve_router(servers, cfg)

    async def run() -> list[tuple[str, str | None]]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        try:
            raws = await asyncio.gather(
                *[
                    ac.chat.completions.with_raw_response.create(
                        model="auto", messages=[{"role": "user", "content": EASY}]
                    )
                    for _ in range(6)
                ]
            )
        finally:
            await ac.close()
        return [(r.headers["x-terrace-tier"], r.headers.get("x-terrace-escalated")) for r in raws]

    served = asyncio.run(run())
    assert sorted(served) == [("large", "overload")] * 4 + [("small", None)] * 2
    assert small.max_inflight_seen == 2


def test_everything_overloaded_is_a_429_with_retry_after(stubs, servers):
    for name in ("small", "large"):
        stubs[name][0].mode, stubs[name][0].delay = "slow", 1.0
    cfg = make_config(stubs, thresholds=[2.0])
    for t in cfg["tiers"]:
        t["maxInflightPerEndpoint"] = 1

    url = serve_router(servers, cfg)

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as hc:
            rs = await asyncio.gather(
                *[
                    hc.post(
                        url + "/v1/chat/completions",
                        headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "auto", "messages": [{"role": "user", "content": EASY}]},
                    )
                    for _ in range(4)
                ]
            )
        for r in rs:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
        return sorted(r.status_code for r in rs)

    assert asyncio.run(run()) == [200, 200, 429, 429]


# -- streaming ----------------------------------------------------------------


def test_streaming_ends_with_done_and_escalates_before_first_byte(stubs, servers):
    stubs["small"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    c = client(url)
    with c.chat.completions.with_streaming_response.create(
        model="auto", messages=[{"role": "user", "content": EASY}], stream=True
    ) as resp:
        assert resp.headers["x-terrace-tier"] == "large"
        assert resp.headers["x-terrace-escalated"] == "error"
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines[:-1])
    assert text == "answer from large"

    # The client's own stream iterator (consumes [DONE] itself).
    stubs["small"][0].mode = "ok"
    parts = [
        ch.choices[0].text for ch in c.completions.create(model="auto", prompt=EASY, stream=True)
    ]
    assert "".join(parts) == "answer from small"

    async def run() -> str:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        try:
            stream = await ac.chat.completions.create(
                model="large", messages=[{"role": "user", "content": EASY}], stream=True
            )
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])
        finally:
            await ac.close()

    assert asyncio.run(run()) == "answer from large"
    # Every stream released its in-flight slot.
    inflight = samples(url, "terrace_router_inflight")
    assert len(inflight) == 2 and all(v == 0 for v in inflight.values())


def test_client_leaving_mid_stream_frees_the_slot(stubs, servers):
    large = stubs["large"][0]
    large.token_delay = 2.0  # a 6 s stream; the client leaves after the first token
    url = serve_router(servers, make_config(stubs))
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "large", "stream": True, "messages": [{"role": "user", "content": EASY}]},
    ) as r:
        lines = r.iter_lines()  # kept: dropping the iterator would close the stream now
        assert next(lines).startswith("data: ")
        assert (
            samples(url, "terrace_router_inflight")[
                (("endpoint", stubs["large"][1]), ("tier", "large"))
            ]
            == 1
        )
    deadline = time.monotonic() + 20
    while any(samples(url, "terrace_router_inflight").values()):
        assert time.monotonic() < deadline, "in-flight slot never released"
        time.sleep(0.05)
    # Released because the router noticed the client leaving and hung up on
    # the upstream, not because the upstream happened to finish.
    assert large.streams_completed == 0


def test_error_then_timeout_escalate_through_three_tiers_and_stream(stubs, servers):
    stubs["small"][0].mode = "fail"
    stubs["medium"][0].mode, stubs["medium"][0].delay = "slow", 3.0
    cfg = make_config(stubs, tiers=("small", "medium", "large"), thresholds=[2.0, 3.0])
    cfg["tiers"][1]["readTimeoutSeconds"] = 0.3
    url = serve_router(servers, cfg)
    c = client(url)
    headers, resp = chat(c, EASY)
    assert headers["x-terrace-escalated"] == "error,timeout"
    assert resp.choices[0].message.content == "answer from large"
    text = "".join(
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": EASY}], stream=True
        )
    )
    assert text == "answer from large"


@pytest.mark.parametrize("breaks", ["close", "stall"])
def test_upstream_breaking_mid_stream_ends_the_stream_in_band(stubs, servers, breaks):
    first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "small"}
    first["choices"] = [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]
    event = f"data: {json.dumps(first)}\n\n".encode()

    def handler(conn: socket.socket, n: int) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + f"{len(event):x}\r\n".encode() + event + b"\r\n"
        )
        if breaks == "stall":
            time.sleep(3)  # past the tier's read timeout: each chunk wait is bounded
        # then the connection closes without the terminating chunk

    raw = RawTier(handler).start()
    servers.append(raw)
    cfg = make_config(stubs)
    cfg["tiers"][0]["endpoints"] = [raw.url]
    cfg["tiers"][0]["readTimeoutSeconds"] = 0.5
    url = serve_router(servers, cfg)
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {KEY}"},
        json={"model": "small", "stream": True, "messages": [{"role": "user", "content": EASY}]},
        timeout=30,
    ) as r:
        assert r.status_code == 200 and r.headers["x-terrace-tier"] == "small"
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == event.decode().strip()
    assert json.loads(lines[1][6:])["error"]["type"] == "server_error"
    assert lines[-1] == "data: [DONE]"
    assert not any(samples(url, "terrace_router_inflight").values())


# -- upstream wire behaviour ------------------------------------------------------


def test_stale_keepalive_connection_is_retried_once_on_a_fresh_one(stubs, servers):
    def handler(conn: socket.socket, n: int) -> None:
        # Answers the first request of each connection; on the second it
        # closes without a byte, like a server whose idle timeout just fired.
        read_request(conn)
        conn.sendall(chat_answer(f"answer {n}"))
        read_request(conn)

    raw = RawTier(handler).start()
    servers.append(raw)
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    url = serve_router(servers, cfg)
    c = client(url)
    answers = [chat(c, EASY) for _ in range(2)]
    assert [resp.choices[0].message.content for _, resp in answers] == ["answer 1", "answer 2"]
    assert all(h["x-terrace-tier"] == "small" for h, _ in answers)
    assert not any("x-terrace-escalated" in h for h, _ in answers)
    assert raw.connections == 2
    assert stubs["large"][0].requests == []


def test_refused_endpoint_moves_to_the_tiers_next_endpoint(stubs, servers):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [refused, stubs["small"][1]]
    url = serve_router(servers, cfg)
    c = client(url)
    for _ in range(2):  # the rotation starts at each endpoint once
        headers, resp = chat(c, EASY)
        assert headers["x-terrace-tier"] == "small" and "x-terrace-escalated" not in headers
        assert resp.choices[0].message.content == "answer from small"


@pytest.mark.parametrize("answer", ["garbage", "truncated", "silent-close"])
def test_malformed_upstream_answers_are_errors_in_the_protocols_shape(stubs, servers, answer):
    def handler(conn: socket.socket, n: int) -> None:
        while read_request(conn) is not None:
            if answer == "garbage":
                conn.sendall(b"SMTP ready\r\n\r\n")
            elif answer == "truncated":
                conn.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"only": ')
            return  # and close

    raw = RawTier(handler).start()
    servers.append(raw)
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    cfg["tiers"].append({"name": "tensor", "endpoints": [raw.url], "protocol": "v2"})
    url = serve_router(servers, cfg)
    c = client(url)
    # Escalated past like a 500...
    headers, resp = chat(c, EASY)
    assert headers["x-terrace-tier"] == "large" and headers["x-terrace-escalated"] == "error"
    assert resp.choices[0].message.content == "answer from large"
    # ...and with nowhere to go, a clean OpenAI error (no traceback, nothing upstream leaks).
    with pytest.raises(openai.InternalServerError) as exc:
        chat(c, EASY, model="small")
    assert exc.value.status_code == 503
    assert exc.value.body["code"] == "service_unavailable"
    assert set(exc.value.response.json()["error"]) == {"message", "type", "param", "code"}
    # OIP v2 answers a bad gateway in its own `{"error": ...}` shape.
    r = httpx.post(
        url + "/v2/models/tensor/infer",
        headers={"authorization": f"Bearer {KEY}"},
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    )
    assert r.status_code == 502 and set(r.json()) == {"error"}
    assert "Traceback" not in r.text and "SMTP" not in r.text


# -- cache --------------------------------------------------------------------


def test_cache_hit_is_marked_and_counted(stubs, servers):
    url = serve_router(
        servers, make_config(stubs, thresholds=[2.0], cache={"ttlSeconds": 60, "maxEntries": 10})
    )
    c = client(url)
    h1, r1 = chat(c, EASY, temperature=0)
    h2, r2 = chat(c, EASY, temperature=0)
    assert h1.get("x-terrace-cache") == "miss" and h2["x-terrace-cache"] == "hit"
    assert h2["x-terrace-tier"] == "small"
    assert r1 == r2
    assert len(stubs["small"][0].requests) == 1
    h3, _ = chat(c, EASY, temperature=0.7)  # non-deterministic: not cached
    h4, _ = chat(c, EASY, temperature=0.7)
    assert "x-terrace-cache" not in h3 and "x-terrace-cache" not in h4
    assert len(stubs["small"][0].requests) == 3
    assert "terrace_router_cache_hits_total 1.0" in httpx.get(url + "/metrics").text


def test_streamed_answers_are_cached_when_configured(stubs, servers):
    cfg = make_config(
        stubs,
        thresholds=[2.0],
        cache={"ttlSeconds": 60, "maxEntries": 10, "includeStreaming": True},
    )
    url = serve_router(servers, cfg)
    bodies, marks = [], []
    for _ in range(2):
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={
                "model": "auto",
                "stream": True,
                "temperature": 0,
                "messages": [{"role": "user", "content": EASY}],
            },
        ) as r:
            marks.append(r.headers["x-terrace-cache"])
            assert r.headers["content-type"].startswith("text/event-stream")
            bodies.append(r.read())
    assert marks == ["miss", "hit"]
    assert bodies[0] == bodies[1] and bodies[1].rstrip().endswith(b"data: [DONE]")
    assert len(stubs["small"][0].requests) == 1


# -- security and input -------------------------------------------------------


def test_bad_or_missing_key_gets_401_in_openai_shape(stubs, servers):
    url = serve_router(servers, make_config(stubs))
    with pytest.raises(openai.AuthenticationError) as exc:
        chat(client(url, key="sk-wrong"), EASY)
    assert exc.value.status_code == 401
    assert set(exc.value.body) == {"message", "type", "param", "code"}
    assert exc.value.body["code"] == "invalid_api_key"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "auto", "messages": []})
    assert r.status_code == 401 and "error" in r.json()
    with pytest.raises(openai.AuthenticationError):
        client(url, key="sk-wrong").models.list()
    assert stubs["small"][0].requests == [] and stubs["large"][0].requests == []
    # Health and metrics stay open for probes and Prometheus.
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/readyz").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_malformed_body_gets_400_naming_the_field(stubs, servers):
    url = serve_router(servers, make_config(stubs))
    c = client(url)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="auto", messages=[{"role": "wizard", "content": "hi"}])
    assert exc.value.body["param"] == "messages.[0].role"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], temperature=7
        )
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens="many"
        )  # type: ignore[arg-type]
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model="auto", prompt=None)  # type: ignore[arg-type]
    assert exc.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="auto", messages=[])
    assert exc.value.body["param"] == "messages"
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


def test_10mb_body_gets_413(stubs, servers):
    url = serve_router(servers, make_config(stubs))
    big = "x" * (10 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as exc:
        client(url).chat.completions.create(
            model="auto", messages=[{"role": "user", "content": big}]
        )
    assert exc.value.status_code == 413
    assert exc.value.body["code"] == "request_too_large"

    # Without Content-Length (chunked): counted while reading.
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(
        url + "/v1/chat/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 413
    assert stubs["small"][0].requests == [] and stubs["large"][0].requests == []


# -- OIP v2 -------------------------------------------------------------------


def test_oip_v2_passthrough_to_the_tier_serving_the_model(stubs, servers):
    cfg = make_config(stubs)
    cfg["tiers"].append(
        {
            "name": "tensor",
            "endpoints": [stubs["medium"][1]],
            "protocol": "v2",
            "upstreamModel": "doubler",
        }
    )
    url = serve_router(servers, cfg)
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    meta = httpx.get(url + "/v2/models/doubler", headers=auth)
    assert meta.status_code == 200 and meta.json()["name"] == "doubler"
    body = {
        "id": "r1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.5]}],
    }
    r = httpx.post(url + "/v2/models/tensor/infer", json=body, headers=auth)  # by tier name
    assert r.status_code == 200
    assert r.headers["x-terrace-tier"] == "tensor"
    assert r.json()["outputs"][0]["data"] == [2.0, 4.0, 7.0]
    assert r.json()["model_name"] == "doubler"
    assert httpx.post(url + "/v2/models/tensor/infer", json=body).status_code == 401
    missing = httpx.get(url + "/v2/models/nope", headers=auth)
    assert missing.status_code == 404 and "error" in missing.json()
    # A v2-only tier is not an OpenAI model.
    with pytest.raises(openai.BadRequestError):
        chat(client(url), EASY, model="tensor")


# -- the console script --------------------------------------------------------


def test_quick_mode_cli_serves_and_stops(stubs, tmp_path):
    import shutil
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        shutil.which("terrace-router") or "terrace-router",
        "serve",
        "--tier",
        f"small={stubs['small'][1]}",
        "--tier",
        f"large={stubs['large'][1]}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "router never became ready"
            time.sleep(0.1)
        # Quick mode has no keys: open. Auto-routed with the built-in classifier.
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        headers, resp = chat(c, EASY)
        assert headers["x-terrace-tier"] in ("small", "large")
        assert resp.choices[0].message.content == f"answer from {headers['x-terrace-tier']}"
        assert [m.id for m in c.models.list()] == ["auto", "small", "large"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it.
    assert proc.returncode in (0, -15)
    assert proc.stdout is not None and b"Traceback" not in proc.stdout.read()


def test_cli_refuses_a_bad_table_cleanly(tmp_path):
    import shutil
    import subprocess

    bad = tmp_path / "router.yaml"
    bad.write_text("tiers:\n- name: small\n  endpoints: []\n")
    out = subprocess.run(
        [
            shutil.which("terrace-router") or "terrace-router",
            "serve",
            "--config",
            str(bad),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "invalid routing table" in out.stderr and "Traceback" not in out.stderr


# -- hot reload ---------------------------------------------------------------


def _write_configmap(root: Path, cfg: dict[str, Any], generation: int) -> None:
    """Update a directory the way kubelet updates a mounted ConfigMap: write a
    new timestamped dir, then atomically swap the `..data` symlink."""
    new = root / f"..{generation}"
    new.mkdir()
    (new / "router.yaml").write_text(yaml.safe_dump(cfg))
    tmp = root / "..data_tmp"
    tmp.symlink_to(new.name)
    os.replace(tmp, root / "..data")
    if not (root / "router.yaml").exists():
        (root / "router.yaml").symlink_to("..data/router.yaml")


def test_reload_swaps_tiers_without_failing_requests_in_flight(stubs, servers, tmp_path):
    old, new = stubs["small"][0], stubs["medium"][0]
    old.delay = 0.3  # requests in flight across the swap
    _write_configmap(tmp_path, make_config(stubs, tiers=("small", "large"), thresholds=[2.0]), 1)
    url = serve_router(servers, {}, config_path=tmp_path / "router.yaml")

    async def run() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        served: list[str] = []
        stop = asyncio.Event()

        async def worker() -> None:
            while not stop.is_set():
                raw = await ac.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": EASY}]
                )
                served.append(raw.headers["x-terrace-tier"])
                assert raw.parse().choices[0].message.content.startswith("answer from")

        try:
            workers = [asyncio.create_task(worker()) for _ in range(8)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(
                _write_configmap,
                tmp_path,
                make_config(stubs, tiers=("medium", "large"), thresholds=[2.0]),
                2,
            )
            deadline = time.monotonic() + 10
            while "medium" not in served and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)  # any failed request raises here
        finally:
            await ac.close()
        return served

    served = asyncio.run(run())
    assert "small" in served and "medium" in served
    # After the swap nothing goes to the old tier any more.
    last_small = max(i for i, t in enumerate(served) if t == "small")
    first_medium = served.index("medium")
    assert all(t == "medium" for t in served[max(last_small, first_medium) + 1 :])
    assert [m.id for m in client(url).models.list()] == ["terrace", "auto", "medium", "large"]
    assert new.requests and old.requests
    assert samples(url, "terrace_router_config_reloads_total") == {(("result", "success"),): 1.0}
    requests = samples(url, "terrace_router_requests_total")
    assert requests[(("status", "200"), ("tier", "medium"))] > 0
    assert all(dict(labels)["status"] == "200" for labels in requests)


def test_broken_reload_keeps_serving_the_old_table(stubs, servers, tmp_path):
    _write_configmap(tmp_path, make_config(stubs, thresholds=[2.0]), 1)
    url = serve_router(servers, {}, config_path=tmp_path / "router.yaml")
    _write_configmap(tmp_path, {"tiers": []}, 2)  # invalid: no tiers
    deadline = time.monotonic() + 10
    while 'reloads_total{result="error"}' not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, "reload error never counted"
        time.sleep(0.05)
    headers, _ = chat(client(url), EASY)
    assert headers["x-terrace-tier"] == "small"
