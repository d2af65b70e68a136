"""One control tick of one tier, as `plan.plan` sees it: the tick's signals
read from a real Prometheus (scraping a real prometheus_client exposition,
with decoy series of other tiers, namespaces and nodes), then the pure
decision. The controller that applies a plan runs on the real cluster in
tests/integration/test_control_loop.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from served import refusing_url
from terrace_operator.agent.protocol import (
    ENFORCED_KEY,
    GpuReport,
    desired_entries,
    desired_key,
    encode_enforced,
)
from terrace_operator.api import ModelTierSpec
from terrace_operator.energy import CpuPowerModel
from terrace_operator.plan import TierMemory, append_scaling, observe, plan, plan_scaling
from terrace_operator.prometheus import PrometheusClient, PrometheusUnavailable
from terrace_operator.signals import SignalQueries, read_signals

BIG = (("namespace", "demo"), ("tier", "big"))
INFLIGHT = ("terrace_router_inflight", "gauge", BIG)
ROUTER_REQUESTS = ("terrace_router_requests", "counter", BIG)
DEMAND = ("terrace_router_demand", "counter", BIG)
LATENCY = ("terrace_router_request_duration_seconds", "histogram", BIG)
GPU_UTILIZATION = ("terrace_gpu_utilization_ratio", "gauge", (("node", "gpu-node"),))
RUNTIME_REQUESTS = ("terrace_runtime_requests", "counter", BIG)
RUNTIME_BUSY = ("terrace_runtime_busy_seconds", "counter", BIG)
# Decoys: the same tier name in another namespace, another tier, another node.
DECOYS = {
    ("terrace_router_inflight", "gauge", (("namespace", "other"), ("tier", "big"))): 100,
    ("terrace_router_inflight", "gauge", (("namespace", "demo"), ("tier", "small"))): 50,
    ("terrace_gpu_utilization_ratio", "gauge", (("node", "other-node"),)): 1.0,
}
NODE = "gpu-node"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def spec(device="gpu", **fields) -> ModelTierSpec:
    s = {
        "model": {"uri": "file:///m"},
        "device": device,
        "replicas": {"min": 1, "max": 4},
        "scaling": {
            "metric": "inflight",
            "target": 4,
            "scaleDownStabilizationSeconds": 0,
            "latencyTargetMilliseconds": 1000,
        },
    }
    if device == "gpu":
        s["power"] = {"policy": "adaptive", "minWatts": 200, "maxWatts": 700}
    s.update(fields)
    return ModelTierSpec.model_validate(s)


def signals(url, custom=None):
    async def read():
        async with PrometheusClient(url, 2.0) as client:
            return await read_signals(client, SignalQueries(), custom)

    return asyncio.run(read())


def tick(url, s, *, current=1, status=None, memory=None, annotations=None, now=NOW):
    nodes = (NODE,) if s.device == "gpu" else ()
    obs = observe(s, signals(url), "demo", "big", nodes, CpuPowerModel(5.0))
    return plan(
        s,
        namespace="demo",
        name="big",
        generation=3,
        status=status or {},
        current=current,
        obs=obs,
        nodes=nodes,
        annotations=annotations if annotations is not None else {NODE: {}},
        memory=memory or TierMemory(),
        now=now,
        refresh_after_seconds=200,
    )


def conditions(status):
    return {c["type"]: c for c in status["conditions"]}


def test_one_query_per_metric_kind_whatever_the_number_of_tiers(prom):
    prom.show({INFLIGHT: 3, **DECOYS})
    got = signals(prom.url)
    assert got.queries == len(SignalQueries().grouped()) and not got.errors
    # The tier's own series only: not the other namespace's "big", not "small".
    assert got.tier("inflight", "demo", "big") == 3
    assert got.tier("inflight", "other", "big") == 100
    assert got.gpus("gpuUtilization", "demo", "big", ("other-node",)) == [1.0]
    # A custom query is the user's PromQL: one more query for that tier only.
    custom = {("demo", "big"): 'sum(terrace_router_inflight{namespace="demo"})'}
    got = signals(prom.url, custom)
    assert got.queries == len(SignalQueries().grouped()) + 1
    assert got.custom_value("demo", "big") == 53


def test_a_series_without_namespace_stands_for_the_tier_in_every_namespace(prom):
    bare = ("terrace_router_inflight", "gauge", (("tier", "big"),))
    prom.show(
        {bare: 7, ("terrace_router_inflight", "gauge", (("namespace", "b"), ("tier", "big"))): 2}
    )
    got = signals(prom.url)
    assert got.tier("inflight", "a", "big") == 7  # only the unlabelled series
    assert got.tier("inflight", "b", "big") == 2  # a named series wins over it


def test_scale_up_sets_replicas_records_event_and_status(prom):
    prom.show({INFLIGHT: 14, ROUTER_REQUESTS: 9 * 40, **DECOYS})  # 9 requests/s
    p = tick(prom.url, spec(device="cpu"))
    assert p.replicas == 4
    ((reason, message, _),) = p.events
    assert reason == "ScaledUp" and "inflight=14" in message
    last = p.status["lastScaling"][-1]
    assert (last["from"], last["to"]) == (1, 4)
    c = conditions(p.status)
    assert c["Scaling"]["reason"] == "ScaledUp"
    assert c["MetricsAvailable"]["status"] == "True"
    assert c["MetricsAvailable"]["observedGeneration"] == 3
    assert p.memory.status == p.status  # what the next sync writes without a tick


def test_last_scaling_keeps_five():
    entries = []
    for i in range(8):
        entries = append_scaling(entries, {"to": i})
    assert [e["to"] for e in entries] == [3, 4, 5, 6, 7]


def test_prometheus_down_holds_and_says_so_once():
    with refusing_url() as down:
        p = tick(down, spec(device="cpu"), current=3)
        assert p.replicas is None
        c = conditions(p.status)
        assert c["MetricsAvailable"]["status"] == "False"
        assert "PrometheusUnavailable" in c["MetricsAvailable"]["message"]
        assert c["Scaling"]["reason"] == "MetricsUnavailable"
        assert [e[0] for e in p.events] == ["MetricsUnavailable"]
        # a second tick without metrics: no second warning Event
        again = tick(down, spec(device="cpu"), current=3, status=p.status, memory=p.memory)
        assert again.replicas is None and again.events == ()


def test_every_kind_fails_alone_when_prometheus_is_down():
    with refusing_url() as down:
        got = signals(down)
    assert set(got.errors) == set(SignalQueries().grouped())
    with pytest.raises(PrometheusUnavailable):
        got.tier("inflight", "demo", "big")


def test_a_fresh_memory_holds_replicas_for_a_full_window():
    """A restarted operator knows no past recommendations: it counts the
    current replicas as recommended at its first tick (the real cluster's
    version restarts the operator: tests/integration/test_control_loop.py)."""
    s = spec(device="cpu", scaling={"metric": "inflight", "target": 4,
                                    "scaleDownStabilizationSeconds": 300})  # fmt: skip
    first = plan_scaling(s, 4, 0.0, 0.0, TierMemory(), now=1000.0)
    assert first.replicas == 4
    memory = TierMemory(history=first.history)
    assert plan_scaling(s, 4, 0.0, 0.0, memory, now=1299.0).replicas == 4
    assert plan_scaling(s, 4, 0.0, 0.0, memory, now=1301.0).replicas == 1


def test_power_hands_limit_to_agent_and_reports_enforced(prom):
    # p95 latency 97.5 ms, far under the 1000 ms target; the other node's
    # GPU is busy, and not the tier's.
    prom.show({INFLIGHT: 1, ROUTER_REQUESTS: 40, GPU_UTILIZATION: 0.05, LATENCY: 100, **DECOYS})
    key = desired_key("demo", "big")
    node = {ENFORCED_KEY: encode_enforced([GpuReport(0, 700, 700, 200, 700, 90.0)])}
    p = tick(prom.url, spec(), annotations={NODE: node})
    [entry] = desired_entries(p.annotations[NODE])
    assert entry.watts == 675 and entry.tier == "demo/big"
    assert p.status["desiredPowerLimitWatts"] == 675 and p.status["powerLimitWatts"] == 700
    assert conditions(p.status)["PowerApplied"]["status"] == "False"  # agent not caught up
    assert (p.events[0][0], p.events[0][1][:13]) == ("PowerLimitChanged", "None -> 675 W")
    # The agent enforces it; the next tick reports it and leaves the fresh
    # request alone (no write until it is a third of its TTL old).
    node = {**node, **p.annotations[NODE],
            ENFORCED_KEY: encode_enforced([GpuReport(0, 675, 700, 200, 700)])}  # fmt: skip
    prom.show({GPU_UTILIZATION: 0.7})  # hold band
    again = tick(prom.url, spec(), status=p.status, memory=p.memory, annotations={NODE: node},
                 now=NOW + timedelta(seconds=15))  # fmt: skip
    assert again.status["powerLimitWatts"] == 675 and again.annotations == {}
    assert conditions(again.status)["PowerApplied"]["reason"] == "Enforced"
    later = tick(prom.url, spec(), status=again.status, memory=again.memory,
                 annotations={NODE: node}, now=NOW + timedelta(seconds=201))  # fmt: skip
    assert desired_entries(later.annotations[NODE])[0].watts == 675  # refreshed
    # Policy off: the request is withdrawn from the node.
    off = tick(prom.url, spec(power={"policy": "off"}), status=again.status,
               memory=again.memory, annotations={NODE: node})  # fmt: skip
    assert off.annotations == {NODE: {key: None}}
    assert conditions(off.status)["PowerApplied"]["reason"] == "PolicyOff"
    assert "desiredPowerLimitWatts" not in off.status


def test_a_node_the_tier_left_loses_its_request(prom):
    prom.show({INFLIGHT: 1, GPU_UTILIZATION: 0.7})
    key = desired_key("demo", "big")
    memory = TierMemory(power_nodes=frozenset({"old-node"}))
    p = tick(prom.url, spec(), memory=memory, annotations={NODE: {}, "old-node": {key: "x"}})
    assert p.annotations["old-node"] == {key: None}
    assert p.memory.power_nodes == frozenset({NODE})


def test_power_held_when_metrics_unavailable():
    with refusing_url() as down:
        p = tick(down, spec(), status={"desiredPowerLimitWatts": 450})
    assert p.status["desiredPowerLimitWatts"] == 450


def test_a_woken_tier_is_recorded_and_held_for_the_window(prom):
    # No demand in Prometheus yet (it has not scraped the router since the
    # request arrived): the wake, not the metric, brought the tier up.
    prom.show({INFLIGHT: 0, DEMAND: 0})
    sleepy = spec(device="cpu", replicas={"min": 0, "max": 3},
                  scaling={"metric": "inflight", "target": 4,
                           "scaleDownStabilizationSeconds": 300})  # fmt: skip
    woken_at = NOW - timedelta(seconds=2)
    from terrace_operator.scaling import Recommendation

    memory = TierMemory(
        history=(Recommendation(woken_at.timestamp(), 1),), woken="2026-11-30T11:59:58Z"
    )
    p = tick(prom.url, sleepy, current=1, memory=memory)
    assert p.replicas is None  # held for the scale-down window
    last = p.status["lastScaling"][-1]
    assert (last["from"], last["to"]) == (0, 1) and "woken by the router" in last["reason"]
    assert conditions(p.status)["Scaling"]["reason"] == "WakingUp"
    assert p.memory.woken is None
    # The tick after: Steady, the record stays.
    again = tick(prom.url, sleepy, current=1, status=p.status, memory=p.memory)
    assert conditions(again.status)["Scaling"]["reason"] == "Steady"
    assert again.status["lastScaling"] == p.status["lastScaling"]


def test_cpu_energy_from_the_busy_seconds(prom):
    prom.show({INFLIGHT: 1, RUNTIME_REQUESTS: 10, RUNTIME_BUSY: 4})
    p = tick(prom.url, spec(device="cpu"))
    # increase() extrapolates both counters alike (served.Exposition): the
    # ratio is 4 busy core-seconds x 5 W over 10 requests.
    assert float(p.status["energyPerRequestJoules"]) == pytest.approx(2.0, rel=0.01)


def test_carbon_per_request_from_energy_and_the_grid_and_unknown_is_absent(prom):
    grid = ("grid_gco2_per_kwh", "gauge", ())
    prom.show({INFLIGHT: 1, RUNTIME_REQUESTS: 10, RUNTIME_BUSY: 4, grid: 360.0})

    def with_carbon(query: str) -> dict:
        async def read():
            async with PrometheusClient(prom.url, 2.0) as client:
                return await read_signals(client, SignalQueries(), None, query)

        got = asyncio.run(read())
        assert got.queries == len(SignalQueries().grouped()) + 1
        obs = observe(spec(device="cpu"), got, "demo", "big", (), CpuPowerModel(5.0))
        return plan(spec(device="cpu"), namespace="demo", name="big", generation=3, status={},
                    current=1, obs=obs, nodes=(), annotations={}, memory=TierMemory(),
                    now=NOW, refresh_after_seconds=200).status  # fmt: skip

    status = with_carbon("grid_gco2_per_kwh")
    joules = float(status["energyPerRequestJoules"])  # 2 J (test_cpu_energy_from_the_busy_seconds)
    # 2 J = 2 / 3.6e6 kWh, at 360 g/kWh: 0.0002 g.
    assert float(status["carbonPerRequestGrams"]) == pytest.approx(joules * 360 / 3.6e6, rel=0.01)
    # A series with no data is unknown: no carbon figure, not a zero.
    unknown = with_carbon("grid_gco2_per_kwh_of_nowhere")
    assert "carbonPerRequestGrams" not in unknown and "energyPerRequestJoules" in unknown


def test_the_tick_measures_capacity_and_demand_for_the_routers_cut_off(prom):
    # 9 req/s served by one replica at inflight 14, target 4: 9 * 4/14 req/s
    # per replica at the target, times replicas.max (4).
    prom.show({INFLIGHT: 14, ROUTER_REQUESTS: 9 * 40, DEMAND: 6 * 40, **DECOYS})
    p = tick(prom.url, spec(device="cpu"))
    assert float(p.status["capacityRequestsPerSecond"]) == pytest.approx(9 * 4 / 14 * 4, rel=0.02)
    assert float(p.status["demandRequestsPerSecond"]) == pytest.approx(6, rel=0.02)
    # A restarted operator (empty memory) keeps the status' figure while
    # there is too little traffic to measure.
    prom.show({INFLIGHT: 0})
    kept = tick(prom.url, spec(device="cpu"), status={"capacityRequestsPerSecond": "7.00"})
    assert kept.status["capacityRequestsPerSecond"] == "7.00"
    assert "capacityRequestsPerSecond" not in tick(prom.url, spec(device="cpu")).status
