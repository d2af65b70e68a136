"""The router's fault matrix, on real sockets: for each way an upstream can
fail, the client-visible result docs/router.md promises, for OpenAI unary,
OpenAI streaming and OIP v2 requests pinned to the failing tier (nowhere to
escalate) and for `auto` requests (escalated to a healthy tier).

Every case also checks that nothing is lost or doubled: the failing upstream
read the request at most once, the client got an answer or an error in its
protocol's shape (parseable, no traceback), and no in-flight slot leaked.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from router_harness import (
    EASY,
    KEY,
    RawTier,
    make_config,
    read_request,
    samples,
    serve_router,
)
from served import Reserved

pytestmark = pytest.mark.usefixtures("router_keys")

AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = {"model": "small", "messages": [{"role": "user", "content": EASY}]}
TENSOR = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
READ_TIMEOUT = 0.5


def _respond(conn: socket.socket, status: str, headers: dict[str, str], body: bytes) -> None:
    head = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    conn.sendall(head.encode() + b"\r\n" + body)


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a crashed process's kernel does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _chunked_sse(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        + f"{len(payload):x}\r\n".encode()
        + payload
        + b"\r\n"
    )


_JSON = {"content-type": "application/json"}
_GOOD_EVENT = (
    b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "small", '
    b'"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": null}]}\n\n'
)


class Upstream:
    """A raw tier that fails one way, counting the requests it read."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.reads = 0
        self.client_left = threading.Event()  # the router closed the connection on us
        self.raw = RawTier(self._handle)

    def _handle(self, conn: socket.socket, n: int) -> None:
        if self.fault == "reset-before-read":
            _reset(conn)
            return
        while read_request(conn) is not None:
            self.reads += 1
            behave = getattr(self, "_" + self.fault.replace("-", "_"))
            if behave(conn) == "closed":
                return

    def _reset_after_read(self, conn: socket.socket) -> str:
        _reset(conn)
        return "closed"

    def _slow_headers(self, conn: socket.socket) -> str:
        time.sleep(READ_TIMEOUT * 4)
        return "closed"

    def _http_500(self, conn: socket.socket) -> None:
        body = {"error": {"message": "kaboom: CUDA error", "type": "server_error"}}
        _respond(conn, "500 Internal Server Error", _JSON, json.dumps(body).encode())

    def _http_429(self, conn: socket.socket) -> None:
        body = {"error": {"message": "queue full", "type": "rate_limit_error"}}
        _respond(
            conn, "429 Too Many Requests", {**_JSON, "retry-after": "7"}, json.dumps(body).encode()
        )

    def _http_503(self, conn: socket.socket) -> None:
        _respond(
            conn,
            "503 Service Unavailable",
            {**_JSON, "retry-after": "5"},
            b'{"error": "loading model"}',
        )

    def _malformed_json(self, conn: socket.socket) -> None:
        _respond(conn, "200 OK", _JSON, b'{"choices": [')

    def _malformed_sse(self, conn: socket.socket) -> str:
        _chunked_sse(conn, _GOOD_EVENT + b"data: {not json\n\n")
        time.sleep(0.3)
        return "closed"

    def _death_mid_event(self, conn: socket.socket) -> str:
        _chunked_sse(conn, _GOOD_EVENT)
        time.sleep(0.3)  # the whole event arrives on its own
        conn.sendall(b'20\r\ndata: {"id": "c", "object": "ch')
        time.sleep(0.3)
        return "closed"

    def _head_then_hang(self, conn: socket.socket) -> str:
        # A 200 head and the start of its body, then nothing more.
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
            b'\r\n{"choices": ['
        )
        return self._hang(conn)

    def _hang(self, conn: socket.socket) -> str:
        # Never answers; notices when the router gives the connection up.
        conn.settimeout(10)
        try:
            if conn.recv(1) == b"":
                self.client_left.set()
        except (TimeoutError, OSError):
            self.client_left.set()
        return "closed"


# fault -> (pinned status, OpenAI error code, words the message must carry)
UNARY = {
    "refused": (503, "service_unavailable", "tier 'small' has no reachable endpoint"),
    # Reset before reading: if the reset beat the write, the request provably
    # never went out (503, like a refused connection); else 502.
    "reset-before-read": (502, "bad_gateway", "tier"),
    "reset-after-read": (502, "bad_gateway", "tier 'small' closed or reset the connection"),
    "slow-headers": (504, "upstream_timeout", "timed out"),
    "http-500": (500, "upstream_error", "answered 500 (kaboom: CUDA error)"),
    "http-429": (429, "rate_limit_exceeded", "answered 429 (queue full)"),
    "http-503": (503, "service_unavailable", "answered 503 (loading model)"),
    "malformed-json": (502, "bad_gateway", "tier 'small' answered a malformed body"),
}
STREAM_ONLY = ("malformed-sse", "death-mid-event")


