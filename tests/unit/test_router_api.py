"""The router end to end: the real `openai` client (sync, async, streaming)
against the router served by uvicorn on 127.0.0.1, in front of stub tiers
that are real HTTP servers speaking OpenAI chat/completions (with logprobs)
and OIP v2, and that can be told to fail, stall or answer unsure."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from localproc import UVICORN_PORT, port_from_log
from router_harness import (
    EASY,
    HARD,
    KEY,
    RawTier,
    ServerThread,
    StubControl,
    chat,
    chat_answer,
    client,
    make_config,
    read_request,
    samples,
    serve_router,
    stub_app,
)
from served import Reserved, until
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

pytestmark = pytest.mark.usefixtures("router_keys")


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
    raw = client(url).completions.with_raw_response.create(model="auto", prompt=long, max_tokens=5)
    assert raw.headers["x-terrace-complexity"] == f"{expected:.4f}"


def test_a_lone_surrogate_in_an_exam_prompt_is_routed_not_a_500(stubs, servers):
    # JSON can carry a lone surrogate (\\ud800); the encoder must still read it.
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    body = (
        '{"model": "auto", "messages": [{"role": "user", "content": "Which organelle '
        "is the site of aerobic respiration in eukaryotic cells, the mito\\ud800chondrion or "
        "another?\\nA. Ribosome\\nB. Mitochondrion\\nC. Golgi apparatus\\nD. Lysosome"
        '\\nAnswer:"}]}'
    )
    r = httpx.post(
        url + "/v1/chat/completions",
        content=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert r.status_code == 200, r.text
    assert 0.0 <= float(r.headers["x-terrace-complexity"]) <= 1.0


def test_an_encoder_failure_routes_by_the_prior_not_a_lost_request(stubs, servers, monkeypatch):
    from terrace_router.classifier import Classifier
    from terrace_router.classifier.encoder import SentenceEncoder

    exam = (
        "Which organelle is the site of aerobic respiration in eukaryotic cells?\n"
        "A. Ribosome\nB. Mitochondrion\nC. Golgi apparatus\nD. Lysosome\nAnswer:"
    )
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
    scores: dict[str, set[str]] = {EASY: set(), HARD: set()}
    for prompt in (EASY, HARD) * 3:
        headers, resp = chat(c, prompt)
        assert headers["x-terrace-tier"] in ("small", "large")
        assert resp.choices[0].message.content == f"answer from {headers['x-terrace-tier']}"
        scores[prompt].add(headers["x-terrace-complexity"])
    # The same prompt scores the same every time, and the hard one higher.
    (easy,), (hard,) = scores[EASY], scores[HARD]
    assert float(hard) > float(easy)
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


def test_a_stream_is_not_asked_for_logprobs_it_will_not_be_judged_on(stubs, servers):
    """The confidence check needs the whole answer; a stream is settled on its
    tier before the first byte, so the router adds nothing to it (the
    client's own `logprobs` still go through)."""
    stubs["small"][0].logprob = -6.0  # would escalate a unary request
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    with client(url) as c:
        chunks = list(c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": EASY}], stream=True))  # fmt: skip
    assert chunks and all(ch.choices[0].logprobs is None for ch in chunks if ch.choices)
    assert "logprobs" not in stubs["small"][0].requests[-1]
    assert stubs["large"][0].requests == []  # not escalated either
    with client(url) as c:
        list(c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": EASY}], stream=True,
            logprobs=True))  # fmt: skip
    assert stubs["small"][0].requests[-1]["logprobs"] is True


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


def test_every_tier_failing_names_each_cause_with_the_last_status(stubs, servers):
    stubs["small"][0].mode = stubs["large"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    with pytest.raises(openai.InternalServerError) as exc:
        chat(client(url), EASY)
    # The upstreams' own status, and what each said, reach the client.
    assert exc.value.status_code == 500
    message = exc.value.body["message"]
    assert "tier 'small' answered 500 (boom)" in message
    assert "tier 'large' answered 500 (boom)" in message
    assert exc.value.body["type"] == "server_error"
    assert exc.value.response.headers["x-terrace-escalated"] == "error"
    assert exc.value.response.headers["x-terrace-tier"] == "none"
    assert float(exc.value.response.headers["x-terrace-complexity"]) >= 0


def test_errors_escalation_off_gives_the_error_not_the_next_tier(stubs, servers):
    stubs["small"][0].mode = "fail"
    url = serve_router(servers, make_config(stubs, thresholds=[2.0], escalation={"onError": False}))
    with pytest.raises(openai.InternalServerError):
        chat(client(url), EASY)
    assert stubs["large"][0].requests == []


def test_failing_endpoint_is_ejected_and_its_peer_serves(stubs, servers):
    bad, good = stubs["small"][0], stubs["small-b"][0]
    bad.mode, bad.healthy = "fail", False  # 500s, and its health check fails too
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [stubs["small"][1], stubs["small-b"][1]]
    cfg["tiers"][0]["ejectAfterFailures"] = 2
    cfg["tiers"][0]["ejectSeconds"] = 60
    url = serve_router(servers, cfg)
    c = client(url)
    tiers = [chat(c, EASY)[0]["x-terrace-tier"] for _ in range(12)]
    # Every request that met the failing endpoint escalated; the rest stayed
    # on the small tier through its healthy peer.
    assert len(bad.requests) >= 2
    assert tiers.count("large") == len(bad.requests)
    assert len(good.requests) == 12 - len(bad.requests)
    # Two 500s made it a suspect, its health check (run beside the requests,
    # so a few more may meet it meanwhile) failed: ejected, for a minute.
    deadline = time.monotonic() + 10
    while True:
        seen = len(bad.requests)
        for _ in range(4):
            chat(c, EASY)
        if len(bad.requests) == seen:  # four in a row passed it by
            break
        assert time.monotonic() < deadline, "the failing endpoint was never ejected"
    seen = len(bad.requests)
    assert [chat(c, EASY)[0]["x-terrace-tier"] for _ in range(10)] == ["small"] * 10
    assert len(bad.requests) == seen


@pytest.mark.parametrize("wakes", [True, False])
def test_a_request_waits_for_a_sleeping_tier_then_escalates(stubs, servers, wakes):
    reserved = Reserved()  # nothing listens yet: the tier is at zero
    servers.append(reserved)
    asked = threading.Event()

    async def wake(request: Request) -> JSONResponse:  # the operator's endpoint
        asked.set()
        return JSONResponse({"message": "0 -> 1: waking"}, 202)

    operator = ServerThread(Starlette(routes=[Route("/wake/{ns}/{name}", wake, methods=["POST"])]))
    servers.append(operator.start())
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [reserved.url]
    cfg["tiers"][0]["activationTimeoutSeconds"] = 10.0 if wakes else 0.5
    cfg["tiers"][0]["wakeUrl"] = operator.url + "/wake/demo/small"
    url = serve_router(servers, cfg)
    sleepy = StubControl("sleepy")

    def wake_up() -> None:
        # The tier's pod starts once the router, holding the request after
        # nothing answered, asked for it to wake.
        if asked.wait(30):
            servers.append(ServerThread(stub_app(sleepy), sock=reserved.sock).start())

    if wakes:
        threading.Thread(target=wake_up, daemon=True).start()
    started = time.monotonic()
    headers, resp = chat(client(url), EASY)
    waited = time.monotonic() - started
    assert asked.wait(10), "the request was never held for the sleeping tier"
    if wakes:  # held, then served by the tier that woke: nothing escalated
        assert headers["x-terrace-tier"] == "small" and "x-terrace-escalated" not in headers
        assert resp.choices[0].message.content == "answer from sleepy"
        assert len(sleepy.requests) == 1
    else:  # it did not wake in time: escalated, never lost
        assert headers["x-terrace-tier"] == "large" and headers["x-terrace-escalated"] == "error"
        assert waited >= 0.5  # held for the whole activationTimeoutSeconds first
    demand = samples(url, "terrace_router_demand_total")
    assert demand[(("tier", "small"),)] == 1  # counted for the tier the decision chose


def test_a_held_request_asks_the_operator_to_wake_the_tier(stubs, servers):
    reserved = Reserved()  # nothing listens yet: the tier is at zero
    servers.append(reserved)
    calls: list[str] = []
    sleepy = StubControl("sleepy")

    async def wake(request: Request) -> JSONResponse:  # the operator's endpoint
        calls.append(request.url.path)
        if len(calls) == 1:  # it scales the tier up; its pod starts beside this answer
            threading.Thread(
                target=lambda: servers.append(
                    ServerThread(stub_app(sleepy), sock=reserved.sock).start()
                ),
                daemon=True,
            ).start()
        return JSONResponse({"message": "0 -> 1: waking"}, 202)

    operator = ServerThread(Starlette(routes=[Route("/wake/{ns}/{name}", wake, methods=["POST"])]))
    servers.append(operator.start())
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0].update(
        endpoints=[reserved.url],
        activationTimeoutSeconds=10.0,
        wakeUrl=operator.url + "/wake/demo/small",
    )
    url = serve_router(servers, cfg)

    async def many() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as hc:
            return await asyncio.gather(
                *[
                    hc.post(
                        url + "/v1/chat/completions",
                        headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "auto", "messages": [{"role": "user", "content": EASY}]},
                    )
                    for _ in range(5)
                ]
            )

    started = time.monotonic()
    answers = asyncio.run(many())
    waited = time.monotonic() - started
    assert [r.headers["x-terrace-tier"] for r in answers] == ["small"] * 5
    assert all(
        r.json()["choices"][0]["message"]["content"] == "answer from sleepy" for r in answers
    )
    # Five requests waited together: one wake-up call, then at most one a
    # second while they kept waiting, however slowly the pod came up (the
    # rule's bound: the calls need at least len(calls) - 1 seconds).
    assert calls[0] == "/wake/demo/small" and set(calls) == {"/wake/demo/small"}
    assert len(calls) <= 1 + int(waited)


