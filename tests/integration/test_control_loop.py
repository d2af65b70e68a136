"""The control loop on the real cluster: real apiserver + kwok, real Prometheus
scraping real processes, the real terrace-operator (as its ServiceAccount) and
the real terrace-agent (fake GPUs, as its ServiceAccount).

The router's metrics come from an HTTP exporter in this test process that
publishes the router's metric names for the tier (in-flight, requests,
demand, latency histogram) at values the test sets: the load step is a step in those
numbers, scraped by Prometheus every second like the router's.

Ticks are 2 s and Prometheus windows 10 s so the whole module takes about a
minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from terrace_operator.agent.protocol import ENFORCED_KEY, desired_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_harness import (  # noqa: E402
    OperatorProcess,
    ensure_namespace,
    free_port,
    install_crds,
    install_rbac,
    kubectl_json,
    wait_for,
)

NS = f"ctl-{uuid.uuid4().hex[:6]}"  # unique: a reused cluster may still be deleting the last one
TIER = "big"
TICK = 2.0
AGENT_RBAC = Path(__file__).resolve().parents[2] / "operator/terrace_operator/agent/rbac.yaml"

TIER_YAML = {
    "apiVersion": "terrace.dev/v1alpha1",
    "kind": "ModelTier",
    "metadata": {"name": TIER, "namespace": NS},
    "spec": {
        "model": {"uri": "file:///models/large/model.pt", "format": "torch"},
        "device": "gpu",
        "gpus": 1,
        "replicas": {"min": 1, "max": 4},
        "scaling": {
            "metric": "inflight",
            "target": 4,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": 12,
            "metricsUnavailableReplicas": 1,
            "latencyTargetMilliseconds": 1000,
        },
        "power": {"policy": "adaptive", "minWatts": 200, "maxWatts": 700},
    },
}


class RouterMetrics:
    """Publishes the router's metric names for one tier; the test sets the load."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.inflight = Gauge("terrace_router_inflight", "in flight", ["tier", "endpoint"],
                              registry=self.registry)
        self.requests = Counter("terrace_router_requests", "requests", ["tier", "status"],
                                registry=self.registry)
        self.demand = Counter("terrace_router_demand", "demand", ["tier"], registry=self.registry)
        self.latency = Histogram("terrace_router_request_duration_seconds", "latency", ["tier"],
                                 registry=self.registry,
                                 buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.5, 2.5, 5.0))
        self.rps = 0.0
        self.latency_s = 0.2
        self._stop = threading.Event()
        self.server, _ = start_http_server(0, "127.0.0.1", self.registry)
        self.inflight.labels(TIER, "e0").set(0)
        self.requests.labels(TIER, "200").inc(0)
        self.demand.labels(TIER).inc(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_port}"

    def set_load(self, inflight: float, rps: float, latency_s: float) -> None:
        self.inflight.labels(TIER, "e0").set(inflight)
        self.rps, self.latency_s = rps, latency_s

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            n = self.rps * 0.1
            if n > 0:
                self.requests.labels(TIER, "200").inc(n)
                self.demand.labels(TIER).inc(n)
                for _ in range(max(1, int(round(n)))):
                    self.latency.labels(TIER).observe(self.latency_s)

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


class AgentProcess:
    def __init__(self, cluster, kubeconfig: Path, load_file: Path, log: Path) -> None:
        self.port = free_port()
        exe = shutil.which("terrace-agent")
        cmd = [exe] if exe else [sys.executable, "-m", "terrace_operator.agent.cli"]
        self.log = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd + ["--node-name", "gpu-node", "--kubeconfig", str(kubeconfig),
                   "--fake-gpus", "1", "--fake-model", "h100", "--fake-load-file", str(load_file),
                   "--metrics-address", "127.0.0.1", "--metrics-port", str(self.port),
                   "--interval", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def prom_value(url: str, query: str) -> float | None:
    q = urllib.parse.urlencode({"query": query})
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=2) as r:
            result = json.loads(r.read())["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def tier(cluster) -> dict:
    return kubectl_json(cluster, "get", "modeltier", TIER, "-n", NS)


def replicas(cluster) -> int:
    d = kubectl_json(cluster, "get", "deployment", TIER, "-n", NS)
    return int(d["spec"].get("replicas") or 0)


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions") or []
                 if c["type"] == type_), {})


