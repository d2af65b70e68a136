"""One control tick end to end, over a real Prometheus (scraping a real
prometheus_client exposition) and a recording stand-in for the Kubernetes
calls (the cluster version is tests/integration/test_control_loop.py)."""

from __future__ import annotations

import asyncio

import pytest
from served import refusing_url, scraped_prometheus, until
from terrace_operator.agent.protocol import (
    ENFORCED_KEY,
    GpuReport,
    desired_entries,
    desired_key,
    encode_enforced,
)
from terrace_operator.control import Controller, ControlSettings, TierMemory
from terrace_operator.prometheus import PrometheusClient

# The series the tick reads for the tier demo/big (on node gpu-node), as
# (metric family, kind, label pairs).
INFLIGHT = ("terrace_router_inflight", "gauge", (("tier", "big"),))
ROUTER_REQUESTS = ("terrace_router_requests", "counter", (("tier", "big"),))
DEMAND = ("terrace_router_demand", "counter", (("tier", "big"),))
LATENCY = ("terrace_router_request_duration_seconds", "histogram", (("tier", "big"),))
GPU_UTILIZATION = ("terrace_gpu_utilization_ratio", "gauge", (("node", "gpu-node"),))
RUNTIME = (("namespace", "demo"), ("tier", "big"))
RUNTIME_REQUESTS = ("terrace_runtime_requests", "counter", RUNTIME)
RUNTIME_BUSY = ("terrace_runtime_busy_seconds", "counter", RUNTIME)
RUNTIME_TOKENS = ("terrace_runtime_tokens_generated", "counter", RUNTIME)


class Api:
    """Records what the tick asks of Kubernetes."""

    def __init__(self, replicas=1):
        self.replicas = replicas
        self.scale_patches = []
        self.events = []
        self.status = None
        self.nodes = {"gpu-node": {}}
        self.pods_on = {"gpu-node"}
        self.tier = None  # what get_tier answers for demo/big

    async def list_tiers(self, namespaces):
        return [body(), body(device="cpu") | {"metadata": {"name": "small", "namespace": "demo"}}]

    async def get_tier(self, ns, name):
        return self.tier if (ns, name) == ("demo", "big") else None

    async def get_scale(self, ns, name):
        return self.replicas

    async def patch_scale(self, ns, name, n):
        self.scale_patches.append(n)
        self.replicas = n

    async def pod_nodes(self, ns, selector):
        assert selector["terrace.dev/modeltier"] == "big"
        return set(self.pods_on)

    async def node_annotations(self, name):
        return dict(self.nodes.get(name, {}))

    async def patch_node_annotations(self, name, ann):
        for k, v in ann.items():
            if v is None:
                self.nodes[name].pop(k, None)
            else:
                self.nodes[name][k] = v

    async def apply_status(self, body):
        self.status = body["status"]

    async def event(self, involved, reason, message, type):
        self.events.append((reason, message, type))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """One real Prometheus for the module, scraping an `Exposition`."""
    with scraped_prometheus(tmp_path_factory.mktemp("prometheus"), "tick") as prom:
        yield prom


@pytest.fixture
def prom(scraped):
    """The module's Prometheus, holding nothing from another test."""
    scraped.forget()
    return scraped


def body(device="gpu", status=None, **spec):
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
    s.update(spec)
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": "big", "namespace": "demo", "generation": 3, "uid": "u"},
        "spec": s,
        "status": status or {},
    }


def tick(controller, b):
    asyncio.run(_tick(controller, b))


async def _tick(controller, b):
    async with PrometheusClient(controller.settings.prometheus_url, 2.0) as c:
        controller.prometheus = c
        await controller.tick(b)


def make(url, api):
    return Controller(api, None, ControlSettings(prometheus_url=url))