def test_overloaded_tier_sheds_to_the_next(stubs, servers):
    small = stubs["small"][0]
    small.gate = threading.Event()  # holds what reaches it until the test opens it
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["maxInflightPerEndpoint"] = 2
    url = serve_router(servers, cfg)

    async def run() -> list[tuple[str, str | None]]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        try:
            calls = [
                asyncio.create_task(
                    ac.chat.completions.with_raw_response.create(
                        model="auto", messages=[{"role": "user", "content": EASY}]
                    )
                )
                for _ in range(6)
            ]
            # Two are held on the small tier; the other four found it full.
            await until(lambda: sum(c.done() for c in calls) == 4 and small.inflight == 2)
            small.gate.set()
            raws = await asyncio.gather(*calls)
        finally:
            small.gate.set()
            await ac.close()
        return [(r.headers["x-terrace-tier"], r.headers.get("x-terrace-escalated")) for r in raws]

    served = asyncio.run(run())
    assert sorted(served) == [("large", "overload")] * 4 + [("small", None)] * 2
    assert small.max_inflight_seen == 2


def test_everything_overloaded_is_a_429_with_retry_after(stubs, servers):
    held = [stubs[name][0] for name in ("small", "large")]
    gate = threading.Event()  # both tiers hold what reaches them until it opens
    for ctl in held:
        ctl.gate = gate
    cfg = make_config(stubs, thresholds=[2.0])
    for t in cfg["tiers"]:
        t["maxInflightPerEndpoint"] = 1

    url = serve_router(servers, cfg)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as hc:
            calls = [
                asyncio.create_task(
                    hc.post(
                        url + "/v1/chat/completions",
                        headers={"authorization": f"Bearer {KEY}"},
                        json={"model": "auto", "messages": [{"role": "user", "content": EASY}]},
                    )
                )
                for _ in range(4)
            ]
            try:
                # One held on each tier; the other two found both full.
                await until(
                    lambda: (
                        sum(c.done() for c in calls) == 2 and all(ctl.inflight == 1 for ctl in held)
                    )
                )
            finally:
                gate.set()
            return await asyncio.gather(*calls)

    rs = asyncio.run(run())
    assert sorted(r.status_code for r in rs) == [200, 200, 429, 429]
    for r in rs:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
        else:
            assert r.json()["choices"][0]["message"]["content"].startswith("answer from")


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
        else:
            time.sleep(0.2)  # the event arrives on its own (aiohttp drops bytes read with an error)
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
    assert len(lines) == 2  # no [DONE]: nothing pretends the answer is whole
    assert not any(samples(url, "terrace_router_inflight").values())


