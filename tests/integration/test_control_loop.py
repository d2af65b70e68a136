"""The control loop on the real cluster: real apiserver + kwok, real Prometheus
scraping real processes, the real terrace-operator (as its ServiceAccount),
the real terrace-agent (fake GPUs, as its ServiceAccount) and the real
`terrace-router` in front of upstreams the test controls.

Each tier's upstream is a small OpenAI chat server in this process: it holds
every answer until the test opens its gate (so N waiting clients are exactly N
requests in flight at the router), or answers after a delay the test sets (so
the router's own latency histogram sees it). Load is client threads sending
chat requests through the router, pinned to the tier by its model name;
Prometheus scrapes the router's /metrics. The CPU tier's energy is measured on
a real `terrace-runtime` serving Gemma 3 270M.

Every test has its own ModelTier (the router's table lists them all), drives
it to the state it needs and deletes it at the end, so the file passes in any
order. "Nothing moved" is read off the operator: its per-tier tick counter
(`terrace_operator_control_ticks_total`) and `status.lastScaling`, not a
wall-clock sleep. Ticks are 2 s and Prometheus windows 10 s.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from terrace_operator.agent.protocol import DESIRED_PREFIX, ENFORCED_KEY, desired_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localproc import ServerProcess  # noqa: E402
from operator_harness import (  # noqa: E402
    AgentProcess,
    OperatorProcess,
    Watch,
    condition,
    ensure_namespace,
    install_crds,
    install_rbac,
    kubectl_json,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
NS = f"ctl-{uuid.uuid4().hex[:6]}"  # unique: a reused cluster may still be deleting the last one
TICK = 2.0
WINDOW = "10s"
WATTS_PER_CORE = 8.0  # the operator's CPU power model, set explicitly so the check can see it
AGENT_RBAC = ROOT / "operator/terrace_operator/agent/rbac.yaml"
# One tier per test; the router's table lists them all.
TIERS = ("up", "down", "hold", "external", "restart", "power", "capped", "gone", "cpu-energy",
         "outage-gpu", "outage-zero", "budget-small", "budget-big")  # fmt: skip


# ------------------------------------------------------------------ upstreams


class Upstream:
    """An OpenAI chat endpoint the test controls: each answer waits until the
    gate is open, then `delay_s` more (the service time it pretends)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.gate = threading.Event()
        self.gate.set()
        self.delay_s = 0.0
        self.waiting = 0  # requests received and not yet answered
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with upstream._lock:
                    upstream.waiting += 1
                try:
                    upstream.gate.wait(300)
                    if upstream.delay_s:
                        threading.Event().wait(upstream.delay_s)  # its service time
                finally:
                    with upstream._lock:
                        upstream.waiting -= 1
                answer = json.dumps({
                    "id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", upstream.name),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        self.delay_s = 0.0
        self.gate.set()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


class Clients:
    """`n` client threads sending chat requests for `tier` through the router,
    each waiting for its answer before sending the next, until stopped."""

    def __init__(self, router_url: str, tier: str, n: int, max_tokens: int = 1) -> None:
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=router_url, timeout=300,
                                    limits=httpx.Limits(max_connections=n + 4))  # fmt: skip
        body = {"model": tier, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]}  # fmt: skip

        def run() -> None:
            while not self._stop.is_set():
                try:
                    status = self._client.post("/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as exc:
                    status = -1
                    print(f"client error: {exc!r}")
                self.statuses.append(status)

        self._threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def stop(self, upstream: Upstream | None = None) -> list[int]:
        """Send no more; open `upstream`'s gate so held requests finish; the statuses."""
        self._stop.set()
        if upstream is not None:
            upstream.gate.set()
        for t in self._threads:
            t.join(120)
        self._client.close()
        return self.statuses


# ------------------------------------------------------------------ processes


# ------------------------------------------------------------------ reading


def prom_query(url: str, query: str, **params: str) -> Any:
    q = urllib.parse.urlencode({"query": query, **params})
    path = "query_range" if "step" in params else "query"
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{q}", timeout=5) as r:
        return json.loads(r.read())["data"]["result"]


def prom_value(url: str, query: str) -> float | None:
    try:
        result = prom_query(url, query)
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


def inflight_query(tier: str) -> str:
    return f'sum(terrace_router_inflight{{job="ctl-router",tier="{tier}"}})'


def inflight_samples(url: str, tier: str, seconds: int = 120) -> list[tuple[float, float]]:
    """The raw scrapes of the router's in-flight gauge for `tier`: (time, value)."""
    [series] = prom_query(
        url, f'terrace_router_inflight{{job="ctl-router",tier="{tier}"}}[{seconds}s]'
    )
    return [(float(t), float(v)) for t, v in series["values"]]


def tier_obj(cluster, name: str) -> dict:
    return kubectl_json(cluster, "get", "modeltier", name, "-n", NS)


def replicas(cluster, name: str) -> int:
    d = kubectl_json(cluster, "get", "deployment", name, "-n", NS)
    return int(d["spec"].get("replicas") or 0)


def node_annotations(cluster) -> dict:
    return kubectl_json(cluster, "get", "node", "gpu-node")["metadata"].get("annotations") or {}


def enforced_gpu(cluster) -> dict:
    return json.loads(node_annotations(cluster)[ENFORCED_KEY])["gpus"]["0"]


def unix(rfc3339: str) -> float:
    return datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def operator_metric(operator: OperatorProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(operator.metrics()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def ticks(operator: OperatorProcess, tier: str) -> int:
    """Control ticks this operator process completed for `tier`."""
    v = operator_metric(operator, "terrace_operator_control_ticks_total", namespace=NS, tier=tier)
    return int(v or 0)


def holds_for_ticks(
    operator: OperatorProcess,
    tier: str,
    n: int,
    invariant: Callable[[], bool],
    what: str,
    timeout: float = 60,
) -> None:
    """`invariant` holds, checked at every poll, until the operator has ticked
    `tier` `n` more times (its own counter, not a wall clock)."""
    until = ticks(operator, tier) + n
    deadline = time.monotonic() + timeout
    while True:
        assert invariant(), f"{what}: broken before {n} ticks passed"
        if ticks(operator, tier) >= until:
            assert invariant(), f"{what}: broken on the last of {n} ticks"
            return
        assert time.monotonic() < deadline, f"the operator did not tick {tier} {n} times"
        time.sleep(0.25)


# ------------------------------------------------------------------ fixtures


def write_table(path: Path, urls: dict[str, str]) -> None:
    """The router's routing table: every tier of this module, one endpoint each
    (the router reloads it when it changes)."""
    table = {
        "tiers": [{"name": n, "endpoints": [urls[n]], "readTimeoutSeconds": 300} for n in TIERS],
        "calibration": {"thresholds": [1.0] * (len(TIERS) - 1)},  # requests are pinned anyway
        "escalation": {"onLowConfidence": False},
        "cache": {"enabled": False},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(table))
    tmp.replace(path)  # atomic: the router never reads half a table


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("control")
    install_crds(cluster)
    install_rbac(cluster)
    ensure_namespace(cluster, NS)
    cluster.kubectl("apply", "-n", "terrace-system", "-f", str(AGENT_RBAC))
    upstreams = {name: Upstream(name) for name in TIERS if name != "cpu-energy"}
    urls = {name: u.url for name, u in upstreams.items()}
    # The CPU tier's runtime starts with its test; until then its address is a
    # port this module holds bound and not listening (connections refused).
    idle = socket.socket()
    idle.bind(("127.0.0.1", 0))
    urls["cpu-energy"] = f"http://127.0.0.1:{idle.getsockname()[1]}"
    write_table(tmp / "router.yaml", urls)
    router = ServerProcess(
        "router",
        [sys.executable, "-m", "terrace_router.cli", "serve", "--host", "127.0.0.1",
         "--port", "0", "--config", str(tmp / "router.yaml")],
        0, "/readyz", tmp / "router.log",
    )  # fmt: skip
    operator = OperatorProcess(cluster, [NS], tmp / "operator.log", env={
        "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
        "TERRACE_CONTROL_INTERVAL_SECONDS": str(TICK),
        "TERRACE_METRICS_WINDOW": WINDOW,
        "TERRACE_CPU_WATTS_PER_BUSY_CORE": str(WATTS_PER_CORE),
    })  # fmt: skip
    try:
        router.wait(120)
        cluster.add_scrape_target("ctl-router", f"127.0.0.1:{router.port}")
        operator.start()
        wait_for(lambda: prom_value(cluster.prometheus_url, inflight_query("up")) == 0, 60,
                 what="the router's metrics in Prometheus")  # fmt: skip
        yield {"tmp": tmp, "router": router, "operator": operator, "upstreams": upstreams,
               "urls": urls,
               "agent_kubeconfig": cluster.service_account_kubeconfig("terrace-system",
                                                                      "terrace-agent")}  # fmt: skip
    finally:
        operator.stop()
        router.stop()
        for u in upstreams.values():
            u.close()
        idle.close()
        cluster.remove_scrape_target("ctl-router")
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        if os.environ.get("TERRACE_KEEP_LOGS"):
            print((tmp / "operator.log").read_text()[-5000:])


@pytest.fixture
def operator(env) -> OperatorProcess:
    """The module's operator, running (a failed restart test may have left it stopped)."""
    op: OperatorProcess = env["operator"]
    if not op.alive():
        op.stop()
        op.start()
    return op


@pytest.fixture
def make_tier(cluster, env, operator) -> Iterator[Callable[..., dict]]:
    """Applies a ModelTier of this module and waits until the loop has it in
    hand; deletes it (and waits for it to go) afterwards."""
    made: list[str] = []

    def make(name: str, *, device: str = "cpu", min_: int = 1, max_: int = 4,
             count: int | None = None, down_window: int = 300, power: dict | None = None,
             latency_ms: int = 1000) -> dict:  # fmt: skip
        assert name in TIERS
        spec: dict[str, Any] = {
            "model": {"uri": f"file:///models/{name}/model.onnx", "format": "onnx"},
            "device": device,
            "replicas": {"min": min_, "max": max_} | ({"count": count} if count is not None else {}),
            "scaling": {"metric": "inflight", "target": 4, "scaleUpStabilizationSeconds": 0,
                        "scaleDownStabilizationSeconds": down_window,
                        "metricsUnavailableReplicas": 1,
                        "latencyTargetMilliseconds": latency_ms},
        }  # fmt: skip
        if device == "gpu":
            spec |= {"gpus": 1, "model": {"uri": f"file:///models/{name}/model.pt",
                                          "format": "torch"}}  # fmt: skip
            if power is not None:
                spec["power"] = power
        doc = {"apiVersion": "terrace.dev/v1alpha1", "kind": "ModelTier",
               "metadata": {"name": name, "namespace": NS}, "spec": spec}  # fmt: skip
        made.append(name)
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
        want = min_ if count is None else count
        wait_for(lambda: replicas(cluster, name) == want, 60, what=f"{name} at {want} replicas")
        wait_for(
            lambda: condition(tier_obj(cluster, name), "MetricsAvailable").get("status") == "True",
            60, what=f"{name}: the loop reads its metrics",
        )  # fmt: skip
        return tier_obj(cluster, name)

    yield make
    for name in made:
        if name in env["upstreams"]:
            env["upstreams"][name].reset()
        cluster.kubectl("delete", "modeltier", name, "-n", NS, "--ignore-not-found",
                        "--wait=true", "--timeout=60s", check=False)  # fmt: skip
    for name in made:  # gpu-node has one GPU and one power agent: leave both free
        wait_for(lambda n=name: _released(cluster, n), 60, what=f"{name} gone from gpu-node")


def _released(cluster, name: str) -> bool:
    pods = kubectl_json(cluster, "get", "pods", "-n", NS, "-l", f"terrace.dev/modeltier={name}")
    return not pods["items"] and desired_key(NS, name) not in node_annotations(cluster)


@pytest.fixture
def agent(cluster, env) -> Iterator[dict[str, Any]]:
    """A fresh terrace-agent on gpu-node (fake H100), scraped by Prometheus,
    with nobody else's power request on the node."""
    stale = {k: None for k in node_annotations(cluster) if k.startswith(DESIRED_PREFIX)}
    if stale:
        cluster.kubectl("patch", "node", "gpu-node", "--type=merge", "-p",
                        json.dumps({"metadata": {"annotations": stale}}))  # fmt: skip
    load = env["tmp"] / f"gpu-load-{uuid.uuid4().hex[:6]}"
    load.write_text("0")
    started = math.floor(time.time())  # reports carry whole seconds
    proc = AgentProcess(env["agent_kubeconfig"], "gpu-node", env["tmp"] / "agent.log",
                        load_file=load)  # fmt: skip

    def reporting() -> bool:
        # This agent's report, not one an earlier agent left on the Node.
        report = json.loads(node_annotations(cluster)[ENFORCED_KEY])
        return report["agent"] == "running" and unix(report["time"]) >= started

    try:
        wait_for(lambda: reporting() and proc.proc.poll() is None, 60,
                 what="this agent reporting")  # fmt: skip
        cluster.add_scrape_target("ctl-agent", f"127.0.0.1:{proc.port}")
        yield {"proc": proc, "load": load}
    finally:
        cluster.remove_scrape_target("ctl-agent")
        proc.stop()


# ------------------------------------------------------------------ scaling


def test_load_step_scales_up_within_two_ticks(cluster, env, make_tier, operator):
    make_tier("up")
    upstream = env["upstreams"]["up"]
    upstream.gate.clear()
    # Scaling=ScaledUp holds for one tick (Steady follows): every version seen.
    watch = Watch(cluster, "mtier", "up", NS)
    clients = Clients(env["router"].url, "up", 14)
    try:
        # 14 requests held at the upstream: 14 in flight at the router.
        wait_for(lambda: prom_value(cluster.prometheus_url, inflight_query("up")) == 14, 30,
                 what="14 in flight in Prometheus")  # fmt: skip
        # From the moment Prometheus answers with the crossing, the operator's
        # next two completed ticks of this tier (the first may have read its
        # metrics before) have scaled it: counted in its ticks, not seconds.
        seen = ticks(operator, "up")
        wait_for(lambda: ticks(operator, "up") >= seen + 2, 60, what="two more ticks")
        assert replicas(cluster, "up") == 4, "scaled to ceil(14 / 4) = 4 within two ticks"
        obj = wait_for(lambda: (t := tier_obj(cluster, "up"))["status"].get("lastScaling") and t,
                       10, what="status.lastScaling")  # fmt: skip
        scaled = wait_for(
            lambda: [c for c in watch.conditions("Scaling") if c["reason"] == "ScaledUp"],
            10, what="Scaling=ScaledUp in a version of the tier",
        )  # fmt: skip
    finally:
        statuses = clients.stop(upstream)
        watch.stop()
    assert statuses == [200] * 14, "every held request answered through the router"
    [entry] = obj["status"]["lastScaling"]
    assert (entry["from"], entry["to"]) == (1, 4)
    assert "inflight=14" in entry["reason"]
    assert scaled[0]["message"] == f"1 -> 4: {entry['reason']}"
    assert condition(obj, "MetricsAvailable")["status"] == "True"
    events = kubectl_json(cluster, "get", "events", "-n", NS,
                          "--field-selector", "involvedObject.name=up,reason=ScaledUp")  # fmt: skip
    assert [e["message"] for e in events["items"]] == [f"1 -> 4: {entry['reason']}"]


def _scale_to_four(cluster, env, name: str) -> None:
    """14 held requests until the tier is at 4 replicas; then the load is gone."""
    upstream = env["upstreams"][name]
    upstream.gate.clear()
    clients = Clients(env["router"].url, name, 14)
    try:
        wait_for(lambda: replicas(cluster, name) == 4, 60, what=f"{name} scaled up to 4")
    finally:
        statuses = clients.stop(upstream)
    assert statuses == [200] * 14
    wait_for(lambda: prom_value(cluster.prometheus_url, inflight_query(name)) == 0, 30,
             what="the load gone in Prometheus")  # fmt: skip


def test_scales_down_only_after_the_window(cluster, env, make_tier):
    window = 12
    make_tier("down", down_window=window)
    _scale_to_four(cluster, env, "down")
    samples = inflight_samples(cluster.prometheus_url, "down")
    last_busy = max(i for i, (_, v) in enumerate(samples) if v > 0)
    gone = samples[last_busy + 1][0]  # the first scrape without load
    # Scaling=ScaledDown holds for one tick (Steady follows): every version seen.
    watch = Watch(cluster, "mtier", "down", NS)
    try:
        wait_for(lambda: replicas(cluster, "down") == 1, window + 30, what="back to min replicas")
        scaled = wait_for(
            lambda: [c for c in watch.conditions("Scaling") if c["reason"] == "ScaledDown"],
            10, what="Scaling=ScaledDown in a version of the tier",
        )  # fmt: skip
    finally:
        watch.stop()
    assert scaled[0]["status"] == "True" and scaled[0]["message"].startswith("4 -> 1: ")
    events = kubectl_json(cluster, "get", "events", "-n", NS,
                          "--field-selector", "involvedObject.name=down,reason=ScaledDown")  # fmt: skip
    assert [e["message"] for e in events["items"]] == [scaled[0]["message"]]
    history = wait_for(lambda: len(h := tier_obj(cluster, "down")["status"]["lastScaling"]) >= 2
                       and h, 10, what="the scale-down in status.lastScaling")  # fmt: skip
    up, down = history[-2:]
    assert (up["to"], down["from"], down["to"]) == (4, 4, 1), history
    # The window runs from the last tick that saw load: a tick before that
    # scrape, two if one was skipped (the entry's time is floored to the second).
    assert unix(down["time"]) >= gone - 2 * TICK + window - 1, (down, gone)


def test_prometheus_down_holds_replicas_and_flips_condition(cluster, env, make_tier, operator):
    make_tier("hold")
    upstream = env["upstreams"]["hold"]
    upstream.gate.clear()
    clients = Clients(env["router"].url, "hold", 7)
    statuses: list[int] = []
    try:
        wait_for(lambda: replicas(cluster, "hold") == 2, 30, what="scaled to 2 for 7 in flight")
        before = tier_obj(cluster, "hold")["status"]["lastScaling"]
        cluster.stop_prometheus()
        try:
            wait_for(lambda: condition(tier_obj(cluster, "hold"), "MetricsAvailable")
                     .get("status") == "False", 30, what="MetricsAvailable=False")  # fmt: skip
            obj = tier_obj(cluster, "hold")
            assert "PrometheusUnavailable" in condition(obj, "MetricsAvailable")["message"]
            assert condition(obj, "Scaling")["reason"] == "MetricsUnavailable"
            # Three ticks without metrics: nothing moves, and no scaling is recorded.
            holds_for_ticks(operator, "hold", 3, lambda: replicas(cluster, "hold") == 2,
                            "replicas held at 2 without metrics")  # fmt: skip
            assert tier_obj(cluster, "hold")["status"]["lastScaling"] == before
            warnings = kubectl_json(cluster, "get", "events", "-n", NS, "--field-selector",
                                    "involvedObject.name=hold,reason=MetricsUnavailable")  # fmt: skip
            assert len(warnings["items"]) == 1, "one warning for the outage, not one per tick"
        finally:
            cluster.start_prometheus()
        wait_for(lambda: condition(tier_obj(cluster, "hold"), "MetricsAvailable")
                 .get("status") == "True", 60, what="MetricsAvailable=True again")  # fmt: skip
    finally:
        statuses = clients.stop(upstream)
    assert statuses == [200] * 7


def test_an_external_autoscaler_is_left_alone(cluster, env, make_tier, operator):
    """`spec.replicas.count` set: an HPA or KEDA drives the scale subresource;
    the loop, under load it would scale for, stands aside."""
    make_tier("external", count=2)
    upstream = env["upstreams"]["external"]
    upstream.gate.clear()
    clients = Clients(env["router"].url, "external", 14)
    try:
        wait_for(lambda: prom_value(cluster.prometheus_url, inflight_query("external")) == 14,
                 30, what="14 in flight in Prometheus")  # fmt: skip
        holds_for_ticks(operator, "external", 3, lambda: replicas(cluster, "external") == 2,
                        "replicas left at spec.replicas.count")  # fmt: skip
    finally:
        statuses = clients.stop(upstream)
    assert statuses == [200] * 14
    obj = tier_obj(cluster, "external")
    scaling = condition(obj, "Scaling")
    assert (scaling["status"], scaling["reason"]) == ("False", "ExternalAutoscaler"), scaling
    assert not obj["status"].get("lastScaling")
    deployment = kubectl_json(cluster, "get", "deployment", "external", "-n", NS)
    managers = {m["manager"] for m in deployment["metadata"].get("managedFields") or []}
    assert "terrace-control" not in managers, "the loop never patched the scale subresource"


def test_a_restarted_operator_waits_a_full_window_before_scaling_down(
    cluster, env, make_tier, operator
):
    window = 16
    make_tier("restart", down_window=window)
    _scale_to_four(cluster, env, "restart")
    # Let the old process see the quiet for two ticks, so its own window would
    # end before a restarted one's: only a fresh window explains the wait.
    n = ticks(operator, "restart")
    wait_for(lambda: ticks(operator, "restart") >= n + 2, 30, what="two quiet ticks")
    operator.stop()
    restarted = time.time()
    operator.start()
    # Several ticks of the new process with no load: it holds the 4 replicas.
    holds_for_ticks(operator, "restart", 3, lambda: replicas(cluster, "restart") == 4,
                    "the restarted operator held its replicas")  # fmt: skip
    assert prom_value(cluster.prometheus_url, inflight_query("restart")) == 0
    wait_for(lambda: replicas(cluster, "restart") == 1, window + 30, what="scaled down at last")
    down = tier_obj(cluster, "restart")["status"]["lastScaling"][-1]
    assert (down["from"], down["to"]) == (4, 1)
    assert unix(down["time"]) >= restarted + window - 1, (down, restarted)


# ------------------------------------------------------------------ power


def test_power_limit_down_when_idle_up_when_latency_nears_its_target(
    cluster, env, make_tier, agent
):
    # A 50 W span walks down in five 10 W steps (the hysteresis minimum).
    make_tier("power", device="gpu", max_=1,
              power={"policy": "adaptive", "minWatts": 200, "maxWatts": 250})  # fmt: skip
    wait_for(lambda: desired_key(NS, "power") in node_annotations(cluster), 30,
             what="the tier's power request on its pod's node")  # fmt: skip

    # Idle (the fake GPU at 0 %, no requests): down to minWatts, and the
    # agent's enforced value, read back from the fake NVML, is what status shows.
    def at_minimum() -> dict | None:
        s = tier_obj(cluster, "power")["status"]
        enforced = enforced_gpu(cluster)["enforcedWatts"]
        ok = s.get("powerLimitWatts") == enforced == s.get("desiredPowerLimitWatts") == 200
        return s if ok else None

    wait_for(at_minimum, 60, what="idle GPU at minWatts, enforced by the agent")
    applied = wait_for(lambda: (c := condition(tier_obj(cluster, "power"), "PowerApplied"))
                       .get("status") == "True" and c, 10, what="PowerApplied=True")  # fmt: skip
    assert applied["reason"] == "Enforced", applied

    # Load through the router whose answers take 1.5 s against a 1000 ms
    # target: the router's p95 says the tier is slow though the GPU reads
    # idle, and the limit goes back to maxWatts.
    upstream = env["upstreams"]["power"]
    upstream.delay_s = 1.5
    clients = Clients(env["router"].url, "power", 3)
    try:
        status = wait_for(
            lambda: (s := tier_obj(cluster, "power")["status"]).get("powerLimitWatts") == 250
            and s, 60, what="power limit raised to maxWatts under load",
        )  # fmt: skip
    finally:
        statuses = clients.stop(upstream)
    assert statuses and set(statuses) == {200}
    assert status["desiredPowerLimitWatts"] == 250
    assert enforced_gpu(cluster)["enforcedWatts"] == 250
    events = kubectl_json(cluster, "get", "events", "-n", NS, "--field-selector",
                          "involvedObject.name=power,reason=PowerLimitChanged")  # fmt: skip
    raised = [e["message"] for e in events["items"] if "raise to max" in e["message"]]
    assert raised and "of 1000 ms" in raised[-1], [e["message"] for e in events["items"]]


def test_an_outage_never_lowers_replicas_or_watts_and_the_loop_resumes(
    cluster, env, make_tier, operator, agent
):
    """Prometheus down for more than two ticks: a tier at zero is held at
    `metricsUnavailableReplicas` (1, never 0), an idle GPU tier's cap, on
    its way down, stays where it was (missing data is not low load); both
    carry on when Prometheus is back."""
    make_tier("outage-zero", min_=0, max_=2, down_window=0)
    # A 100 W span walks down in 10 W steps: several ticks to go.
    make_tier("outage-gpu", device="gpu", max_=1,
              power={"policy": "adaptive", "minWatts": 200, "maxWatts": 300})  # fmt: skip

    def desired() -> int | None:
        return tier_obj(cluster, "outage-gpu")["status"].get("desiredPowerLimitWatts")

    wait_for(lambda: (w := desired()) is not None and w < 300, 60,
             what="the idle GPU's cap on its way down")  # fmt: skip
    assert replicas(cluster, "outage-zero") == 0
    cluster.stop_prometheus()
    try:
        for tier in ("outage-gpu", "outage-zero"):
            wait_for(lambda t=tier: condition(tier_obj(cluster, t), "MetricsAvailable")
                     .get("status") == "False", 30, what=f"{tier} MetricsAvailable=False")  # fmt: skip
        held = desired()
        assert held is not None and held > 200, "still above minWatts when the outage began"
        wait_for(lambda: replicas(cluster, "outage-zero") == 1, 30,
                 what="the tier at zero held at metricsUnavailableReplicas=1")  # fmt: skip
        holds_for_ticks(
            operator, "outage-gpu", 3,
            lambda: desired() == held and replicas(cluster, "outage-zero") == 1,
            "cap and replicas held through the outage",
        )  # fmt: skip
        scaling = condition(tier_obj(cluster, "outage-zero"), "Scaling")
        assert "metrics unavailable" in scaling["message"] or scaling["reason"] in (
            "MetricsUnavailable", "WakingUp"
        ), scaling  # fmt: skip
    finally:
        cluster.start_prometheus()
    # Back: the metrics are read again, the cap resumes its walk down and
    # the idle tier returns to zero.
    wait_for(lambda: (w := desired()) is not None and w < held, 90,
             what="the cap lowered again once metrics are back")  # fmt: skip
    wait_for(lambda: replicas(cluster, "outage-zero") == 0, 90, what="the idle tier back at zero")
    assert condition(tier_obj(cluster, "outage-gpu"), "MetricsAvailable")["status"] == "True"


def test_killing_the_agent_restores_the_default_limit(cluster, make_tier, agent):
    make_tier("capped", device="gpu", max_=1,
              power={"policy": "fixed", "minWatts": 200, "maxWatts": 300})  # fmt: skip
    before = wait_for(lambda: (g := enforced_gpu(cluster))["enforcedWatts"] == 300 and g, 30,
                      what="fixed 300 W enforced")  # fmt: skip
    assert before["defaultWatts"] == 700
    wait_for(lambda: tier_obj(cluster, "capped")["status"].get("powerLimitWatts") == 300, 15,
             what="status.powerLimitWatts 300")  # fmt: skip
    assert agent["proc"].stop() == 0
    report = json.loads(node_annotations(cluster)[ENFORCED_KEY])
    assert report["agent"] == "stopped"
    gpu = report["gpus"]["0"]
    # read back from the fake NVML after restoring: the default, 700 W on an H100
    assert gpu["enforcedWatts"] == gpu["defaultWatts"] == 700


def test_a_deleted_tier_withdraws_its_power_request(cluster, make_tier, agent):
    make_tier("gone", device="gpu", max_=1,
              power={"policy": "fixed", "minWatts": 200, "maxWatts": 400})  # fmt: skip
    key = desired_key(NS, "gone")
    wait_for(lambda: enforced_gpu(cluster)["enforcedWatts"] == 400, 30, what="400 W enforced")
    assert json.loads(node_annotations(cluster)[key])["watts"] == 400
    cluster.kubectl("delete", "modeltier", "gone", "-n", NS, "--wait=true", "--timeout=60s")
    # Withdrawn by the operator's next tick (the agent's TTL is ten minutes),
    # and with no request left the agent puts the GPU back to its default.
    wait_for(lambda: key not in node_annotations(cluster), 5 * TICK + 10,
             what="the deleted tier's power request withdrawn")  # fmt: skip
    wait_for(lambda: enforced_gpu(cluster)["enforcedWatts"] == 700, 30,
             what="the GPU back at its default limit")  # fmt: skip


# ------------------------------------------------------------------ energy


@pytest.fixture
def cpu_runtime(cluster, env) -> Iterator[ServerProcess]:
    """Gemma 3 270M on Terrace's onnx runtime, with its own energy estimate off
    (so the operator's CPU power model is the source), scraped with the
    namespace and tier labels the operator selects runtimes by."""
    models = subprocess.run([sys.executable, str(ROOT / "hack" / "real_models.py")],
                            capture_output=True, text=True, check=True)  # fmt: skip
    onnx = json.loads(models.stdout.strip().splitlines()[-1])["onnx"]
    proc = ServerProcess(
        "cpu-energy",
        [sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1",
         "--port", "0", "--model", onnx, "--format", "onnx", "--name", "cpu-energy",
         "--threads", "1", "--chat-template", "qa", "--energy-model", "none"],
        0, "/v2/health/ready", env["tmp"] / "runtime.log",
    )  # fmt: skip
    try:
        proc.wait(300)
        write_table(env["tmp"] / "router.yaml", env["urls"] | {"cpu-energy": proc.url})
        wait_for(lambda: f'endpoint="{proc.url}"' in httpx.get(env["router"].url + "/metrics").text,
                 30, what="the router routing cpu-energy to the runtime")  # fmt: skip
        cluster.add_scrape_target("ctl-runtime", f"127.0.0.1:{proc.port}",
                                  {"namespace": NS, "tier": "cpu-energy"})  # fmt: skip
        yield proc
    finally:
        cluster.remove_scrape_target("ctl-runtime")
        proc.stop()


def test_cpu_tier_energy_from_the_cpu_power_model(cluster, env, make_tier, operator, cpu_runtime):
    make_tier("cpu-energy", max_=1)
    sel = f'{{namespace="{NS}",tier="cpu-energy"}}'

    def increase(metric: str) -> str:
        return f"sum(increase({metric}{sel}[{WINDOW}]))"

    per_request = (f"{WATTS_PER_CORE} * {increase('terrace_runtime_busy_seconds_total')}"
                   f" / {increase('terrace_runtime_requests_total')}")  # fmt: skip
    per_token = (f"{WATTS_PER_CORE} * {increase('terrace_runtime_busy_seconds_total')}"
                 f" / {increase('terrace_runtime_tokens_generated_total')}")  # fmt: skip
    clients = Clients(env["router"].url, "cpu-energy", 1, max_tokens=4)
    try:
        wait_for(lambda: tier_obj(cluster, "cpu-energy")["status"].get("energyPerRequestJoules"),
                 90, what="status.energyPerRequestJoules")  # fmt: skip
        # Steady load for longer than the window and the span checked below
        # (the runtime's busy counter scraped for 25 s), so every window in
        # the span holds only steady load; then two more ticks, then read
        # status and, from the same Prometheus, what the CPU model gives over
        # the span in which the operator's last tick ran.
        wait_for(lambda: (prom_value(cluster.prometheus_url, "count_over_time("
                                     f"terrace_runtime_busy_seconds_total{sel}[30s])") or 0) >= 25,
                 90, what="25 s of steady load in Prometheus")  # fmt: skip
        n = ticks(operator, "cpu-energy")
        wait_for(lambda: ticks(operator, "cpu-energy") >= n + 2, 30, what="two more ticks")
        status = tier_obj(cluster, "cpu-energy")["status"]
        read_at = time.time()
        gauge = operator_metric(operator, "terrace_tier_energy_per_request_joules",
                                namespace=NS, tier="cpu-energy", source="cpu-model")  # fmt: skip
    finally:
        statuses = clients.stop()
    assert statuses and set(statuses) == {200}
    assert gauge is not None, "the operator's gauge says the CPU model was the source"
    span = {"start": f"{read_at - 3 * TICK - 2:.3f}", "end": f"{read_at:.3f}", "step": "0.25"}
    for field, query in (("energyPerRequestJoules", per_request),
                         ("energyPerTokenJoules", per_token)):  # fmt: skip
        [series] = prom_query(cluster.prometheus_url, query, **span)
        values = [float(v) for _, v in series["values"]]
        assert all(math.isfinite(v) for v in values), (field, values)
        got = float(status[field])
        # status holds three significant digits
        assert min(values) * 0.99 <= got <= max(values) * 1.01, (field, got, values)
    assert float(status["energyPerTokenJoules"]) < float(status["energyPerRequestJoules"])


# ------------------------------------------------------------------ budget


def test_the_large_share_follows_a_power_cap_and_returns_when_it_lifts(
    cluster, env, make_tier, operator
):
    """The budget-following cut-off, through the real operator: a GPU tier
    capped by a power window and unable to take the router's target share
    lowers the TierRouter's effective share (status, condition, routing
    table); lifted, with the tier serving faster (what the full clocks
    give; the upstream here is the test's, so its speed is set), the share
    returns to the target."""
    make_tier("budget-small")
    window = {"schedule": "* * * * *", "maxWatts": 300}
    make_tier("budget-big", device="gpu", max_=1, latency_ms=5000,
              power={"policy": "fixed", "minWatts": 200, "maxWatts": 700, "windows": [window]})  # fmt: skip
    router = {"apiVersion": "terrace.dev/v1alpha1", "kind": "TierRouter",
              "metadata": {"name": "budget", "namespace": NS},
              "spec": {"tiers": [{"name": "budget-small"}, {"name": "budget-big"}],
                       "classifier": {"targetLargeSharePercent": 40}}}  # fmt: skip
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(router))
    ups = env["upstreams"]
    # big: 8 clients at 1 s a request, 8 in flight on its one replica (target
    # 4): it serves 4 req/s at its target. small: about 10 req/s. 40 % of
    # 18 req/s is more than the capped tier can take.
    ups["budget-big"].delay_s, ups["budget-small"].delay_s = 1.0, 0.2
    big = Clients(env["router"].url, "budget-big", 8)
    small = Clients(env["router"].url, "budget-small", 2)

    def tr() -> dict:
        return kubectl_json(cluster, "get", "tierrouter", "budget", "-n", NS)

    def table() -> dict:
        cm = kubectl_json(cluster, "get", "configmap", "budget-routing", "-n", NS)
        return yaml.safe_load(cm["data"]["router.yaml"])["calibration"]

    try:
        def capacity() -> float:
            status = tier_obj(cluster, "budget-big")["status"]
            return float(status.get("capacityRequestsPerSecond") or "nan")

        wait_for(lambda: condition(tr(), "LargeShareReduced").get("reason") == "PowerCapped", 120,
                 what="the share cut for the capped tier")  # fmt: skip
        # A load step reads low for one metrics window (the served rate lags
        # the in-flight gauge): on the safe side. Then about 4 req/s.
        wait_for(lambda: 2.5 <= capacity() <= 6, 60, what="the capacity measured steady")
        got = tr()
        share = got["status"]["effectiveLargeSharePercent"]
        message = condition(got, "LargeShareReduced")["message"]
        assert 5 <= share < 40 and "budget-big" in message and "300 W of 700 W" in message
        wait_for(lambda: table().get("effectiveLargeShare") == tr()["status"][
            "effectiveLargeSharePercent"] / 100, 30, what="the routing table follows")  # fmt: skip
        assert table()["targetLargeShare"] == 0.4

        # The cap lifts and the tier is four times faster: the share returns.
        big.stop(ups["budget-big"])
        ups["budget-big"].delay_s = 0.25
        cluster.kubectl("patch", "modeltier", "budget-big", "-n", NS, "--type=merge", "-p",
                        json.dumps({"spec": {"power": {"windows": None}}}))  # fmt: skip
        big = Clients(env["router"].url, "budget-big", 4)
        wait_for(lambda: tr()["status"].get("effectiveLargeSharePercent") == 40, 120,
                 what="the share back at the target")  # fmt: skip
        assert condition(tr(), "LargeShareReduced")["status"] == "False"
        wait_for(lambda: table().get("effectiveLargeShare") is None, 30,
                 what="the routing table back on the target")  # fmt: skip
        assert tier_obj(cluster, "budget-big")["status"]["desiredPowerLimitWatts"] == 700
    finally:
        big.stop(ups["budget-big"])
        small.stop(ups["budget-small"])
        cluster.kubectl("delete", "tierrouter", "budget", "-n", NS, "--ignore-not-found",
                        check=False)  # fmt: skip
