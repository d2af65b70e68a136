"""A tier at zero replicas wakes up on demand, on the real cluster: real
apiserver + kwok, real Prometheus scraping the real `terrace-router`, the
real `terrace-operator`, and real runtimes (Gemma 3 270M on
onnxruntime-genai).

The sleeping tier `sleepy` (min 0) has nothing listening at its address
while it is at zero. The router counts the demand for the tier its routing
decision chose (`terrace_router_demand_total{tier="sleepy"}`), whichever
tier served it: that is what the operator reads to wake a tier at zero.
(Before, a sleeping tier's traffic showed only under the tier that served
it, and the tier never woke.) Two ways to meet a sleeping tier:

- `activationTimeoutSeconds: 0`: requests escalate to `awake` at once, and
  their demand wakes `sleepy`;
- a wait: the request is held until `sleepy` answers. It wakes by its
  demand on the operator's next tick, or at once when the router calls the
  operator's wake endpoint (`wakeUrl`). Here the test plays the kubelet and
  the Service: once the Deployment asks for a replica it starts the tier's
  process, and the tier's address answers once it is ready.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localproc import Relay, ServerProcess  # noqa: E402
from operator_harness import (  # noqa: E402
    OperatorProcess,
    ensure_namespace,
    install_crds,
    install_rbac,
    kubectl_json,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
NS = f"wake-{uuid.uuid4().hex[:6]}"
TICK = 2.0
WINDOW_S = 6  # scale-down stabilization: back to zero this long after demand stops

SLEEPY = {
    "apiVersion": "terrace.dev/v1alpha1",
    "kind": "ModelTier",
    "metadata": {"name": "sleepy", "namespace": NS},
    "spec": {
        "model": {"uri": "file:///models/small/model.onnx", "format": "onnx"},
        "device": "cpu",
        "replicas": {"min": 0, "max": 2},
        "scaling": {
            "metric": "inflight",
            "target": 4,
            "scaleUpStabilizationSeconds": 0,
            "scaleDownStabilizationSeconds": WINDOW_S,
        },
    },
}


def replicas(cluster: Any) -> int:
    d = kubectl_json(cluster, "get", "deployment", "sleepy", "-n", NS)
    return int(d["spec"].get("replicas") or 0)


def _service_address() -> socket.socket:
    """The sleeping tier's address, as a Service's would be: a port this test
    holds bound but not listening (connections are refused, nobody else can
    take it) until a `Relay` listens on it once a pod is ready."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _runtime(name: str, model: str, log: Path) -> ServerProcess:
    argv = [
        sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1",
        "--port", "0", "--model", model, "--format", "onnx", "--name", name,
        "--threads", "1", "--chat-template", "qa",
    ]  # fmt: skip
    return ServerProcess(name, argv, 0, "/v2/health/ready", log)


def _router(
    tmp: Path, sleepy_url: str, awake_url: str, wait_s: float, wake_url: str | None
) -> ServerProcess:
    table = {
        "tiers": [
            {"name": "sleepy", "endpoints": [sleepy_url], "ejectSeconds": 1,
             "activationTimeoutSeconds": wait_s, "wakeUrl": wake_url},
            {"name": "awake", "endpoints": [awake_url], "readTimeoutSeconds": 60},
        ],
        "calibration": {"thresholds": [2.0]},  # every request starts on `sleepy`
        "escalation": {"onLowConfidence": False},
        "cache": {"enabled": False},
    }  # fmt: skip
    path = tmp / f"router-{wait_s:g}-{bool(wake_url)}.yaml"
    path.write_text(yaml.safe_dump(table))
    argv = [sys.executable, "-m", "terrace_router.cli", "serve", "--host", "127.0.0.1",
            "--port", "0", "--config", str(path)]  # fmt: skip
    return ServerProcess("router", argv, 0, "/readyz", tmp / f"{path.stem}.log")


def _ask(router: ServerProcess) -> httpx.Response:
    return httpx.post(
        router.url + "/v1/completions",
        json={"model": "auto", "prompt": "Q: What is the capital of France?\nA:",
              "max_tokens": 4, "temperature": 0},
        timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("wake")
    models = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "real_models.py")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    onnx = json.loads(models.stdout.strip().splitlines()[-1])["onnx"]
    install_crds(cluster)
    install_rbac(cluster)
    ensure_namespace(cluster, NS)
    awake = _runtime("awake", onnx, tmp / "awake.log")
    operator = OperatorProcess(cluster, [NS], tmp / "operator.log", env={
        "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
        "TERRACE_CONTROL_INTERVAL_SECONDS": str(TICK),
        "TERRACE_METRICS_WINDOW": "10s",
    }, wake=True)  # fmt: skip
    try:
        awake.wait(300)
        operator.start()
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(SLEEPY))
        wait_for(lambda: replicas(cluster) == 0, 60, what="the idle tier at zero")
        yield {
            "tmp": tmp,
            "awake": awake,
            "model": onnx,
            "wake": operator.wake_url(NS, "sleepy"),
        }
    finally:
        cluster.kubectl("delete", "modeltier", "sleepy", "-n", NS, "--ignore-not-found",
                        check=False)  # fmt: skip
        operator.stop()
        awake.stop()
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.fixture
def router(cluster, env, request) -> Iterator[tuple[ServerProcess, socket.socket]]:
    """The real router in front of `sleepy` (nothing listens on its address
    until a test starts its process) and `awake`, scraped by Prometheus."""
    address = _service_address()
    url = f"http://127.0.0.1:{address.getsockname()[1]}"
    wait_s, woken = request.param
    server = _router(env["tmp"], url, env["awake"].url, wait_s, env["wake"] if woken else None)
    try:
        server.wait(120)
        cluster.add_scrape_target("wake-router", f"127.0.0.1:{server.port}")
        yield server, address
    finally:
        cluster.remove_scrape_target("wake-router")
        server.stop()
        address.close()
        wait_for(lambda: replicas(cluster) == 0, WINDOW_S + 10 * TICK + 30, interval=0.5,
                 what="the tier back at zero for the next test")  # fmt: skip