@pytest.fixture
def faulty(request: pytest.FixtureRequest, stubs, servers) -> Callable[[str], tuple[str, Upstream]]:
    """Start a router whose `small` tier (and OIP v2 tier `tensor`) is a raw
    upstream failing one way, and whose `large` tier is a healthy stub."""

    def start(fault: str, read_timeout: float = READ_TIMEOUT) -> tuple[str, Upstream]:
        up = Upstream(fault)
        if fault == "refused":
            reserved = Reserved()  # bound, never listening
            servers.append(reserved)
            endpoint = reserved.url
        else:
            servers.append(up.raw.start())
            endpoint = up.raw.url
        cfg = make_config(stubs, thresholds=[2.0])
        small = cfg["tiers"][0]
        small.update(endpoints=[endpoint], readTimeoutSeconds=read_timeout, ejectAfterFailures=100)
        cfg["tiers"].append(
            {
                "name": "tensor",
                "endpoints": [endpoint],
                "protocol": "v2",
                "readTimeoutSeconds": read_timeout,
            }
        )
        return serve_router(servers, cfg), up

    return start


def _no_leak(url: str) -> None:
    deadline = time.monotonic() + 5
    while any(samples(url, "terrace_router_inflight").values()):
        assert time.monotonic() < deadline, "an in-flight slot leaked"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", list(UNARY))
def test_unary_pinned(faulty, fault):
    url, up = faulty(fault)
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
    status, code, words = UNARY[fault]
    if fault == "reset-before-read" and r.status_code == 503:
        status, code = 503, "service_unavailable"
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code
    assert words in err["message"] and "Traceback" not in r.text
    if fault == "http-429":
        assert r.headers["retry-after"] == "7"
    if fault in ("http-503", "refused"):
        assert int(r.headers["retry-after"]) >= 1
    if fault == "http-503":
        assert r.headers["retry-after"] == "5"
    assert up.reads <= 1
    _no_leak(url)


@pytest.mark.parametrize("fault", list(UNARY))
def test_v2_pinned(faulty, fault):
    url, up = faulty(fault)
    r = httpx.post(url + "/v2/models/tensor/infer", headers=AUTH, json=TENSOR, timeout=30)
    status, _, words = UNARY[fault]
    if fault == "reset-before-read":
        status = r.status_code if r.status_code in (502, 503) else status
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert words.replace("'small'", "'tensor'") in body["error"] and "Traceback" not in r.text
    assert up.reads <= 1
    _no_leak(url)


@pytest.mark.parametrize("fault", [*UNARY, *STREAM_ONLY])
def test_streaming_pinned(faulty, fault):
    url, up = faulty(fault)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    texts: list[str] = []
    with pytest.raises(openai.APIError) as exc:  # never a JSONDecodeError
        for chunk in c.chat.completions.create(**CHAT, stream=True):
            texts.append(chunk.choices[0].delta.content or "")
    if fault in STREAM_ONLY:
        # Settled on the tier: the whole events came through, then an in-band error.
        assert texts == ["partial"]
        assert "mid-stream" in str(exc.value.message)
    else:
        assert isinstance(exc.value, openai.APIStatusError)
        expected = {UNARY[fault][0]} | ({503} if fault == "reset-before-read" else set())
        assert exc.value.status_code in expected
    assert up.reads <= 1
    _no_leak(url)


@pytest.mark.parametrize(
    ("fault", "stream"),
    [(f, False) for f in UNARY] + [(f, True) for f in (*UNARY, *STREAM_ONLY)],
)
def test_auto_requests_escalate_and_are_answered_once(faulty, stubs, fault, stream):
    url, up = faulty(fault)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    body = {**CHAT, "model": "auto"}
    if fault in STREAM_ONLY:
        with pytest.raises(openai.APIError):  # settled on small before the break
            list(c.chat.completions.create(**body, stream=True))
        assert stubs["large"][0].requests == []
    elif stream:
        with c.chat.completions.with_streaming_response.create(**body, stream=True) as raw:
            assert raw.headers["x-terrace-tier"] == "large"
            text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse())
        assert text == "answer from large"
        assert len(stubs["large"][0].requests) == 1
    else:
        raw = c.chat.completions.with_raw_response.create(**body)
        assert raw.headers["x-terrace-tier"] == "large" and raw.headers["x-terrace-escalated"]
        assert raw.parse().choices[0].message.content == "answer from large"
        assert len(stubs["large"][0].requests) == 1
    assert up.reads <= 1
    _no_leak(url)


