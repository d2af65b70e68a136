"""`service_tier: "flex"` at the router: answered now on the cheapest tier
with headroom, never scored, and shed first (429 with Retry-After) when
every tier that could take it is busy, so interactive requests keep the
headroom. A real router in front of stub tiers that hold requests on a gate."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from router_harness import KEY, make_config, samples, serve_router
from served import until
from terrace_router.config import EscalationConfig
from terrace_router.policy import decide_flex

pytestmark = pytest.mark.usefixtures("router_keys")
ESC = EscalationConfig()
AUTH = {"authorization": f"Bearer {KEY}"}


def test_decide_flex_takes_the_cheapest_tier_under_the_limit():
    assert decide_flex([0.0, 0.0], 0.5, ESC).order == (0, 1)
    assert decide_flex([0.5, 0.2], 0.5, ESC).order == (1,)  # small at the limit: skipped
    assert decide_flex([0.9, 0.6, 0.1], 0.5, ESC).order == (2,)
    assert decide_flex([0.9, 0.6], 0.5, ESC) is None
    assert decide_flex([0.1, 0.9], 0.5, ESC, pinned=1) is None  # pinned: its tier or nothing
    assert decide_flex([0.1, 0.2], 0.5, ESC, pinned=1).order == (1,)


def body(tier: str | None, model: str = "auto") -> dict:
    out = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return out | ({"service_tier": tier} if tier else {})


def test_flex_takes_spare_capacity_only_and_is_shed_first(stubs, servers):
    small, large = stubs["small"][0], stubs["large"][0]
    gate = threading.Event()
    small.gate = large.gate = gate
    cfg = make_config(stubs, thresholds=[0.0])  # every scored request goes to large
    for t in cfg["tiers"]:
        t["maxInflightPerEndpoint"] = 4  # flex may fill 2 of 4 (flexMaxLoad 0.5)
    url = serve_router(servers, cfg) + "/v1/chat/completions"

    async def run() -> tuple[list[httpx.Response], httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as ac:

            def send(tier: str | None) -> asyncio.Task:
                return asyncio.create_task(ac.post(url, json=body(tier)))

            try:
                flex = [send("flex"), send("flex")]
                await until(lambda: small.inflight == 2)  # the cheapest tier, unscored
                flex += [send("flex"), send("flex")]
                await until(lambda: large.inflight == 2)  # small at 50%: the next one
                shed = await ac.post(url, json=body("flex"))  # both at 50%: shed at once
                interactive = [send(None), send(None)]
                await until(lambda: large.inflight == 4)  # the headroom flex left
                assert small.inflight == 2
            finally:
                gate.set()
            return list(await asyncio.gather(*flex)), shed, list(await asyncio.gather(*interactive))

    flex, shed, interactive = asyncio.run(run())
    assert [r.headers["x-terrace-tier"] for r in flex] == ["small", "small", "large", "large"]
    assert {r.status_code for r in flex + interactive} == {200}
    assert {r.headers["x-terrace-complexity"] for r in flex} == {"flex"}
    assert [r.headers["x-terrace-tier"] for r in interactive] == ["large", "large"]
    assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
    assert (shed.headers["x-terrace-tier"], shed.headers["x-terrace-complexity"]) == (
        "none", "flex"
    )  # fmt: skip
    err = shed.json()["error"]
    assert (err["param"], err["code"]) == ("service_tier", "resource_unavailable")
    assert len(small.requests) == 2 and len(large.requests) == 4  # the shed one reached no tier


def test_a_pinned_flex_request_is_shed_when_its_tier_is_busy_and_bad_tiers_are_400(stubs, servers):
    small = stubs["small"][0]
    small.gate = threading.Event()
    cfg = make_config(stubs)
    cfg["tiers"][0]["maxInflightPerEndpoint"] = 2
    url = serve_router(servers, cfg) + "/v1/chat/completions"

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30, headers=AUTH) as ac:
            held = asyncio.create_task(ac.post(url, json=body("flex", "small")))
            try:
                await until(lambda: small.inflight == 1)
                return await ac.post(url, json=body("flex", "small"))  # 1 of 2: at 50%
            finally:
                small.gate.set()
                await held

    assert asyncio.run(run()).status_code == 429
    bad = httpx.post(url, json=body("cheap"), headers=AUTH, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "service_tier"
    ok = httpx.post(url, json=body("default"), headers=AUTH, timeout=30)
    assert ok.status_code == 200  # other tiers route as usual


DEFERRABLE = {**AUTH, "x-terrace-deferrable": "true"}


def test_batch_work_takes_only_headroom_on_the_tier_the_score_chose(stubs, servers):
    """A deferrable line (terrace-batch, deadline not near) is scored like
    any request, goes to its tier only while that tier is under flexMaxLoad,
    and is shed first (429) otherwise; an interactive request still gets in."""
    large = stubs["large"][0]
    gate = threading.Event()
    large.gate = gate
    cfg = make_config(stubs, thresholds=[0.0])  # every scored request goes to large
    for t in cfg["tiers"]:
        t["maxInflightPerEndpoint"] = 4
    base = serve_router(servers, cfg)
    url = base + "/v1/chat/completions"

    async def run() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as ac:
            try:
                lines = [asyncio.create_task(ac.post(url, json=body(None), headers=DEFERRABLE))
                         for _ in range(2)]  # fmt: skip
                await until(lambda: large.inflight == 2)
                shed = await ac.post(url, json=body(None), headers=DEFERRABLE)  # at 50 %
                interactive = asyncio.create_task(ac.post(url, json=body(None), headers=AUTH))
                await until(lambda: large.inflight == 3)
            finally:
                gate.set()
            return list(await asyncio.gather(*lines)), shed, await interactive

    lines, shed, interactive = asyncio.run(run())
    assert [r.headers["x-terrace-tier"] for r in lines] == ["large", "large"]  # scored, not flex
    assert all(float(r.headers["x-terrace-complexity"]) >= 0 for r in lines)
    assert shed.status_code == 429 and shed.headers["retry-after"] == "1"
    assert shed.json()["error"]["code"] == "resource_unavailable"
    assert interactive.status_code == 200
    assert len(large.requests) == 3 and not stubs["small"][0].requests
    # Demand (what wakes tiers and sizes the operator's cut-off) counts the
    # interactive request only: batch work yields to it.
    assert samples(base, "terrace_router_demand_total") == {(("tier", "large"),): 1.0}


def test_batch_work_never_wakes_a_sleeping_tier(stubs, servers):
    """A tier at zero (nothing listens; the operator's wake endpoint known):
    an interactive request is held and asks the operator to wake it; a
    deferrable line is neither held nor wakes it, and escalates to a tier
    that is up."""
    from served import Reserved, ServerThread
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    reserved = Reserved()
    servers.append(reserved)
    calls: list[str] = []

    async def wake(request: Request) -> JSONResponse:
        calls.append(request.url.path)
        return JSONResponse({"message": "waking"}, 202)

    operator = ServerThread(Starlette(routes=[Route("/wake/{ns}/{name}", wake, methods=["POST"])]))
    servers.append(operator.start())
    cfg = make_config(stubs, thresholds=[2.0])  # every scored request starts on small
    cfg["tiers"][0].update(endpoints=[reserved.url], activationTimeoutSeconds=1.0,
                           wakeUrl=operator.url + "/wake/demo/small")  # fmt: skip
    url = serve_router(servers, cfg) + "/v1/chat/completions"
    with httpx.Client(timeout=30) as c:
        line = c.post(url, json=body(None), headers=DEFERRABLE)
        assert line.status_code == 200 and line.headers["x-terrace-tier"] == "large"
        assert calls == []  # batch work woke nothing
        interactive = c.post(url, json=body(None), headers=AUTH)
    assert interactive.status_code == 200  # held for the activation timeout, then escalated
    assert calls == ["/wake/demo/small"]


def test_batch_work_for_a_sleeping_upper_tier_waits_rather_than_going_smaller(stubs, servers):
    """The score chose the large tier and it is at zero: the line is not
    answered by the small tier (fallbackToSmaller is for interactive
    requests); it comes back 503 and returns to its batch's queue."""
    from served import Reserved

    reserved = Reserved()
    servers.append(reserved)
    cfg = make_config(stubs, thresholds=[0.0])  # every scored request starts on large
    cfg["tiers"][1].update(endpoints=[reserved.url], activationTimeoutSeconds=1.0)
    url = serve_router(servers, cfg) + "/v1/chat/completions"
    with httpx.Client(timeout=30) as c:
        line = c.post(url, json=body(None), headers=DEFERRABLE)
        assert line.status_code == 503, line.headers.get("x-terrace-escalated")
        assert not stubs["small"][0].requests
        interactive = c.post(url, json=body(None), headers=AUTH)
    # An interactive request waits for the tier, then falls back to small.
    assert interactive.status_code == 200 and interactive.headers["x-terrace-tier"] == "small"