def test_scale_up_patches_scale_records_event_and_status(prom):
    prom.show({INFLIGHT: 14, ROUTER_REQUESTS: 9 * 40})  # 9 requests/s
    api = Api(replicas=1)
    c = make(prom.url, api)
    tick(c, body())
    assert api.scale_patches == [4]
    assert api.events[0][0] == "ScaledUp" and "inflight=14" in api.events[0][1]
    st = api.status
    assert st["lastScaling"][-1]["from"] == 1 and st["lastScaling"][-1]["to"] == 4
    types = {x["type"]: x for x in st["conditions"]}
    assert types["Scaling"]["reason"] == "ScaledUp"
    assert types["MetricsAvailable"]["status"] == "True"
    assert types["MetricsAvailable"]["observedGeneration"] == 3


def test_last_scaling_keeps_five():
    from terrace_operator.control import append_scaling

    entries = []
    for i in range(8):
        entries = append_scaling(entries, {"to": i})
    assert [e["to"] for e in entries] == [3, 4, 5, 6, 7]


def test_prometheus_down_holds_and_flips_condition():
    api = Api(replicas=3)
    with refusing_url() as down:
        c = make(down, api)
        tick(c, body())
    assert api.scale_patches == []
    types = {x["type"]: x for x in api.status["conditions"]}
    assert types["MetricsAvailable"]["status"] == "False"
    assert "PrometheusUnavailable" in types["MetricsAvailable"]["message"]
    assert types["Scaling"]["reason"] == "MetricsUnavailable"
    assert "MetricsUnavailable" in [e[0] for e in api.events]
    # a second tick without metrics: no second warning Event
    n = len(api.events)
    with refusing_url() as down:
        c.settings.prometheus_url = down
        tick(c, body(status=api.status))
    assert len([e for e in api.events[n:] if e[0] == "MetricsUnavailable"]) == 0


def test_a_fresh_memory_holds_replicas_for_a_full_window():
    """A restarted operator knows no past recommendations: it counts the
    current replicas as recommended at its first tick (the real cluster's
    version restarts the operator: tests/integration/test_control_loop.py)."""
    from terrace_operator.api import ModelTierSpec
    from terrace_operator.control import plan_scaling

    spec = ModelTierSpec.model_validate(
        body(device="cpu", scaling={"metric": "inflight", "target": 4,
                                    "scaleDownStabilizationSeconds": 300})["spec"]
    )  # fmt: skip
    memory = TierMemory()
    first = plan_scaling(spec, 4, 0.0, 0.0, memory, now=1000.0)
    assert first.replicas == 4
    memory.history = first.history
    assert plan_scaling(spec, 4, 0.0, 0.0, memory, now=1299.0).replicas == 4
    assert plan_scaling(spec, 4, 0.0, 0.0, memory, now=1301.0).replicas == 1


def test_power_hands_limit_to_agent_and_reports_enforced(prom):
    # p95 latency 97.5 ms, far under the 1000 ms target
    prom.show({INFLIGHT: 1, ROUTER_REQUESTS: 40, GPU_UTILIZATION: 0.05, LATENCY: 100})
    api = Api(replicas=1)
    report = encode_enforced([GpuReport(0, 700, 700, 200, 700, 90.0)])
    api.nodes["gpu-node"][ENFORCED_KEY] = report
    c = make(prom.url, api)
    tick(c, body())
    key = desired_key("demo", "big")
    [entry] = desired_entries(api.nodes["gpu-node"])
    assert entry.watts == 675 and entry.tier == "demo/big"
    st = api.status
    assert st["desiredPowerLimitWatts"] == 675 and st["powerLimitWatts"] == 700
    types = {x["type"]: x for x in st["conditions"]}
    assert types["PowerApplied"]["status"] == "False"  # agent has not caught up yet
    # the agent enforces it; next tick reports it
    api.nodes["gpu-node"][ENFORCED_KEY] = encode_enforced([GpuReport(0, 650, 700, 200, 700)])
    prom.show({GPU_UTILIZATION: 0.7})  # hold band
    tick(c, body(status=st))
    assert api.status["powerLimitWatts"] == 650
    assert api.nodes["gpu-node"][key]
    # policy off: the request is withdrawn from the node
    tick(c, body(status=api.status, power={"policy": "off"}))
    assert key not in api.nodes["gpu-node"]
    assert {x["type"]: x for x in api.status["conditions"]}["PowerApplied"]["reason"] == "PolicyOff"