@pytest.mark.parametrize("kind", ["unary", "stream", "v2"])
def test_a_client_that_leaves_stops_the_upstream(faulty, kind):
    url, up = faulty("hang", read_timeout=30)
    if kind == "v2":
        path, body = "/v2/models/tensor/infer", TENSOR
    else:
        path, body = "/v1/chat/completions", {**CHAT, "stream": kind == "stream"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + path, headers=AUTH, json=body, timeout=httpx.Timeout(5, read=0.5))
    assert up.client_left.wait(5), "the router kept the upstream working for nobody"
    assert up.reads == 1
    _no_leak(url)
    left = samples(url, "terrace_router_requests_total")
    assert any(dict(k).get("status") == "499" for k in left), left


def test_a_client_that_leaves_while_the_body_comes_frees_the_slot(faulty):
    """The head came, the body is still coming when the client leaves: the
    router hangs up on the upstream and frees the endpoint's in-flight slot
    (a leaked slot would end in false 429s)."""
    url, up = faulty("head-then-hang", read_timeout=30)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url + "/v1/chat/completions",
            headers=AUTH,
            json=CHAT,
            timeout=httpx.Timeout(5, read=0.5),
        )
    assert up.client_left.wait(5), "the router kept the upstream connection for nobody"
    assert up.reads == 1
    _no_leak(url)


@pytest.mark.parametrize("quiet", [False, True])
def test_request_errors_never_eject_a_healthy_tier(stubs, servers, quiet):
    """LiteLLM's cooldown bug: caller-controlled failures took a healthy
    deployment out of service. Here 500s caused by bad requests, on a busy
    tier (a success just before) or a quiet one (no success ever, so none
    within any ejectSeconds), never eject the endpoint: each is relayed as
    the upstream's own 500, never the router's 503 of an ejected tier, and
    it passes the health check they trigger."""
    small = stubs["small"][0]
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0].update(ejectAfterFailures=2, ejectSeconds=0.2)
    url = serve_router(servers, cfg)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    if not quiet:
        assert (
            c.chat.completions.with_raw_response.create(**CHAT).headers["x-terrace-tier"] == "small"
        )
    small.mode = "fail"  # answers 500 to what follows, as to a poisoned request
    checks = small.health_checks
    sent = len(small.requests)
    for i in range(5):
        with pytest.raises(openai.InternalServerError) as exc:
            c.chat.completions.create(**CHAT)
        assert exc.value.status_code == 500, (i, exc.value)
        assert "boom" in exc.value.message, (i, exc.value.message)
        assert len(small.requests) == sent + i + 1, "the request did not reach the upstream"
    # The 500s made it a suspect: it was asked for its health, and answered.
    deadline = time.monotonic() + 10
    while small.health_checks == checks:
        assert time.monotonic() < deadline, "no health check after repeated 500s"
        time.sleep(0.02)
    small.mode = "ok"
    raw = c.chat.completions.with_raw_response.create(**{**CHAT, "model": "auto"})
    assert raw.headers["x-terrace-tier"] == "small" and "x-terrace-escalated" not in raw.headers


def test_an_endpoint_that_fails_its_health_check_too_is_ejected(stubs, servers):
    small = stubs["small"][0]
    small.mode, small.healthy = "fail", False
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0].update(ejectAfterFailures=2, ejectSeconds=60)
    url = serve_router(servers, cfg)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(**CHAT)
    deadline = time.monotonic() + 5
    while True:  # the check runs beside the requests: poll for its verdict
        try:
            c.chat.completions.create(**CHAT)
        except openai.APIStatusError as exc:
            if exc.status_code == 503 and "no reachable endpoint" in exc.message:
                break
        assert time.monotonic() < deadline, "never ejected"
        time.sleep(0.05)


# -- answers no well-behaved upstream gives, and clients' odd bodies -----------

DEEP = "[" * 5000 + "]" * 5000


