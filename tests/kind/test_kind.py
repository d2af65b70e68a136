"""End to end on kind: Terrace's images in real pods, through the router's Service.

`make test-kind` runs this after `make kind-up` and `make kind-images`
(hack/kind/test.sh). The README's kind quickstart is what sets it up: its
shell block runs as written. Then, on real kubelets and containerd: routing
to both tiers with the real model's answers, a scale-up and scale-down of
real runtime pods under load, a power limit change the fake GPU's agent
enforces and reports back, `helm upgrade` rolling the operator's pod, and
`helm uninstall` leaving nothing behind. The tests tell one story, in file
order (hack/kind/test.sh runs pytest with -p no:randomly).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest
from kind_harness import API_KEY, NS, RELEASE, ROOT, ROUTER_URL, SAMPLES, SYSTEM_NS, Kind, running
from terrace_operator.agent.protocol import ENFORCED_KEY

sys.path.insert(0, str(ROOT / "tests" / "integration"))
from operator_harness import wait_for  # noqa: E402

EASY = ["What is the capital of France?", "How many legs does a spider have?"]
HARD = [
    "Prove that there are infinitely many prime numbers, then generalise the argument to primes "
    "of the form 4k+3.",
    "Write a Python function that parses a context-free grammar in Backus-Naur form and returns "
    "a CYK parser for it; explain its time complexity and give a test.",
]
TIERS = ("small-cpu", "large-gpu")


def quickstart() -> str:
    """The README's kind quickstart: the first bash block of its section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart on kind", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def kind() -> Kind:
    k = Kind()
    k.kubectl("get", "nodes")  # make kind-up ran, or this says why not
    # A run before this one may have left its install behind.
    k.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--ignore-not-found")
    # The samples' PersistentVolume is cluster-scoped: deleting the namespace
    # would leave it Released, and a new claim could not bind it.
    k.kubectl("delete", "-n", NS, "-f", str(SAMPLES), "--ignore-not-found", "--wait=true",
              check=False, timeout=180)  # fmt: skip
    k.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=180)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", quickstart()], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, f"the README's kind quickstart failed:\n{out.stdout}\n{out.stderr}"
    # Its last command asks the router; the real model answers.
    assert "Paris" in out.stdout.splitlines()[-1], out.stdout[-2000:]
    return k


def tiers(kind: Kind) -> dict[str, dict]:
    return {t["metadata"]["name"]: t for t in kind.get("mtier", "-n", NS)["items"]}


def tier_pods(kind: Kind, tier: str) -> list[dict]:
    return [p for p in kind.pods(NS, f"terrace.dev/modeltier={tier}") if running(p)]


def ready(t: dict) -> bool:
    conditions = (t.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def client():
    import openai

    return openai.OpenAI(base_url=ROUTER_URL + "/v1", api_key=API_KEY, max_retries=2, timeout=180)


def ask(prompt: str) -> tuple[str, str]:
    with client() as c:
        raw = c.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}],
            max_tokens=16, temperature=0, stop=["\n"])  # fmt: skip
        return raw.headers["x-terrace-tier"], raw.parse().choices[0].message.content or ""