def node_annotations(cluster) -> dict:
    return kubectl_json(cluster, "get", "node", "gpu-node")["metadata"].get("annotations") or {}


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    install_crds(cluster)
    install_rbac(cluster)
    ensure_namespace(cluster, NS)
    cluster.kubectl("apply", "-n", "terrace-system", "-f", str(AGENT_RBAC))
    agent_kubeconfig = cluster.service_account_kubeconfig("terrace-system", "terrace-agent")
    # gpu-node is shared by every test on a reused cluster: start without
    # anybody else's power requests on it.
    stale = {k: None for k in node_annotations(cluster) if k.startswith("power.terrace.dev/")}
    if stale:
        cluster.kubectl("patch", "node", "gpu-node", "--type=merge", "-p",
                        json.dumps({"metadata": {"annotations": stale}}))
    load_file = tmp / "gpu-load"
    load_file.write_text("0")
    router = RouterMetrics()
    agent = AgentProcess(cluster, agent_kubeconfig, load_file, tmp / "agent.log")
    operator = OperatorProcess(cluster, [NS], tmp / "operator.log", env={
        "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
        "TERRACE_CONTROL_INTERVAL_SECONDS": str(TICK),
        "TERRACE_METRICS_WINDOW": "10s",
    })
    try:
        cluster.add_scrape_target("ctl-router", router.address)
        cluster.add_scrape_target("ctl-agent", f"127.0.0.1:{agent.port}")
        operator.start()
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(TIER_YAML))
        wait_for(lambda: prom_value(cluster.prometheus_url,
                                    f'sum(terrace_router_inflight{{tier="{TIER}"}})') == 0,
                 60, what="router metrics in Prometheus")
        wait_for(lambda: replicas(cluster) == 1, 60, what="Deployment at min replicas")
        yield {"router": router, "agent": agent, "operator": operator, "load": load_file,
               "tmp": tmp}
    finally:
        # Delete the tier while the operator runs: it withdraws its power request.
        cluster.kubectl("delete", "modeltier", TIER, "-n", NS, "--ignore-not-found", check=False)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: desired_key(NS, TIER) not in node_annotations(cluster), 10,
                     what="power request withdrawn")
        operator.stop()
        agent.stop()
        router.close()
        cluster.remove_scrape_target("ctl-router")
        cluster.remove_scrape_target("ctl-agent")
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        if os.environ.get("TERRACE_KEEP_LOGS"):
            print((tmp / "operator.log").read_text()[-5000:])


def test_load_step_scales_up_within_two_ticks(cluster, env):
    env["router"].set_load(inflight=14, rps=20, latency_s=0.3)
    # The moment Prometheus shows the crossing (14 in flight > 4 per replica)...
    wait_for(lambda: (prom_value(cluster.prometheus_url,
                                 f'sum(terrace_router_inflight{{tier="{TIER}"}})') or 0) > 4,
             30, interval=0.1, what="load step visible in Prometheus")
    crossed = time.monotonic()
    # ...the loop's next two ticks must have scaled it: ceil(14 / 4) = 4.
    wait_for(lambda: replicas(cluster) == 4, 2 * TICK + 1.5, interval=0.1,
             what="scale-up within two ticks")
    scaled_after = time.monotonic() - crossed
    # status follows the scale patch in the same tick
    obj = wait_for(lambda: (t := tier(cluster)).get("status", {}).get("lastScaling") and t,
                   10, what="status.lastScaling")
    last = obj["status"]["lastScaling"][-1]
    assert last["from"] == 1 and last["to"] == 4
    assert "inflight=14" in last["reason"]
    assert condition(obj, "Scaling")["reason"] == "ScaledUp"
    assert condition(obj, "MetricsAvailable")["status"] == "True"
    events = kubectl_json(cluster, "get", "events", "-n", NS,
                          "--field-selector", f"involvedObject.name={TIER},reason=ScaledUp")
    assert events["items"], "a ScaledUp Event"
    print(f"scaled up {scaled_after:.1f} s after the metric crossed its target")


def test_scales_down_only_after_the_window(cluster, env):
    env["router"].set_load(inflight=0, rps=0, latency_s=0.2)
    wait_for(lambda: prom_value(cluster.prometheus_url,
                                f'sum(terrace_router_inflight{{tier="{TIER}"}})') == 0,
             30, interval=0.1, what="load gone in Prometheus")
    gone = time.monotonic()
    # Inside the 12 s window the replicas hold...
    while time.monotonic() - gone < 12 - 2 * TICK:
        assert replicas(cluster) == 4, "scaled down inside the stabilization window"
        time.sleep(0.5)
    # ...and after it they go back to min.
    wait_for(lambda: replicas(cluster) == 1, 30, what="scale-down after the window")
    wait_for(lambda: tier(cluster)["status"]["lastScaling"][-1]["to"] == 1, 10,
             what="scale-down recorded in status.lastScaling")