def _raw_upstream(servers, answer: Callable[[socket.socket], None]) -> RawTier:
    def handler(conn: socket.socket, n: int) -> None:
        while read_request(conn) is not None:
            answer(conn)

    raw = RawTier(handler).start()
    servers.append(raw)
    return raw


def test_a_deeply_nested_answer_is_a_malformed_one(stubs, servers):
    body = ('{"choices": [{"index": 0, "message": {"content": "x"}}], "x": ' + DEEP + "}").encode()
    raw = _raw_upstream(servers, lambda c: _respond(c, "200 OK", _JSON, body))
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    url = serve_router(servers, cfg)
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**CHAT, "model": "auto"})
    assert r.status_code == 200 and r.headers["x-terrace-tier"] == "large"


def test_a_deeply_nested_event_ends_the_stream_in_band(stubs, servers):
    event = b'data: {"x": ' + DEEP.encode() + b"}\n\n"
    raw = _raw_upstream(servers, lambda c: (_chunked_sse(c, _GOOD_EVENT + event), c.close()))
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    url = serve_router(servers, cfg)
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    texts = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in c.chat.completions.create(**CHAT, stream=True):
            texts.append(chunk.choices[0].delta.content)
    assert texts == ["partial"] and "mid-stream" in exc.value.message
    _no_leak(url)


def _relayed(stubs, servers, payload: bytes) -> bytes:
    """What the router relays of an SSE body an upstream sends whole."""

    def answer(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            + f"content-length: {len(payload)}\r\n\r\n".encode()
            + payload
        )

    raw = _raw_upstream(servers, answer)
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    url = serve_router(servers, cfg)
    with httpx.stream(
        "POST", url + "/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": True}
    ) as r:
        return r.read()


def test_nothing_after_done_is_relayed(stubs, servers):
    done = _GOOD_EVENT + b"data: [DONE]\n\n"
    # One whole stream, and no error event after it.
    assert _relayed(stubs, servers, done + done) == done


@pytest.mark.parametrize(
    "body",
    [
        '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": ' + DEEP + "}",
        '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": 1e999}',
        '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": -Infinity}',
    ],
)
def test_bodies_python_would_read_but_json_cannot_carry_are_400s(stubs, servers, body):
    url = serve_router(servers, make_config(stubs))
    r = httpx.post(
        url + "/v1/chat/completions",
        content=body.encode(),
        headers={**AUTH, "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert stubs["small"][0].requests == [] and stubs["large"][0].requests == []


def test_echo_on_auto_is_not_broken_by_the_confidence_check(stubs, servers):
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    r = httpx.post(
        url + "/v1/completions",
        headers=AUTH,
        json={"model": "auto", "prompt": "hello", "max_tokens": 3, "echo": True},
    )
    assert r.status_code == 200 and r.headers["x-terrace-tier"] == "small"
    sent = stubs["small"][0].requests[-1]
    assert sent["echo"] is True and "logprobs" not in sent  # nothing added that echo refuses
    r = httpx.post(
        url + "/v1/chat/completions",
        headers=AUTH,
        json={**CHAT, "model": "auto", "top_logprobs": 2},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_mixed_backpressure_keeps_each_upstreams_word(stubs, servers):
    def busy(status: str, retry_after: str | None) -> RawTier:
        headers = dict(_JSON, **({"retry-after": retry_after} if retry_after else {}))
        body = json.dumps({"error": {"message": f"{status} here"}}).encode()
        return _raw_upstream(servers, lambda c: _respond(c, status, headers, body))

    small = busy("503 Service Unavailable", "5")
    large = busy("429 Too Many Requests", "30")
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [small.url]
    cfg["tiers"][1]["endpoints"] = [large.url]
    url = serve_router(servers, cfg)
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**CHAT, "model": "auto"})
    err = r.json()["error"]
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "answered 503 (503 Service Unavailable here)" in err["message"]
    # The last tier gave no Retry-After: the one the other tier gave is kept.
    quiet = busy("503 Service Unavailable", None)
    cfg["tiers"][1]["endpoints"] = [quiet.url]
    url = serve_router(servers, cfg)
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**CHAT, "model": "auto"})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"


def test_an_upstreams_own_error_event_is_not_echoed(stubs, servers):
    error = b'data: {"error": {"message": "out of memory", "type": "server_error"}}\n\n'
    # No [DONE] after it: the upstream ended a failed stream, and said so once.
    assert _relayed(stubs, servers, _GOOD_EVENT + error) == _GOOD_EVENT + error
