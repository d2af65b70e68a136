"""Energy per request / per token: the arithmetic, the CPU model, the source order."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from terrace_operator.energy import (
    CpuPowerModel,
    EnergyMetrics,
    estimate,
    format_joules,
    measure_tier,
)
from terrace_operator.prometheus import PrometheusClient, TierQueries


def test_estimate_per_request_and_per_token():
    e = estimate(1200.0, 100.0, 4000.0, "gpu-agent")
    assert e.per_request == 12.0 and e.per_token == 0.3
    assert estimate(1200.0, 100.0, None, "runtime").per_token is None


@pytest.mark.parametrize("joules,requests", [(None, 1), (1, None), (1, 0), (math.nan, 1), (-1, 5),
                                             (1, math.inf)])
def test_estimate_rejects_unusable_inputs(joules, requests):
    assert estimate(joules, requests, None, "runtime") is None


def test_cpu_model_is_watts_times_busy_core_seconds():
    assert CpuPowerModel().watts_per_busy_core == pytest.approx(6.25)
    assert CpuPowerModel(4.0).joules(30) == 120.0
    assert CpuPowerModel().joules(-3) == 0.0


def test_format_joules_three_significant_digits():
    assert format_joules(12.4321) == "12.4"
    assert format_joules(0.012345) == "0.0123"
    assert format_joules(1234.5) == "1234"
    assert format_joules(0) == "0"


class Fake(BaseHTTPRequestHandler):
    answers: dict[str, float] = {}

    def do_POST(self):  # noqa: N802
        n = int(self.headers["content-length"])
        q = urllib.parse.parse_qs(self.rfile.read(n).decode())["query"][0]
        value = next((v for k, v in self.answers.items() if k in q), None)
        result = [] if value is None else [{"metric": {}, "value": [0, str(value)]}]
        body = json.dumps({"status": "success",
                           "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def prom():
    handler = type("H", (Fake,), {"answers": {}})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield handler.answers, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def measure(url, device):
    async def go():
        async with PrometheusClient(url) as c:
            return await measure_tier(c, TierQueries("demo", "t", nodes=("gpu-node",)), device,
                                      CpuPowerModel(5.0))
    return asyncio.run(go())


def test_source_order_runtime_then_agent_then_cpu_model(prom):
    answers, url = prom
    answers.update({"terrace_runtime_requests_total": 50, "terrace_gpu_energy_joules_total": 5000,
                    "terrace_runtime_busy_seconds_total": 20,
                    "terrace_runtime_tokens_generated_total": 1000})
    e = measure(url, "gpu")
    assert e.source == "gpu-agent" and e.per_request == 100 and e.per_token == 5
    e = measure(url, "cpu")
    assert e.source == "cpu-model" and e.per_request == 2.0  # 20 s x 5 W / 50
    answers["terrace_runtime_energy_joules_total"] = 250
    assert measure(url, "cpu").source == "runtime"
    assert measure(url, "gpu").per_request == 5.0


def test_router_requests_are_the_fallback_and_no_requests_means_unknown(prom):
    answers, url = prom
    answers.update({"terrace_router_requests_total": 10, "terrace_gpu_energy_joules_total": 700})
    assert measure(url, "gpu").per_request == 70
    answers["terrace_router_requests_total"] = 0
    assert measure(url, "gpu") is None


def test_energy_metrics_export():
    reg = CollectorRegistry()
    m = EnergyMetrics(reg)
    m.record("demo", "big", estimate(100.0, 10.0, 50.0, "gpu-agent"))
    text = generate_latest(reg).decode()
    labels = '{namespace="demo",source="gpu-agent",tier="big"}'
    assert f"terrace_tier_energy_per_request_joules{labels} 10.0" in text
    assert f"terrace_tier_energy_per_token_joules{labels} 2.0" in text
