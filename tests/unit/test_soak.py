"""bench/soak.py: its request accounting (pure), and the soak itself for one
minute on real processes (two runtimes, a router, one runtime SIGKILLed and
restarted), asserted on the JSON line it ends with."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ERROR = {"error": {"message": "no tier could answer", "type": "x", "param": None, "code": "y"}}
CHUNK = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"}}]}
ANSWER = {
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}
    ],
}


def _sse(*events: object) -> bytes:
    return b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n"
        for e in events
    )


@pytest.mark.parametrize(
    ("valid", "status", "body", "cls"),
    [
        (True, 200, json.dumps(ANSWER).encode(), "answered"),
        (True, 200, b'{"object": "chat.completion", "choices": []}', "LOST"),
        (True, 503, json.dumps(ERROR).encode(), "clean error"),
        (True, 429, json.dumps(ERROR).encode(), "clean error"),
        (True, 400, json.dumps(ERROR).encode(), "LOST"),  # a valid request refused
        (True, 502, b"<html>Bad Gateway</html>", "LOST"),
        (True, 500, b'{"error": "boom"}', "LOST"),  # not OpenAI's envelope
        (False, 400, json.dumps(ERROR).encode(), "clean error"),
        (False, 404, json.dumps(ERROR).encode(), "clean error"),
        (False, 200, json.dumps(ANSWER).encode(), "LOST"),
        (False, 500, json.dumps(ERROR).encode(), "LOST"),
    ],
)
def test_unary_answers_are_classified(
    soak: ModuleType, valid: bool, status: int, body: bytes, cls: str
) -> None:
    assert soak.classify_unary("chat", valid, status, body).cls == cls


@pytest.mark.parametrize(
    ("body", "cls", "in_band"),
    [
        (_sse(CHUNK, CHUNK, b"[DONE]"), "answered", False),
        (_sse(CHUNK, ERROR), "answered", True),  # the router's mid-stream error event
        (_sse(CHUNK, ERROR, b"[DONE]"), "answered", True),
        (_sse(CHUNK, CHUNK), "LOST", False),  # cut short, nothing said
        (_sse(CHUNK) + b"data: {", "LOST", False),  # ends inside an event
        (_sse(CHUNK, b"{not json", b"[DONE]"), "LOST", False),
        (_sse(CHUNK, {"error": "boom"}, b"[DONE]"), "LOST", False),
        (_sse(b"[DONE]", CHUNK), "LOST", False),
        (b"", "LOST", False),
    ],
)
def test_streams_are_classified(soak: ModuleType, body: bytes, cls: str, in_band: bool) -> None:
    verdict = soak.classify_stream("chat", 200, "text/event-stream; charset=utf-8", body)
    assert (verdict.cls, verdict.in_band_error) == (cls, in_band), verdict.detail


def test_a_stream_answered_as_json_is_lost(soak: ModuleType) -> None:
    assert (
        soak.classify_stream("chat", 200, "application/json", json.dumps(ANSWER).encode()).cls
        == "LOST"
    )


def _refuse(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_every_bad_request_is_bad_as_named(soak: ModuleType) -> None:
    for kind, body in soak.BAD_BODIES.items():
        if kind in ("bad: invalid JSON", "bad: NaN literal"):
            with pytest.raises(ValueError):
                json.loads(body, parse_constant=_refuse)
            continue
        parsed = json.loads(body)
        assert (
            parsed["model"] not in ("auto", "small", "large")
            or "messages" not in parsed
            or not isinstance(parsed.get("max_tokens", 0), int)
        ), kind


def test_soak_one_minute_loses_nothing_and_leaks_nothing(tmp_path: Path) -> None:
    """The real thing: `python bench/soak.py --minutes 1` (about 90 s in all)."""
    outcomes = tmp_path / "outcomes.jsonl"
    done = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "1", "--outcomes", str(outcomes)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), out  # it ends with its JSON line
    figures = json.loads(lines[-1])
    assert figures["requests"] > 0, out
    assert figures["lost"] == 0, out
    assert figures["rss_growth_router"] < 0.10, out
    assert figures["rss_growth_runtime"] < 0.10, out
    assert figures["fd_growth"] <= 0, out
    assert done.returncode == 0, out
    # Every kind of request was exercised, and the outage really happened.
    rows = [json.loads(line) for line in outcomes.read_text().splitlines()]
    assert len(rows) == figures["requests"]
    kinds = {r["kind"] for r in rows}
    assert {
        "disconnect unary",
        "disconnect stream",
        "chat stream auto",
        "bad: NaN literal",
    } <= kinds
    outage = [r for r in rows if r["phase"] == "outage"]
    assert outage and not any(r["tier"] == "small" for r in outage)
    assert any(r["tier"] == "large" and r["escalated"] for r in outage if r["model"] == "auto")
    assert any(r["verdict"]["cls"] == "disconnect" for r in rows)
