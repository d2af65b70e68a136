"""Energy per request / per token: the arithmetic, the CPU model, and the
source order tier_energy takes, its PromQL run by a real Prometheus over a
real exposition of the runtime, agent and router counters (with decoys under
other labels)."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from served import Series
from terrace_operator.energy import (
    CpuPowerModel,
    EnergyEstimate,
    EnergyMetrics,
    carbon_grams,
    estimate,
    format_joules,
    tier_energy,
)
from terrace_operator.prometheus import PrometheusClient
from terrace_operator.signals import SignalQueries, read_signals


def test_estimate_per_request_and_per_token():
    e = estimate(1200.0, 100.0, 4000.0, "gpu-agent")
    assert e.per_request == 12.0 and e.per_token == 0.3
    assert estimate(1200.0, 100.0, None, "runtime").per_token is None


@pytest.mark.parametrize(
    "joules,requests", [(None, 1), (1, None), (1, 0), (math.nan, 1), (-1, 5), (1, math.inf)]
)
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


# The counters tier_energy reads for the tier demo/t on gpu-node, as
# `Exposition` series, and decoys under other labels: another tier, another
# namespace, other nodes (one whose name starts with the tier's node name).
def runtime(name: str, namespace: str = "demo", tier: str = "t") -> Series:
    return (name, "counter", (("namespace", namespace), ("tier", tier)))


def router_requests(tier: str = "t") -> Series:
    return ("terrace_router_requests", "counter", (("status", "200"), ("tier", tier)))


def gpu_energy(node: str = "gpu-node") -> Series:
    return ("terrace_gpu_energy_joules", "counter", (("gpu", "0"), ("node", node)))


REQUESTS, TOKENS = "terrace_runtime_requests", "terrace_runtime_tokens_generated"
BUSY, ENERGY = "terrace_runtime_busy_seconds", "terrace_runtime_energy_joules"
ELSEWHERE = (("demo", "other"), ("prod", "t"))  # (namespace, tier) of the decoys


def decoys(name: str, value: float) -> dict[Series, float]:
    """`name` for the decoy runtimes: any of them leaking into a sum shows."""
    return {runtime(name, ns, tier): value * (i + 7) for i, (ns, tier) in enumerate(ELSEWHERE)}


GPU_DECOYS = {gpu_energy("gpu-node-2"): 70_000.0, gpu_energy("cpu-node"): 9_000.0}


def measure(url, device):
    async def go():
        async with PrometheusClient(url) as c:
            signals = await read_signals(c, SignalQueries())
        return tier_energy(signals, "demo", "t", ("gpu-node",), device, CpuPowerModel(5.0))

    return asyncio.run(go())


# Every increase() over the window is 1.5 x the increase shown (see
# `Exposition`): the ratios below do not depend on it, the sums would if a
# decoy leaked in.
def test_gpu_agent_energy_on_a_gpu_tier_and_the_cpu_model_on_a_cpu_one(prom):
    prom.show({
        runtime(REQUESTS): 50, **decoys(REQUESTS, 1000),
        runtime(TOKENS): 1000, **decoys(TOKENS, 30_000),
        runtime(BUSY): 20, **decoys(BUSY, 500),
        **decoys(ENERGY, 90_000),  # the tier's runtime reports no energy
        router_requests(): 999, router_requests("other"): 5000,  # runtime counts win
        gpu_energy(): 5000, **GPU_DECOYS,
    })  # fmt: skip
    e = measure(prom.url, "gpu")
    assert e.source == "gpu-agent"
    assert e.per_request == pytest.approx(100) and e.per_token == pytest.approx(5)
    e = measure(prom.url, "cpu")
    assert e.source == "cpu-model"
    assert e.per_request == pytest.approx(2.0)  # 20 s x 5 W / 50
    assert e.per_token == pytest.approx(0.1)  # 100 J / 1000


def test_the_runtimes_own_energy_comes_first(prom):
    prom.show({
        runtime(REQUESTS): 50, **decoys(REQUESTS, 1000),
        runtime(ENERGY): 250, **decoys(ENERGY, 90_000),
        runtime(BUSY): 20,
        gpu_energy(): 5000, **GPU_DECOYS,
    })  # fmt: skip
    for device in ("cpu", "gpu"):
        e = measure(prom.url, device)
        assert e.source == "runtime" and e.per_request == pytest.approx(5.0), device
        assert e.per_token is None  # the tier's runtime reports no tokens


def test_router_requests_are_the_fallback(prom):
    prom.show({
        **decoys(REQUESTS, 1000),  # runtimes of other tiers only
        router_requests(): 10, router_requests("other"): 500,
        gpu_energy(): 700, **GPU_DECOYS,
    })  # fmt: skip
    e = measure(prom.url, "gpu")
    assert e.source == "gpu-agent" and e.per_request == pytest.approx(70)


def test_no_requests_means_unknown(prom):
    prom.show({
        **decoys(REQUESTS, 1000),
        router_requests(): 0, router_requests("other"): 500,
        gpu_energy(): 700, **GPU_DECOYS,
    })  # fmt: skip
    assert measure(prom.url, "gpu") is None


def test_energy_metrics_export():
    reg = CollectorRegistry()
    m = EnergyMetrics(reg)
    m.record("demo", "big", estimate(100.0, 10.0, 50.0, "gpu-agent"))
    text = generate_latest(reg).decode()
    labels = '{namespace="demo",source="gpu-agent",tier="big"}'
    assert f"terrace_tier_energy_per_request_joules{labels} 10.0" in text
    assert f"terrace_tier_energy_per_token_joules{labels} 2.0" in text


def test_carbon_is_energy_times_intensity_and_unknown_leaves_no_figure():
    e = EnergyEstimate(joules=3.6e6, requests=1000, tokens=200_000, source="runtime")
    grams = carbon_grams(e, 400.0)  # 3.6 kJ a request = 0.001 kWh: 0.4 g; 18 J a token
    assert grams is not None and grams[0] == pytest.approx(0.4)
    assert grams[1] == pytest.approx(18 * 1000 * 400 / 3.6e6)
    assert carbon_grams(e, None) is None and carbon_grams(e, math.nan) is None
    registry = CollectorRegistry()
    metrics = EnergyMetrics(registry)
    metrics.record("demo", "t", e, 400.0)
    assert 'terrace_tier_carbon_per_request_grams{namespace="demo",tier="t"} 0.4' in (
        generate_latest(registry).decode()
    )
    metrics.record("demo", "t", e, None)  # the grid went quiet: no stale 0.4 either
    assert "terrace_tier_carbon_per_request_grams{" not in generate_latest(registry).decode()
