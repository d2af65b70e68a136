"""The router's documented escalation and passive-health rules, end to end:
the real `terrace-router` process (its CLI, a routing table file) in front of
real HTTP upstreams that speak OpenAI's chat API and fail or answer as each
test sets, asked by the `openai` client.

- `escalation.fallbackToSmaller` and `escalation.maxAttempts`
  (docs/router.md, the routing table and "Routing a request", step 5): the
  start tier, then larger ones, then smaller ones from the nearest down, at
  most `maxAttempts` tiers in all;
- passive health (docs/router.md, "Passive health"): an endpoint ejected
  after `ejectAfterFailures` failures in a row gets one probe request after
  `ejectSeconds`; a failed probe ejects it again at once, a successful one
  brings it back; a 4xx answer counts as a success (it resets the count), a
  429 as neither (it neither ejects nor resets);
- idle upstream connections (docs/router.md, "Never sent twice"): the router
  keeps a connection to an upstream for the next request, and closes one that
  has been idle for 4 s; the request after that opens a new one.

No cluster: these are rules of the data plane alone.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localproc import ServerProcess  # noqa: E402
from operator_harness import wait_for  # noqa: E402

TIERS = ("small", "medium", "large")
# Fixed score thresholds put every request on a chosen start tier.
START_AT = {"small": [1e9, 2e9], "medium": [-1e9, 1e9]}


class Upstream:
    """A real HTTP server answering OpenAI chat completions: 200 with
    "answer from NAME", or `status` (503: the endpoint is at fault) with an
    OpenAI error body. Every chat request is recorded, in arrival order, in
    the shared `arrivals` list."""

    def __init__(self, name: str, arrivals: list[tuple[str, float]]) -> None:
        self.name = name
        self.status = 200
        self.arrivals = arrivals
        # One entry per TCP connection the router opened: [opened, closed or
        # None]; and when the last answer was handed to the socket.
        self.connections: list[list[float | None]] = []
        self.last_answer_at = 0.0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive; it never closes an idle one itself

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                self.conn = [time.monotonic(), None]
                upstream.connections.append(self.conn)

            def finish(self) -> None:  # the router closed it (or it broke)
                try:
                    super().finish()
                finally:
                    self.conn[1] = time.monotonic()

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                upstream.last_answer_at = time.monotonic()
                self.wfile.write(data)

            def do_GET(self) -> None:  # the router's health check
                self._send(200, {"object": "list", "data": [{"id": upstream.name}]})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.arrivals.append((upstream.name, time.monotonic()))
                status = upstream.status
                if status != 200:
                    self._send(status, {"error": {"message": f"{upstream.name} is down",
                                                  "type": "server_error"}})  # fmt: skip
                    return
                text = f"answer from {upstream.name}"
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                    "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                })  # fmt: skip

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> int:
        return sum(1 for name, _ in self.arrivals if name == self.name)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams() -> Iterator[dict[str, Upstream]]:
    arrivals: list[tuple[str, float]] = []
    ups = {name: Upstream(name, arrivals) for name in TIERS}
    try:
        yield ups
    finally:
        for u in ups.values():
            u.stop()


@pytest.fixture
def start_router(tmp_path: Path) -> Iterator:
    started: list[ServerProcess] = []

    def start(table: dict) -> ServerProcess:
        path = tmp_path / f"router-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(table))
        # --port 0: the OS picks the port, ServerProcess reads it from the log.
        argv = [sys.executable, "-m", "terrace_router.cli", "serve", "--host", "127.0.0.1",
                "--port", "0", "--config", str(path)]  # fmt: skip
        server = ServerProcess("router", argv, 0, "/readyz", tmp_path / f"{path.stem}.log")
        started.append(server)
        return server.wait(120)

    try:
        yield start
    finally:
        for s in started:
            s.stop()


def table(tiers: list[dict], thresholds: list[float], escalation: dict) -> dict:
    return {
        "tiers": tiers,
        "calibration": {"thresholds": thresholds},
        # The upstreams send no logprobs: only errors escalate here.
        "escalation": {"onLowConfidence": False, **escalation},
        "cache": {"enabled": False},
    }


def client(router: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=30)


def ask(router: ServerProcess):
    return client(router).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is 2 + 2?"}]
    )


@pytest.mark.parametrize(
    ("start", "down", "fallback", "max_attempts", "tried", "answered_by"),
    [
        ("medium", ["medium", "large"], True, 3, ["medium", "large", "small"], "small"),
        ("medium", ["medium", "large"], False, 3, ["medium", "large"], None),
        ("medium", ["medium", "large"], True, 2, ["medium", "large"], None),
        ("small", ["small", "medium"], True, 2, ["small", "medium"], None),
        ("small", ["small", "medium"], True, 3, ["small", "medium", "large"], "large"),
    ],
    ids=["fallback-answers", "no-fallback", "fallback-past-max-attempts",
         "max-attempts-2", "max-attempts-3"],
)  # fmt: skip
def test_tiers_tried_in_order_larger_then_smaller_at_most_max_attempts(
    upstreams, start_router, start, down, fallback, max_attempts, tried, answered_by
):
    for name in down:
        upstreams[name].status = 503
    router = start_router(table(
        # A high ejection count: every request here reaches the tier it tries.
        [{"name": n, "endpoints": [upstreams[n].url], "ejectAfterFailures": 100} for n in TIERS],
        START_AT[start],
        {"fallbackToSmaller": fallback, "maxAttempts": max_attempts},
    ))  # fmt: skip
    if answered_by is not None:
        raw = ask(router)
        assert raw.headers["x-terrace-tier"] == answered_by
        # one "error" per tier that failed before the answer
        assert raw.headers["x-terrace-escalated"] == ",".join(["error"] * len(down))
        assert raw.parse().choices[0].message.content == f"answer from {answered_by}"
    else:
        with pytest.raises(openai.APIStatusError) as exc:
            ask(router)
        assert exc.value.status_code == 503
        assert exc.value.response.headers["x-terrace-tier"] == "none"
        for name in tried:  # the clean error names each tier that was tried
            assert f"tier '{name}'" in exc.value.body["message"], exc.value.body
    # Tiers tried, in order, each once; the ones past the rules never asked.
    arrivals = upstreams["small"].arrivals
    assert [name for name, _ in arrivals] == tried


def test_an_ejected_endpoint_gets_one_probe_after_eject_seconds(upstreams, start_router):
    eject_s = 4.0
    small, large = upstreams["small"], upstreams["large"]
    small.status = 503  # the endpoint's own fault: each one counts towards ejection
    router = start_router(table(
        [{"name": "small", "endpoints": [small.url], "ejectAfterFailures": 2,
          "ejectSeconds": eject_s},
         {"name": "large", "endpoints": [large.url]}],
        [1e9],  # every request starts on small
        {"fallbackToSmaller": False},
    ))  # fmt: skip

    def served_by(raw) -> str:
        return raw.headers["x-terrace-tier"]

    # Two failures in a row: ejected. Both requests were answered by large.
    for _ in range(2):
        assert served_by(ask(router)) == "large"
    assert small.count() == 2
    second_failure_at = small.arrivals[-1][1]
    # Ejected: the next request does not touch small at all.
    raw = ask(router)
    assert served_by(raw) == "large" and raw.headers["x-terrace-escalated"] == "error"
    assert small.count() == 2

    # After ejectSeconds, one request probes it; it fails, and small is
    # ejected again at once (its failure count stays high).
    def probed(after: int) -> bool:
        answer = ask(router)
        seen.append(served_by(answer))
        return small.count() > after

    seen: list[str] = []
    wait_for(lambda: probed(2), 3 * eject_s + 10, interval=0.2, what="the first probe")
    probe_at = next(t for name, t in reversed(small.arrivals) if name == "small")
    assert probe_at - second_failure_at >= eject_s, "probed before ejectSeconds"
    assert small.count() == 3 and seen[-1] == "large", seen
    assert served_by(ask(router)) == "large"
    assert small.count() == 3, "a failed probe must eject the endpoint again at once"

    # It recovers; the next probe succeeds and brings it back into rotation.
    small.status = 200
    seen.clear()
    wait_for(lambda: probed(3), 3 * eject_s + 10, interval=0.2, what="the second probe")
    assert small.count() == 4 and seen[-1] == "small", seen
    for _ in range(3):
        raw = ask(router)
        assert served_by(raw) == "small" and "x-terrace-escalated" not in raw.headers
    assert small.count() == 7


def test_a_4xx_counts_as_a_success_and_a_429_as_neither(upstreams, start_router):
    small, large = upstreams["small"], upstreams["large"]
    router = start_router(table(
        # Two failures in a row eject small for longer than this test runs.
        [{"name": "small", "endpoints": [small.url], "ejectAfterFailures": 2,
          "ejectSeconds": 3600},
         {"name": "large", "endpoints": [large.url]}],
        [1e9],  # every request starts on small
        {"fallbackToSmaller": False},
    ))  # fmt: skip

    def answer(status: int) -> str:
        """small answers `status` to the next request; which tier answered it."""
        small.status = status
        before = small.count()
        try:
            tier = ask(router).headers["x-terrace-tier"]
        except openai.APIStatusError as exc:
            tier = exc.response.headers["x-terrace-tier"]
            assert exc.status_code == status == 400, (exc.status_code, exc.body)
        assert small.count() == before + 1, f"small was not asked (status {status})"
        return tier

    # A failure, then a 400: passed through to the client as small's answer,
    # and it is a success, so the next failure is the first in a row again.
    assert answer(503) == "large"
    assert answer(400) == "small"
    assert answer(503) == "large"
    assert answer(200) == "small"  # not ejected: the 400 reset the count
    # A failure, then 429s: each escalates (overload), none ejects and none
    # resets the count, so the next failure is the second in a row: ejected.
    assert answer(503) == "large"
    for _ in range(3):
        assert answer(429) == "large"
    assert answer(503) == "large"
    small.status = 200
    before = small.count()
    raw = ask(router)
    assert raw.headers["x-terrace-tier"] == "large"
    assert raw.headers["x-terrace-escalated"] == "error"  # small ejected, not asked
    assert small.count() == before


def test_an_idle_upstream_connection_is_closed_after_4_s(upstreams, start_router):
    keepalive_s = 4.0
    small = upstreams["small"]
    router = start_router(table(
        [{"name": "small", "endpoints": [small.url]}], [], {"maxAttempts": 1},
    ))  # fmt: skip

    def served() -> None:
        raw = ask(router)
        assert raw.headers["x-terrace-tier"] == "small"

    # Back to back, both requests use one connection: the router keeps it.
    served()
    served()
    assert len(small.connections) == 1, small.connections
    answered_at = small.last_answer_at
    # Idle: the router closes it (the upstream never closes one itself) ...
    closed = wait_for(lambda: small.connections[0][1], 60, interval=0.1,
                      what="the router closing the idle connection")  # fmt: skip
    assert closed - answered_at >= keepalive_s, "closed before it was idle for 4 s"
    # ... and the next request opens a new one.
    served()
    assert len(small.connections) == 2, small.connections
    assert small.connections[1][0] > closed