# -- upstream wire behaviour ------------------------------------------------------


def test_a_request_the_upstream_read_is_never_sent_to_it_again(stubs, servers):
    seen: list[bytes] = []

    def handler(conn: socket.socket, n: int) -> None:
        # Answers the first request of each connection; reads the second and
        # closes without a byte, as a server that crashed on it would.
        for answer in (True, False):
            head = read_request(conn)
            if head is None:
                return
            seen.append(head)
            if answer:
                conn.sendall(chat_answer(f"answer {n}"))

    raw = RawTier(handler).start()
    servers.append(raw)
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0]["endpoints"] = [raw.url]
    url = serve_router(servers, cfg)
    c = client(url)
    first, second = chat(c, EASY), chat(c, EASY)
    assert first[1].choices[0].message.content == "answer 1"
    # The second went out on the kept-alive connection and was read: it is
    # escalated, never re-sent to the tier that may be running it.
    assert second[0]["x-terrace-tier"] == "large" and second[0]["x-terrace-escalated"] == "error"
    assert len(seen) == 2 and raw.connections == 1
    assert len(stubs["large"][0].requests) == 1
    # Pinned, it has nowhere else to go: a clean 502, and still sent once.
    assert chat(c, EASY, model="small")[1].choices[0].message.content == "answer 2"
    with pytest.raises(openai.APIStatusError) as exc:
        chat(c, EASY, model="small")
    assert exc.value.status_code == 502 and exc.value.body["code"] == "bad_gateway"
    assert len(seen) == 4 and raw.connections == 2


