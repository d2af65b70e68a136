"""One control tick end to end, over a real HTTP Prometheus API and a recording
stand-in for the Kubernetes calls (the cluster version is
tests/integration/test_control_loop.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from terrace_operator.agent.protocol import (
    ENFORCED_KEY,
    GpuReport,
    desired_entries,
    desired_key,
    encode_enforced,
)
from terrace_operator.control import Controller, ControlSettings, TierMemory
from terrace_operator.prometheus import PrometheusClient


class Prom(BaseHTTPRequestHandler):
    answers: dict[str, float] = {}
    down = False

    def do_POST(self):  # noqa: N802
        n = int(self.headers["content-length"])
        q = urllib.parse.parse_qs(self.rfile.read(n).decode())["query"][0]
        if self.down:
            body, code = b"down", 503
        else:
            v = next((v for k, v in self.answers.items() if k in q), None)
            res = [] if v is None else [{"metric": {}, "value": [0, str(v)]}]
            body = json.dumps({"status": "success",
                               "data": {"resultType": "vector", "result": res}}).encode()
            code = 200
        self.send_response(code)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


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


@pytest.fixture
def prom():
    handler = type("H", (Prom,), {"answers": {}, "down": False})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield handler, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def body(device="gpu", status=None, **spec):
    s = {"model": {"uri": "file:///m"}, "device": device, "replicas": {"min": 1, "max": 4},
         "scaling": {"metric": "inflight", "target": 4, "scaleDownStabilizationSeconds": 0,
                     "latencyTargetMilliseconds": 1000}}
    if device == "gpu":
        s["power"] = {"policy": "adaptive", "minWatts": 200, "maxWatts": 700}
    s.update(spec)
    return {"apiVersion": "terrace.dev/v1alpha1", "kind": "ModelTier",
            "metadata": {"name": "big", "namespace": "demo", "generation": 3, "uid": "u"},
            "spec": s, "status": status or {}}


def tick(controller, b):
    asyncio.run(_tick(controller, b))


async def _tick(controller, b):
    async with PrometheusClient(controller.settings.prometheus_url, 2.0) as c:
        controller.prometheus = c
        await controller.tick(b)


def make(url, api):
    return Controller(api, None, ControlSettings(prometheus_url=url))


def test_scale_up_patches_scale_records_event_and_status(prom):
    h, url = prom
    h.answers.update({"terrace_router_inflight": 14, "terrace_router_requests_total": 9})
    api = Api(replicas=1)
    c = make(url, api)
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


def test_prometheus_down_holds_and_flips_condition(prom):
    h, url = prom
    h.down = True
    api = Api(replicas=3)
    c = make(url, api)
    tick(c, body())
    assert api.scale_patches == []
    types = {x["type"]: x for x in api.status["conditions"]}
    assert types["MetricsAvailable"]["status"] == "False"
    assert "PrometheusUnavailable" in types["MetricsAvailable"]["message"]
    assert types["Scaling"]["reason"] == "MetricsUnavailable"
    assert ("MetricsUnavailable" in [e[0] for e in api.events])
    # a second tick without metrics: no second warning Event
    n = len(api.events)
    tick(c, body(status=api.status))
    assert len([e for e in api.events[n:] if e[0] == "MetricsUnavailable"]) == 0


def test_external_autoscaler_stands_aside(prom):
    h, url = prom
    h.answers.update({"terrace_router_inflight": 40, "terrace_router_requests_total": 9})
    api = Api(replicas=2)
    tick(make(url, api), body(replicas={"min": 1, "max": 4, "count": 2}))
    assert api.scale_patches == []
    types = {x["type"]: x for x in api.status["conditions"]}
    assert types["Scaling"]["reason"] == "ExternalAutoscaler"


def test_restart_does_not_scale_down_before_a_window(prom):
    h, url = prom
    h.answers.update({"terrace_router_inflight": 0, "terrace_router_requests_total": 0})
    api = Api(replicas=4)
    c = make(url, api)
    tick(c, body(scaling={"metric": "inflight", "target": 4,
                          "scaleDownStabilizationSeconds": 300}))
    assert api.scale_patches == []


def test_power_hands_limit_to_agent_and_reports_enforced(prom):
    h, url = prom
    h.answers.update({"terrace_router_inflight": 1, "terrace_router_requests_total": 1,
                      "terrace_gpu_utilization_ratio": 0.05, "histogram_quantile": 100})
    api = Api(replicas=1)
    report = encode_enforced([GpuReport(0, 700, 700, 200, 700, 90.0)])
    api.nodes["gpu-node"][ENFORCED_KEY] = report
    c = make(url, api)
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
    h.answers["terrace_gpu_utilization_ratio"] = 0.7  # hold band
    tick(c, body(status=st))
    assert api.status["powerLimitWatts"] == 650
    assert api.nodes["gpu-node"][key]
    # policy off: the request is withdrawn from the node
    tick(c, body(status=api.status, power={"policy": "off"}))
    assert key not in api.nodes["gpu-node"]
    assert {x["type"]: x for x in api.status["conditions"]}["PowerApplied"]["reason"] == "PolicyOff"


def test_power_held_when_metrics_unavailable(prom):
    h, url = prom
    h.down = True
    api = Api(replicas=1)
    c = make(url, api)
    c.memory[("demo", "big")] = TierMemory()
    tick(c, body(status={"desiredPowerLimitWatts": 450}))
    assert api.status["desiredPowerLimitWatts"] == 450


def test_cpu_tier_energy_per_request_from_cpu_model(prom):
    h, url = prom
    h.answers.update({"terrace_router_inflight": 2, "terrace_router_requests_total": 5,
                      "terrace_runtime_requests_total": 100,
                      "terrace_runtime_busy_seconds_total": 32,
                      "terrace_runtime_tokens_generated_total": 800})
    api = Api(replicas=1)
    tick(make(url, api), body(device="cpu"))
    assert api.status["energyPerRequestJoules"] == "2.00"  # 32 s x 6.25 W / 100
    assert api.status["energyPerTokenJoules"] == "0.250"  # the same 200 J / 800 tokens


def test_run_loop_ticks_every_tier_and_stops(prom):
    from terrace_operator.control import run_loop

    h, url = prom
    h.answers.update({"terrace_router_inflight": 14, "terrace_router_requests_total": 9})
    api = Api(replicas=1)
    c = make(url, api)
    c.settings.control_interval_seconds = 0.2

    async def go():
        async with PrometheusClient(url, 2.0) as p:
            c.prometheus = p
            stop = asyncio.Event()
            task = asyncio.create_task(run_loop(c, ["demo"], stop))
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(task, 5)

    asyncio.run(go())
    assert set(c.memory) == {("demo", "big"), ("demo", "small")}
    assert 4 in api.scale_patches


def test_deleted_tier_withdraws_its_power_request(prom):
    from terrace_operator.control import run_loop

    h, url = prom
    h.answers.update({"terrace_router_inflight": 1, "terrace_router_requests_total": 1,
                      "terrace_gpu_utilization_ratio": 0.1})
    api = Api(replicas=1)
    c = make(url, api)
    tick(c, body())
    key = desired_key("demo", "big")
    assert key in api.nodes["gpu-node"]
    api.list_tiers = lambda namespaces: asyncio.sleep(0, result=[])  # the tier is gone
    c.settings.control_interval_seconds = 0.1

    async def go():
        stop = asyncio.Event()
        task = asyncio.create_task(run_loop(c, ["demo"], stop))
        await asyncio.sleep(0.15)
        stop.set()
        await task

    asyncio.run(go())
    assert key not in api.nodes["gpu-node"]
    assert c.memory == {}


def test_the_wake_endpoint_brings_a_sleeping_tier_up_and_the_next_tick_records_it(prom):
    h, url = prom
    # No demand in Prometheus yet (it has not scraped the router since the
    # request arrived): the wake, not the metric, brings the tier up.
    h.answers.update({"terrace_router_inflight": 0, "terrace_router_demand_total": 0})
    sleepy = body(device="cpu", replicas={"min": 0, "max": 3},
                  scaling={"metric": "inflight", "target": 4,
                           "scaleDownStabilizationSeconds": 300})  # fmt: skip
    api = Api(replicas=0)
    api.tier = sleepy
    c = make(url, api)
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
def test_the_wake_endpoint_touches_only_a_watched_sleeping_tier(prom, ns, tier_spec, replicas,
                                                                 status):
    _, url = prom
    api = Api(replicas=replicas)
    api.tier = body(device="cpu", **tier_spec) if tier_spec else None
    c = make(url, api)
    got, _ = asyncio.run(c.wake(ns, "big", ["demo"]))
    assert got == status and api.scale_patches == []