def test_power_held_when_metrics_unavailable():
    api = Api(replicas=1)
    with refusing_url() as down:
        c = make(down, api)
        c.memory[("demo", "big")] = TierMemory()
        tick(c, body(status={"desiredPowerLimitWatts": 450}))
    assert api.status["desiredPowerLimitWatts"] == 450


def test_run_loop_ticks_every_tier_and_stops(prom):
    from terrace_operator.control import run_loop

    prom.show({INFLIGHT: 14, ROUTER_REQUESTS: 9 * 40})
    api = Api(replicas=1)
    c = make(prom.url, api)
    c.settings.control_interval_seconds = 0.2

    async def go():
        async with PrometheusClient(prom.url, 2.0) as p:
            c.prometheus = p
            stop = asyncio.Event()
            task = asyncio.create_task(run_loop(c, ["demo"], stop))
            # until both tiers have ticked and the big one scaled up
            await until(lambda: len(c.memory) == 2 and 4 in api.scale_patches)
            stop.set()
            await asyncio.wait_for(task, 5)

    asyncio.run(go())
    assert set(c.memory) == {("demo", "big"), ("demo", "small")}
    assert 4 in api.scale_patches


def test_the_wake_endpoint_brings_a_sleeping_tier_up_and_the_next_tick_records_it(prom):
    # No demand in Prometheus yet (it has not scraped the router since the
    # request arrived): the wake, not the metric, brings the tier up.
    prom.show({INFLIGHT: 0, DEMAND: 0})
    sleepy = body(device="cpu", replicas={"min": 0, "max": 3},
                  scaling={"metric": "inflight", "target": 4,
                           "scaleDownStabilizationSeconds": 300})  # fmt: skip
    api = Api(replicas=0)
    api.tier = sleepy
    c = make(prom.url, api)
    assert asyncio.run(c.wake("demo", "big", ["demo"])) == (202, "0 -> 1: waking")
    assert api.scale_patches == [1]
    assert api.events[-1][0] == "WakingUp" and "woken by the router" in api.events[-1][1]
    assert asyncio.run(c.wake("demo", "big", ["demo"]))[0] == 200  # awake: nothing to do
    assert api.scale_patches == [1]
    # The next tick records it in status, and holds the replica for the window
    # even though Prometheus still shows no demand.
    tick(c, sleepy)
    assert api.scale_patches == [1]
    last = api.status["lastScaling"][-1]
    assert (last["from"], last["to"]) == (0, 1) and "woken by the router" in last["reason"]
    scaling = next(x for x in api.status["conditions"] if x["type"] == "Scaling")
    assert scaling["reason"] == "WakingUp"


@pytest.mark.parametrize(
    ("ns", "tier_spec", "replicas", "status"),
    [
        ("other", {"replicas": {"min": 0, "max": 3}}, 0, 404),  # not watched
        ("demo", None, 0, 404),  # no such tier
        ("demo", {"replicas": {"min": 1, "max": 3}}, 1, 409),  # never sleeps
        ("demo", {"replicas": {"min": 0, "max": 3, "count": 0}}, 0, 409),  # an HPA drives it
    ],
)
def test_the_wake_endpoint_touches_only_a_watched_sleeping_tier(
    prom, ns, tier_spec, replicas, status
):
    api = Api(replicas=replicas)
    api.tier = body(device="cpu", **tier_spec) if tier_spec else None
    c = make(prom.url, api)
    got, _ = asyncio.run(c.wake(ns, "big", ["demo"]))
    assert got == status and api.scale_patches == []