def test_prometheus_down_holds_replicas_and_flips_condition(cluster, env):
    env["router"].set_load(inflight=7, rps=10, latency_s=0.3)
    wait_for(lambda: replicas(cluster) == 2, 30, what="scaled to 2 for 7 in flight")
    cluster.stop_prometheus()
    try:
        wait_for(lambda: condition(tier(cluster), "MetricsAvailable").get("status") == "False",
                 30, what="MetricsAvailable=False")
        obj = tier(cluster)
        assert "PrometheusUnavailable" in condition(obj, "MetricsAvailable")["message"]
        for _ in range(4):  # several ticks without metrics: nothing moves
            assert replicas(cluster) == 2
            time.sleep(TICK)
    finally:
        cluster.start_prometheus()
    wait_for(lambda: condition(tier(cluster), "MetricsAvailable").get("status") == "True",
             60, what="MetricsAvailable=True again")


def test_power_limit_down_when_idle_up_under_load(cluster, env):
    key = desired_key(NS, TIER)
    env["router"].set_load(inflight=0, rps=0, latency_s=0.2)
    env["load"].write_text("0")

    def lowered():
        s = tier(cluster).get("status", {})
        return s.get("desiredPowerLimitWatts") and s["desiredPowerLimitWatts"] <= 600 and s
    status = wait_for(lowered, 90, what="power limit lowered while idle")
    assert key in node_annotations(cluster)

    # Idle long enough, it walks down to minWatts; then the agent's enforced
    # value (read back from the fake NVML) is what status shows.
    seen = {}

    def at_minimum():
        s = tier(cluster)["status"]
        report = json.loads(node_annotations(cluster)[ENFORCED_KEY])
        enforced = report["gpus"]["0"]["enforcedWatts"]
        seen.update(status=s, enforced=enforced)
        return s.get("powerLimitWatts") == enforced == s.get("desiredPowerLimitWatts") == 200 and s
    try:
        status = wait_for(at_minimum, 90, what="idle GPU at minWatts, enforced by the agent")
    except AssertionError:
        raise AssertionError(f"last seen: {seen}") from None
    low = status["powerLimitWatts"]
    wait_for(lambda: condition(tier(cluster), "PowerApplied").get("status") == "True", 10,
             what="PowerApplied=True")

    # Load: the fake GPU saturates and latency nears its 1000 ms target.
    env["load"].write_text("1.0")
    env["router"].set_load(inflight=3, rps=10, latency_s=0.9)

    def raised():
        s = tier(cluster)["status"]
        return (s.get("powerLimitWatts") or 0) > low and s
    status = wait_for(raised, 60, what="power limit raised under load")
    report = json.loads(node_annotations(cluster)[ENFORCED_KEY])
    assert report["gpus"]["0"]["enforcedWatts"] >= status["powerLimitWatts"] - 0.5


def test_killing_the_agent_restores_the_default_limit(cluster, env):
    agent = env["agent"]
    # policy fixed at 300 W: the agent enforces it on the next ticks
    cluster.kubectl("patch", "modeltier", TIER, "-n", NS, "--type=merge", "-p",
                    json.dumps({"spec": {"power": {"policy": "fixed", "maxWatts": 300}}}))

    def capped():
        gpu = json.loads(node_annotations(cluster)[ENFORCED_KEY])["gpus"]["0"]
        return gpu["enforcedWatts"] == 300 and gpu
    before = wait_for(capped, 30, what="fixed 300 W enforced")
    assert before["defaultWatts"] == 700
    wait_for(lambda: tier(cluster)["status"].get("powerLimitWatts") == 300, 15,
             what="status.powerLimitWatts 300")
    assert agent.stop() == 0
    report = json.loads(node_annotations(cluster)[ENFORCED_KEY])
    assert report["agent"] == "stopped"
    gpu = report["gpus"]["0"]
    # read back from the fake NVML after restoring: the default, 700 W on an H100
    assert gpu["enforcedWatts"] == gpu["defaultWatts"] == 700
