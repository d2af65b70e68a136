"""terrace-batch through the real `openai` client: the Files and Batch APIs,
a real `terrace-router` in front of stub tiers as the place lines go, a real
Prometheus for the grid signal, SQLite and a real PostgreSQL as the store."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from router_harness import KEY, client, make_config, serve_router
from served import ServerThread, refusing_url
from terrace_router.batch.cli import BatchSettings, create_service

pytestmark = pytest.mark.usefixtures("router_keys")
GRID = ("grid_intensity_gco2_per_kwh", "gauge", ())


def jsonl(n: int, *, model: str = "auto", url: str = "/v1/chat/completions") -> bytes:
    rows = []
    for i in range(n):
        body: dict[str, Any] = {"model": model}
        if url.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": f"line-{i}"}]
        else:
            body["prompt"] = f"line-{i}"
        rows.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url,
                                "body": body}))  # fmt: skip
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def router(servers, stubs) -> str:
    return serve_router(servers, make_config(stubs))


def serve_batch(servers: list, store: str, router: str, **settings: Any) -> openai.OpenAI:
    s = BatchSettings(store=store, router=router, router_api_key=KEY, interval_seconds=0.05,
                      min_window_seconds=1, **settings)  # fmt: skip
    srv = ServerThread(create_service(s)).start()
    servers.append(srv)
    return client(srv.url)


def metric(c: openai.OpenAI, name: str) -> float:
    text = httpx.get(str(c.base_url).removesuffix("/v1/") + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


def passes(c: openai.OpenAI) -> float:
    return metric(c, "terrace_batch_passes_total")


def upload(c: openai.OpenAI, content: bytes) -> str:
    return c.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch").id


def wait_status(c: openai.OpenAI, batch_id: str, want: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status == want:
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} still {b.status}: {b}"
        time.sleep(0.05)


def lines_of(c: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines() if x]


def test_a_batch_of_500_completes_each_line_answered_once(servers, stubs, router, store_url):
    c = serve_batch(servers, store_url, router, slots=16)
    file_id = upload(c, jsonl(500))
    assert c.files.retrieve(file_id).purpose == "batch"
    batch = c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                             completion_window="24h", metadata={"job": "nightly"})  # fmt: skip
    assert batch.status == "in_progress" and batch.request_counts.total == 500
    done = wait_status(c, batch.id, "completed", 120)
    assert (done.request_counts.completed, done.request_counts.failed) == (500, 0)
    assert done.metadata == {"job": "nightly"} and done.completed_at >= done.created_at
    out = lines_of(c, done.output_file_id)
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(500))
    assert {o["response"]["status_code"] for o in out} == {200} and done.error_file_id is None
    first = next(o for o in out if o["custom_id"] == "req-7")
    assert first["response"]["body"]["choices"][0]["message"]["content"].startswith("answer")
    assert first["error"] is None and first["id"].startswith("batch_req_")
    # Every line reached a tier through the router exactly once.
    sent = [r["messages"][0]["content"] for name in ("small", "large")
            for r in stubs[name][0].requests]  # fmt: skip
    assert sorted(sent) == sorted(f"line-{i}" for i in range(500))
    listed = c.batches.list(limit=5)
    assert listed.data[0].id == batch.id


def test_bad_files_and_bad_batches_get_400s_naming_the_parameter(servers, router, tmp_path):
    c = serve_batch(servers, f"sqlite:///{tmp_path / 'b.db'}", router)
    cases = [
        (b"not jsonl\n", "file", "line 1: not JSON"),
        (jsonl(1).replace(b'"custom_id": "req-0", ', b""), "custom_id", "custom_id"),
        (jsonl(2).replace(b"req-1", b"req-0"), "custom_id", "also on line 1"),
    ]
    for content, param, says in cases:
        with pytest.raises(openai.BadRequestError) as e:
            upload(c, content)
        assert e.value.body["param"] == param and says in e.value.body["message"]
    mismatch = upload(c, jsonl(3, url="/v1/completions"))
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=mismatch, endpoint="/v1/chat/completions",
                         completion_window="24h")  # fmt: skip
    assert e.value.body["param"] == "url" and "line 1" in e.value.body["message"]
    unknown = upload(c, jsonl(2, model="gpt-9"))
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.create(input_file_id=unknown, endpoint="/v1/chat/completions",
                         completion_window="24h")  # fmt: skip
    assert e.value.body["param"] == "body.model" and "'gpt-9'" in e.value.body["message"]
    good = upload(c, jsonl(2))
    for window in ("0h", "24x", "100d"):
        with pytest.raises(openai.BadRequestError) as e:
            c.batches.create(input_file_id=good, endpoint="/v1/chat/completions",
                             completion_window=window)  # type: ignore[arg-type]  # fmt: skip
        assert e.value.body["param"] == "completion_window"
    # Beyond OpenAI's fixed 24h: any window within the bounds.
    assert c.batches.create(input_file_id=good, endpoint="/v1/chat/completions",
                            completion_window="72h").completion_window == "72h"  # type: ignore[arg-type]  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError) as e:
        c.batches.list(after="batch_nope")  # a stale cursor is an error, not page one again
    assert e.value.body["param"] == "after"
    bom = upload(c, b"\xef\xbb\xbf" + jsonl(1))  # a byte-order mark is fine
    assert c.files.retrieve(bom).bytes == len(jsonl(1)) + 3
    assert c.files.delete(good).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(good)


def test_cancel_stops_releasing_lines_and_keeps_what_was_answered(servers, stubs, router, tmp_path):
    gate = threading.Event()
    for name in ("small", "large"):
        stubs[name][0].gate = gate
    c = serve_batch(servers, f"sqlite:///{tmp_path / 'b.db'}", router, slots=4)
    batch = c.batches.create(input_file_id=upload(c, jsonl(50)), endpoint="/v1/chat/completions",
                             completion_window="1h")  # type: ignore[arg-type]  # fmt: skip
    deadline = time.monotonic() + 30
    while sum(stubs[n][0].inflight for n in ("small", "large")) < 4:
        assert time.monotonic() < deadline, "four lines never reached the tiers"
        time.sleep(0.02)
    assert c.batches.cancel(batch.id).status == "cancelling"
    # The four in flight are waited for (OpenAI's "cancelling"), nothing else goes out.
    until = passes(c) + 5
    while passes(c) < until:
        time.sleep(0.02)
    assert c.batches.retrieve(batch.id).status == "cancelling"
    gate.set()
    ended = wait_status(c, batch.id, "cancelled")
    sent = sum(len(stubs[n][0].requests) for n in ("small", "large"))
    assert sent == 4, "no line went out after the cancel"
    assert len(lines_of(c, ended.output_file_id)) == 4  # computed answers are kept
    errors = lines_of(c, ended.error_file_id)
    assert len(errors) == 46 and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert (ended.request_counts.completed, ended.request_counts.failed) == (4, 46)
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(batch.id)


def test_an_expired_window_marks_unfinished_lines(servers, stubs, router, tmp_path):
    gate = threading.Event()  # never opened: nothing is answered in time
    for name in ("small", "large"):
        stubs[name][0].gate = gate
    # Lines in flight at the end are waited for until their lease runs out.
    c = serve_batch(servers, f"sqlite:///{tmp_path / 'b.db'}", router, slots=2, lease_seconds=1)
    try:
        batch = c.batches.create(input_file_id=upload(c, jsonl(10)),
                                 endpoint="/v1/chat/completions",
                                 completion_window="2s")  # type: ignore[arg-type]  # fmt: skip
        ended = wait_status(c, batch.id, "expired", 30)
    finally:
        gate.set()
    errors = lines_of(c, ended.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"req-{i}" for i in range(10))
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert ended.expired_at is not None and ended.request_counts.failed == 10


def test_lines_wait_while_the_grid_is_dirty_and_flow_when_it_is_clean(
    servers, stubs, router, tmp_path, prom
):
    intensity = ("grid_intensity_gco2_per_kwh_now", "gauge", ())
    energy = {("terrace_tier_energy_per_request_joules", "gauge",
               (("namespace", "demo"), ("source", "runtime"), ("tier", t))): j
              for t, j in (("small", 2.0), ("large", 30.0))}  # fmt: skip
    prom.show({GRID: 450.0, intensity: 360.0, **energy})
    c = serve_batch(servers, f"sqlite:///{tmp_path / 'b.db'}", router, prometheus=prom.url,
                    signal=GRID[0], threshold=300, carbon_query=intensity[0])  # fmt: skip
    batch = c.batches.create(input_file_id=upload(c, jsonl(20)), endpoint="/v1/chat/completions",
                             completion_window="1h")  # type: ignore[arg-type]  # fmt: skip
    # Dirty: ten worker passes (each read the signal) and nothing goes out.
    until = passes(c) + 10
    deadline = time.monotonic() + 30
    while passes(c) < until:
        assert sum(len(stubs[n][0].requests) for n in ("small", "large")) == 0
        assert time.monotonic() < deadline, "the worker stopped passing"
        time.sleep(0.02)
    assert sum(len(stubs[n][0].requests) for n in ("small", "large")) == 0
    assert metric(c, "terrace_batch_grid_signal") == 450
    assert c.batches.retrieve(batch.id).request_counts.completed == 0
    prom.show({GRID: 120.0})
    done = wait_status(c, batch.id, "completed", 60)
    assert done.request_counts.completed == 20
    assert metric(c, "terrace_batch_lines_released_total") == 20
    # What it cost: each line at its serving tier's energy per request, at 360 g/kWh.
    served = {name: len(stubs[name][0].requests) for name in ("small", "large")}
    joules = 2.0 * served["small"] + 30.0 * served["large"]
    cost = done.model_extra["terrace"]
    assert cost["lines_measured"] == cost["lines_with_carbon"] == 20
    assert cost["energy_joules"] == pytest.approx(joules)
    assert cost["co2_grams"] == pytest.approx(joules / 3.6e6 * 360, rel=1e-3)


def test_the_router_serves_the_batch_api_on_its_own_address(servers, stubs, tmp_path):
    """One base_url for everything: the router forwards /v1/files and
    /v1/batches to its terrace-batch, whose lines come back through it."""
    plain = serve_router(servers, make_config(stubs))
    batch = serve_batch(servers, f"sqlite:///{tmp_path / 'b.db'}", plain)
    front = client(serve_router(servers, make_config(stubs, batch_url=str(batch.base_url)[:-4])))
    file_id = upload(front, jsonl(30))
    assert front.files.retrieve(file_id).bytes == len(jsonl(30))
    b = front.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                             completion_window="1h")  # type: ignore[arg-type]  # fmt: skip
    done = wait_status(front, b.id, "completed")
    assert len(lines_of(front, done.output_file_id)) == 30
    assert front.batches.list().data[0].id == b.id
    with pytest.raises(openai.NotFoundError):
        front.batches.retrieve("batch_nope")  # the batch service's own 404, relayed
    with pytest.raises(openai.AuthenticationError):
        client(str(front.base_url)[:-4], key="wrong").batches.list()  # the router's keys first
    # A declared size over the limit is refused at once, from the header
    # (the client has sent 1 byte of the 300 MB it announced).
    host, port = str(front.base_url).split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
            + b"\r\ncontent-type: multipart/form-data; boundary=b\r\n"
            + f"content-length: {300 * 1024 * 1024}\r\n\r\nx".encode()
        )  # fmt: skip
        head = sock.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and '"param": "file"' in head
    # A router without spec.batch says so; one whose batch service is gone, 503.
    with pytest.raises(openai.NotFoundError) as e:
        client(plain).batches.list()
    assert "spec.batch" in e.value.body["message"]
    with refusing_url() as gone:
        lost = client(serve_router(servers, make_config(stubs, batch_url=gone)))
        with pytest.raises(openai.InternalServerError) as e:
            lost.batches.list()
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "5"


def test_the_outlook_is_the_forecast_series_by_hours_ahead(prom):
    """A forecast exporter's series (one per `hours_ahead`) read from a real
    Prometheus, soonest first; a series without the label is left out, and
    the outlook is reused (shifted) for OUTLOOK_TTL seconds."""
    import asyncio

    from terrace_router.batch.worker import GridSignal

    forecast = {("grid_forecast_gco2_per_kwh", "gauge", (("hours_ahead", str(h)),)): v
                for h, v in ((1, 300.0), (3, 120.0), (2, 200.0))}  # fmt: skip
    forecast[("grid_forecast_gco2_per_kwh", "gauge", (("zone", "x"),))] = 5.0
    prom.show({GRID: 310.0, **forecast})

    async def read():
        grid = GridSignal(prom.url, GRID[0], forecast_query="grid_forecast_gco2_per_kwh")
        try:
            now = time.time()
            return await grid.read(), await grid.outlook(now), await grid.outlook(now + 60)
        finally:
            await grid.aclose()

    signal, outlook, later = asyncio.run(read())
    assert signal == 310.0
    assert outlook == [(3600.0, 300.0), (7200.0, 200.0), (10800.0, 120.0)]
    assert later == [(3540.0, 300.0), (7140.0, 200.0), (10740.0, 120.0)]


def test_with_no_signal_the_clusters_own_request_rate_is_the_signal(prom):
    """No grid signal configured: the router's demand (its routing
    decisions) stands in, so lines go in the cluster's low-demand hours."""
    import asyncio

    from terrace_router.batch.worker import DEMAND_SIGNAL, GridSignal

    async def read():
        grid = GridSignal(prom.url, None)
        try:
            return grid.query, await grid.read()
        finally:
            await grid.aclose()

    # No router has routed anything yet: no demand, not an unknown signal
    # (which would hold every line until its deadline).
    prom.show({GRID: 1.0})
    assert asyncio.run(read()) == (DEMAND_SIGNAL, 0.0)
    # The router's routing decisions: neither batch lines nor shed requests.
    demand = {("terrace_router_demand", "counter", (("tier", t),)): n * 40
              for t, n in (("small", 6), ("large", 3))}  # fmt: skip
    prom.show(demand)
    query, value = asyncio.run(read())
    assert value is not None and value > 0  # a rate