def test_refused_endpoint_moves_to_the_tiers_next_endpoint(stubs, servers):
    """A refused connection moves the request to the tier's next endpoint
    (nothing escalates), and the refused endpoint was really tried: one
    refusal ejects it here (ejectAfterFailures 1), so once a server appears
    at its address no request goes there, where a router that never met the
    refusal sends it its share."""
    refused = Reserved()  # bound, never listening
    servers.append(refused)
    cfg = make_config(stubs, thresholds=[2.0])
    cfg["tiers"][0].update(
        endpoints=[refused.url, stubs["small"][1]], ejectAfterFailures=1, ejectSeconds=600
    )
    url = serve_router(servers, cfg)
    c = client(url)
    for _ in range(2):  # the rotation starts at each endpoint once
        headers, resp = chat(c, EASY)
        assert headers["x-terrace-tier"] == "small" and "x-terrace-escalated" not in headers
        assert resp.choices[0].message.content == "answer from small"
    late = StubControl("late")  # a server appears where the refused endpoint was
    servers.append(ServerThread(stub_app(late), sock=refused.sock).start())
    for _ in range(6):
        assert chat(c, EASY)[1].choices[0].message.content == "answer from small"
    assert late.requests == [], "the refused endpoint was never tried, so never ejected"
    # The same table in a router that never met the refusal: both endpoints serve.
    fresh = client(serve_router(servers, cfg))
    answers = {chat(fresh, EASY)[1].choices[0].message.content for _ in range(6)}
    assert answers == {"answer from small", "answer from late"}, answers


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
    assert exc.value.status_code == 502
    assert exc.value.body["code"] == "bad_gateway"
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


def test_the_cache_keys_on_stream_options_and_skips_streams_with_errors(stubs, servers):
    cfg = make_config(
        stubs,
        thresholds=[2.0],
        cache={"ttlSeconds": 60, "maxEntries": 10, "includeStreaming": True},
    )
    url = serve_router(servers, cfg)
    base = {"model": "auto", "stream": True, "temperature": 0}
    base["messages"] = [{"role": "user", "content": EASY}]

    def stream(**extra: Any) -> tuple[str, bytes]:
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={**base, **extra},
        ) as r:
            return r.headers["x-terrace-cache"], r.read()

    with_usage = stream(stream_options={"include_usage": True})
    without = stream()
    # A different stream_options is a different answer: never replayed across.
    assert (with_usage[0], without[0]) == ("miss", "miss")
    assert stream(stream_options={"include_usage": True})[0] == "hit"
    assert stream()[0] == "hit"
    # A stream that ended with an in-band error is never stored.
    stubs["small"][0].stream_error = True
    assert stream(seed=7)[0] == "miss"
    stubs["small"][0].stream_error = False
    marks = stream(seed=7)
    assert marks[0] == "miss" and b'"error"' not in marks[1]