def _waking_events(cluster: Any) -> int:
    """WakingUp Events the tier has had so far (a repeated Event counts up)."""
    events = kubectl_json(cluster, "get", "events", "-n", NS,
                          "--field-selector", "involvedObject.name=sleepy,reason=WakingUp")  # fmt: skip
    return sum(int(e.get("count") or 1) for e in events["items"])


def _waking(cluster: Any) -> dict:
    obj = kubectl_json(cluster, "get", "modeltier", "sleepy", "-n", NS)
    scaling = next(c for c in obj["status"]["conditions"] if c["type"] == "Scaling")
    return {"last": obj["status"]["lastScaling"][-1], "reason": scaling["reason"]}


@pytest.mark.parametrize("router", [(0, False)], indirect=True)
def test_demand_that_escalates_past_a_sleeping_tier_wakes_it(cluster, env, router):
    server, _ = router
    answers: list[tuple[int, str]] = []
    stop = threading.Event()
    woken_before = _waking_events(cluster)  # other tests of this module wake it too

    def traffic() -> None:
        while not stop.is_set():
            r = _ask(server)
            answers.append((r.status_code, r.headers.get("x-terrace-tier", "")))
            time.sleep(0.2)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_for(lambda: replicas(cluster) >= 1, 60, interval=0.5,
                 what="the sleeping tier woken by demand that escalated past it")  # fmt: skip
    finally:
        stop.set()
        sender.join(120)
    # Nothing was lost meanwhile: every request was answered by the tier that was up.
    assert answers and all(status == 200 for status, _ in answers), answers[-5:]
    assert {tier for _, tier in answers} == {"awake"}
    woke = _waking(cluster)
    assert woke["last"]["from"] == 0 and woke["last"]["to"] >= 1
    assert _waking_events(cluster) > woken_before, "a WakingUp Event for this wake-up"
    # With the demand gone, back to zero after the window.
    wait_for(lambda: replicas(cluster) == 0, WINDOW_S + 10 * TICK + 30, interval=0.5,
             what="back to zero once the demand stopped")  # fmt: skip


@pytest.mark.parametrize(
    "router", [(90, False), (90, True)], indirect=True, ids=["by-demand", "by-wake-call"]
)
def test_a_held_request_is_served_by_the_tier_it_woke(cluster, env, router, request):
    server, address = router
    woken = request.node.callspec.params["router"][1]
    started: list[ServerProcess] = []

    def kubelet() -> None:
        # The tier's pod: its process starts once the Deployment asks for it,
        # and, as a Service adds a pod only once it is ready, its address
        # starts answering only then.
        wait_for(lambda: replicas(cluster) >= 1, 90, interval=0.5, what="scaled up")
        pod = _runtime("sleepy", env["model"], env["tmp"] / "sleepy.log")
        started.append(pod)
        pod.wait(300)
        started.append(Relay(address, pod.port))

    runner = threading.Thread(target=kubelet, daemon=True)
    runner.start()
    try:
        first = _ask(server)  # at zero: held while the tier wakes
        assert first.status_code == 200, first.text
        assert first.headers["x-terrace-tier"] == "sleepy"
        assert "x-terrace-escalated" not in first.headers
        assert first.json()["choices"][0]["text"]
        scaled = wait_for(lambda: (w := _waking(cluster))["last"]["from"] == 0 and w, 30,
                          what="the wake-up recorded in status")  # fmt: skip
        if woken:  # the router's call, not the next scrape and tick, woke it
            assert "woken by the router" in scaled["last"]["reason"]
        # The next requests go straight to the tier that woke.
        for _ in range(3):
            r = _ask(server)
            assert r.status_code == 200 and r.headers["x-terrace-tier"] == "sleepy"
    finally:
        runner.join(120)
        if started:  # gone with the demand, as its pod would be
            wait_for(lambda: replicas(cluster) == 0, WINDOW_S + 10 * TICK + 30, interval=0.5,
                     what="back to zero once the demand stopped")  # fmt: skip
        for proc in reversed(started):
            proc.stop()