def test_every_component_runs_in_real_pods(kind: Kind) -> None:
    wait_for(lambda: all(ready(t) for t in tiers(kind).values()) and len(tiers(kind)) == 2,
             600, interval=3, what="both tiers Ready")  # fmt: skip
    gpu_node = next(n for n in kind.get("nodes")["items"]
                    if n["metadata"]["labels"].get("terrace.dev/accelerator") == "nvidia")  # fmt: skip
    # The agent advertised its fake GPU, as a device plugin would.
    assert gpu_node["status"]["allocatable"].get("nvidia.com/gpu") == "1", gpu_node["status"]
    where = {}
    for selector, ns in (
        ("app.kubernetes.io/component=operator", SYSTEM_NS),
        ("app.kubernetes.io/component=power-agent", SYSTEM_NS),
        ("terrace.dev/tierrouter=router", NS),
        ("terrace.dev/modeltier=small-cpu", NS),
        ("terrace.dev/modeltier=large-gpu", NS),
    ):
        pods = wait_for(lambda s=selector, n=ns: [p for p in kind.pods(n, s) if running(p)],
                        300, interval=2, what=f"a running pod for {selector}")  # fmt: skip
        where[selector] = pods[0]["spec"]["nodeName"]
        # Terrace's own images, built here, in real containers.
        image = pods[0]["status"]["containerStatuses"][0]["image"]
        assert "terrace.local/terrace-" in image, image
    gpu = gpu_node["metadata"]["name"]
    assert where["terrace.dev/modeltier=large-gpu"] == gpu, where
    assert where["app.kubernetes.io/component=power-agent"] == gpu, where
    assert where["terrace.dev/modeltier=small-cpu"] != gpu, where


def test_the_router_sends_easy_to_cpu_and_hard_to_gpu_with_real_answers(kind: Kind) -> None:
    easy = [ask(p) for p in EASY]
    hard = [ask(p) for p in HARD]
    assert all(tier == "small-cpu" for tier, _ in easy), easy
    assert "large-gpu" in [tier for tier, _ in hard], hard
    assert "Paris" in easy[0][1], easy  # Gemma 3 270M, on onnxruntime, in a pod
    # Streaming through the router's Service, with the openai client.
    with client() as c:
        stream = c.chat.completions.create(
            model="small-cpu", messages=[{"role": "user", "content": EASY[0]}],
            max_tokens=12, temperature=0, stop=["\n"], stream=True)  # fmt: skip
        assert "Paris" in "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)


def _enforced(kind: Kind) -> dict:
    nodes = kind.get("nodes")["items"]
    node = next(n for n in nodes if ENFORCED_KEY in (n["metadata"].get("annotations") or {}))
    return json.loads(node["metadata"]["annotations"][ENFORCED_KEY])


def test_a_power_limit_change_is_enforced_and_read_back(kind: Kind) -> None:
    def settled_at(watts: int):
        def check():
            report = _enforced(kind)
            gpu = report["gpus"]["0"]
            shown = (tiers(kind)["large-gpu"].get("status") or {}).get("powerLimitWatts")
            ok = report["agent"] == "running" and gpu["enforcedWatts"] == watts == shown
            return gpu if ok else None

        return check

    # Idle: the adaptive policy takes the fake GPU down to minWatts.
    gpu = wait_for(settled_at(200), 480, interval=2, what="the idle GPU capped at 200 W")
    assert gpu["defaultWatts"] == 700, gpu
    kind.kubectl("patch", "mtier", "large-gpu", "-n", NS, "--type=merge",
                 "-p", '{"spec": {"power": {"minWatts": 320}}}')  # fmt: skip
    gpu = wait_for(settled_at(320), 120, interval=2, what="the new floor, enforced")
    assert gpu["enforcedWatts"] == 320, gpu


async def _burst(seconds: float, concurrency: int) -> dict[str, int]:
    import openai

    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        async with openai.AsyncOpenAI(base_url=ROUTER_URL + "/v1", api_key=API_KEY,
                                      max_retries=2, timeout=180) as c:  # fmt: skip
            n = i
            while time.monotonic() < deadline:
                n += 1
                try:
                    raw = await c.chat.completions.with_raw_response.create(
                        model="small-cpu",
                        messages=[{"role": "user", "content": EASY[n % len(EASY)]}],
                        max_tokens=24, temperature=0.7)  # fmt: skip
                    key = raw.headers.get("x-terrace-tier", "?")
                except openai.APIStatusError as e:
                    key = f"HTTP {e.status_code}"
                counts[key] = counts.get(key, 0) + 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return counts