def test_explicit_nulls_mean_the_defaults(stubs, servers):
    cfg = make_config(stubs, thresholds=[2.0], escalation={"onLowConfidence": False})
    url = serve_router(servers, cfg)
    optional = [
        "temperature",
        "top_p",
        "n",
        "max_tokens",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "seed",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "user",
        "max_completion_tokens",
        "logit_bias",
        "tools",
        "response_format",
    ]
    messages = [{"role": "user", "content": EASY}]
    for field in optional:
        r = httpx.post(
            url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "auto", "messages": messages, field: None},
        )
        assert r.status_code == 200, (field, r.text)
        assert field not in stubs["small"][0].requests[-1]  # forwarded as if absent
    for field in ["max_tokens", "echo", "logprobs", "suffix", "best_of", "stop", "seed"]:
        r = httpx.post(
            url + "/v1/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "auto", "prompt": "Hello", field: None},
        )
        assert r.status_code == 200, (field, r.text)
        assert field not in stubs["small"][0].requests[-1]


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("chat", "seed", 2**64),
        ("chat", "stop", ["a", "b", "c", "d", "e"]),
        ("chat", "stream_options", {"include_usage": True}),  # without stream
        ("chat", "stream_options", {"include_usage": "yes"}),
        ("chat", "logit_bias", {"50256": 101}),
        ("chat", "user", 7),
        ("chat", "stream", "true"),
        ("chat", "n", 0),
        ("completions", "logprobs", 6),
        ("completions", "logprobs", True),
        ("completions", "max_tokens", "3"),
        ("completions", "echo", 1),
        ("completions", "best_of", 0),
    ],
)
def test_bad_parameters_are_400s_naming_them_and_never_reach_a_tier(
    stubs, servers, kind, field, value
):
    url = serve_router(servers, make_config(stubs, thresholds=[2.0]))
    body: dict[str, Any] = {"model": "auto", field: value}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": EASY}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "Hello"
        path = "/v1/completions"
    r = httpx.post(url + path, headers={"authorization": f"Bearer {KEY}"}, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith(field) and err["type"] == "invalid_request_error"
    assert stubs["small"][0].requests == [] and stubs["large"][0].requests == []


def test_non_json_numbers_and_unknown_paths_get_each_protocols_error(stubs, servers):
    cfg = make_config(stubs)
    url = serve_router(servers, cfg)
    auth = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "x": NaN}'
    r = httpx.post(url + "/v1/chat/completions", content=body, headers=auth)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert stubs["small"][0].requests == [] and stubs["large"][0].requests == []
    r = httpx.get(url + "/v2/models/x/nonsense", headers=auth)
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = httpx.delete(url + "/v2/health/live")
    assert r.status_code == 405 and isinstance(r.json()["error"], str)
    r = httpx.get(url + "/v1/nonsense", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(url + "/v1/chat/completions/", headers=auth, content=body)  # no 307
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_401_drains_a_large_body_so_the_client_reads_it(stubs, servers):
    url = serve_router(servers, make_config(stubs))
    big = b"x" * (3 * 1024 * 1024)
    for _ in range(3):  # a reset would show up as a transport error on some tries
        r = httpx.post(
            url + "/v1/chat/completions",
            content=big,
            headers={"authorization": "Bearer wrong", "content-type": "application/json"},
            timeout=30,
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


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
    assert httpx.get(url + "/v2").json()["extensions"] == ["binary_tensor_data"]
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
        "0",  # the port it bound is in its log
        "--log-level",
        "info",
    ]
    log = tmp_path / "router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port_from_log(proc, log, UVICORN_PORT)}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
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
    assert "Traceback" not in log.read_text()


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
            await until(lambda: "small" in served)  # the old table serves
            await asyncio.to_thread(
                _write_configmap,
                tmp_path,
                make_config(stubs, tiers=("medium", "large"), thresholds=[2.0]),
                2,
            )
            await until(lambda: "medium" in served)  # the new one took over
            # and serves a good many more after it did
            await until(lambda: len(served) - served.index("medium") > 24)
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