def test_load_scales_real_runtime_pods_up_and_down(kind: Kind) -> None:
    kind.kubectl("patch", "mtier", "small-cpu", "-n", NS, "--type=merge",
                 "-p", '{"spec": {"scaling": {"scaleDownStabilizationSeconds": 15}}}')  # fmt: skip
    assert len(tier_pods(kind, "small-cpu")) == 1
    peak = 1

    async def load_and_watch() -> dict[str, int]:
        nonlocal peak
        task = asyncio.create_task(_burst(60, 8))
        while not task.done():
            peak = max(peak, len(await asyncio.to_thread(tier_pods, kind, "small-cpu")))
            await asyncio.sleep(2)
        return task.result()

    counts = asyncio.run(load_and_watch())
    if peak == 1:  # the loop acts on what Prometheus scraped: a tick or two late
        peak = max(peak, len(wait_for(lambda: [p for p in [tier_pods(kind, "small-cpu")]
                                               if len(p) > 1], 60, interval=2,
                                      what="a second running runtime pod")[0]))  # fmt: skip
    assert counts.get("small-cpu", 0) > 0 and not any(k.startswith("HTTP 5") for k in counts), (
        counts
    )
    assert peak > 1, (peak, counts)
    # Quiet: back to one real pod, the others terminated.
    wait_for(lambda: len(kind.pods(NS, "terrace.dev/modeltier=small-cpu")) == 1, 240,
             interval=3, what="small-cpu back to one pod")  # fmt: skip
    last = tiers(kind)["small-cpu"]["status"]["lastScaling"][-1]
    assert last["from"] > last["to"] == 1, last


def test_helm_upgrade_rolls_the_operator_pod(kind: Kind) -> None:
    selector = "app.kubernetes.io/component=operator"
    [before] = [p["metadata"]["uid"] for p in kind.pods(SYSTEM_NS, selector)]
    kind.install("--reuse-values", "--set", "operator.logLevel=DEBUG")

    def rolled() -> list[dict]:
        pods = kind.pods(SYSTEM_NS, selector)
        return pods if [p["metadata"]["uid"] for p in pods] != [before] and len(pods) == 1 \
            and running(pods[0]) else []  # fmt: skip

    [pod] = wait_for(rolled, 180, interval=2, what="a new operator pod, running")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
    assert "DEBUG" in env.values(), env
    # The new operator takes over: the router it manages still answers.
    wait_for(
        lambda: ask(EASY[0])[0] == "small-cpu", 120, interval=3, what="an answer after upgrade"
    )


def test_uninstall_leaves_nothing_behind(kind: Kind) -> None:
    kind.kubectl("delete", "-n", NS, "-f", str(SAMPLES),
                 "--wait=true", "--timeout=180s", timeout=240)  # fmt: skip
    kind.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "180s")
    left = kind.kubectl("get", "all,serviceaccounts,configmaps,clusterroles,clusterrolebindings",
                        "-A", "-l", "app.kubernetes.io/part-of=terrace", "-o", "name").stdout.split()  # fmt: skip
    assert left == [], left
    # helm waits for its objects; their pods then terminate (grace period).
    wait_for(lambda: kind.pods(NS, "") == kind.pods(SYSTEM_NS, "") == [], 180, interval=3,
             what="every pod of the demo and of the release gone")  # fmt: skip
    pvs = [v["metadata"]["name"] for v in kind.get("pv")["items"]]
    assert "terrace-kind-models" not in pvs, pvs

    def terrace_containers() -> list[str]:
        out = []
        for node in kind.nodes():
            listing = json.loads(
                kind.docker("exec", node, "crictl", "ps", "-a", "-o", "json").stdout
            )
            out += [c["image"]["image"] for c in listing["containers"]
                    if "terrace-" in json.dumps(c.get("image"))]  # fmt: skip
        return out

    wait_for(lambda: not terrace_containers(), 120, interval=3,
             what="no container of Terrace's images on any node")  # fmt: skip
