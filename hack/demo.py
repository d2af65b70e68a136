#!/usr/bin/env python3
"""`make demo`: Terrace end to end on a real (local) Kubernetes control plane.

1. the dev cluster: etcd, kube-apiserver, controllers, scheduler, kwok, Prometheus;
2. the real model: Gemma 3 270M (base) from its PyPI package, converted once
   by `terrace-runtime convert` (hack/real_models.py) and served as /models;
3. `helm install` of charts/terrace (operator + fake-GPU power agent);
4. `kubectl apply` of crds/samples/ (an onnxruntime-genai CPU tier, an
   external llama.cpp tier, a torch "GPU" tier, a router over the three);
5. the pods kwok fakes run as local processes (hack/podrunner.py): the
   operator, the agent, the runtimes, llama-server and the router, the same
   entry points the images run;
6. questions through the `openai` client: the tier, the answer, tokens/s;
   a burst of load; the scaling and power decisions as they happen; joules
   per request and per token per tier.

KEEP=1 leaves everything running and prints how to use it.
tests/e2e/test_demo.py runs the same flow with assertions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

from devcluster import DEFAULT_DIR, Cluster, ClusterError  # noqa: E402
from podrunner import PodRunner  # noqa: E402

NS = "demo"
SYSTEM_NS = "terrace-system"
API_KEY = "sk-terrace-demo-1"  # from crds/samples/tierrouter.yaml's Secret
# Gemma 3 270M is a base model: short factual questions, asked as a "Q: ... A:"
# transcript (the tiers' `qa` chat template), are what it answers well.
EASY = [
    "What is the capital of France?",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
]
HARD = [
    "Prove that there are infinitely many prime numbers, then generalise the argument to primes of the form 4k+3.",
    "Write a Python function that parses a context-free grammar in Backus-Naur form and returns a CYK parser "
    "for it; explain its time complexity and give a test.",
    "A 2.0 kg block slides down a 30 degree incline with kinetic friction coefficient 0.25, then hits a spring "
    "of constant 800 N/m. Derive the maximum compression step by step.",
    "Let G be a finite group of order 2p for an odd prime p. Show that G is cyclic or dihedral, with a full proof.",
]
# Demo-speed control loop: the samples' production windows (minutes) shortened
# so a burst and its aftermath fit in a few minutes. Printed when applied.
DEMO_PATCHES = {
    "small-cpu": {
        "spec": {"replicas": {"max": 3}, "scaling": {"scaleDownStabilizationSeconds": 15}}
    },
    "large-gpu": {
        "spec": {
            "replicas": {"max": 2},
            "scaling": {"metric": "inflight", "target": 2, "scaleDownStabilizationSeconds": 15},
        }
    },
}


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


@dataclass
class Demo:
    cluster: Cluster
    models_dir: Path = ROOT / ".cache" / "models"
    tick_seconds: int = 3
    # Helm release and its namespace (the e2e test uses its own, so it never
    # meets objects other tests left under the default names).
    release: str = "terrace"
    system_ns: str = SYSTEM_NS
    runner: PodRunner | None = None
    router_url: str = ""
    events_seen: set[str] = field(default_factory=set)
    decisions: list[dict] = field(default_factory=list)

    # -- set-up ----------------------------------------------------------
    def helm(self, *args: str) -> str:
        out = subprocess.run(
            [str(self.cluster.bin_dir / "helm"), f"--kubeconfig={self.cluster.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def build_models(self) -> None:
        """The real model, prepared once (hack/real_models.py) and linked as
        <models_dir>/gemma3-270m, which the pods see as /models/gemma3-270m."""
        from real_models import prepare

        paths = prepare()
        self.models_dir.mkdir(parents=True, exist_ok=True)
        link = self.models_dir / "gemma3-270m"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(paths["gguf"].parent, target_is_directory=True)
        for name, path in paths.items():
            files = path.rglob("*") if path.is_dir() else [path]
            size = sum(f.stat().st_size for f in files)
            print(f"    {name:5} {size / 1e6:7.0f} MB  /models/gemma3-270m/{path.name}")

    def install(self) -> None:
        self.helm(
            "upgrade",
            "--install",
            self.release,
            str(ROOT / "charts" / "terrace"),
            "-n",
            self.system_ns,
            "--create-namespace",
            "--wait",
            "--timeout",
            "120s",
            "--set",
            f"operator.prometheusUrl={self.cluster.prometheus_url}",
            "--set",
            f"operator.tickSeconds={self.tick_seconds}",
            "--set",
            "agent.enabled=true",
            "--set",
            "agent.fakeGpus=1",
            "--set",
            "agent.fakeModel=h100",
        )
        print(self.cluster.kubectl("get", "pods", "-n", self.system_ns, "-o", "wide").stdout, end="")

    def apply_samples(self) -> None:
        self.cluster.kubectl("create", "namespace", NS, check=False)
        print(
            self.cluster.kubectl("apply", "-n", NS, "-f", str(ROOT / "crds" / "samples")).stdout,
            end="",
        )
        for tier, patch in DEMO_PATCHES.items():
            self.cluster.kubectl(
                "patch", "mtier", tier, "-n", NS, "--type=merge", "-p", json.dumps(patch)
            )
            print(f"    kubectl patch mtier {tier} --type=merge -p '{json.dumps(patch)}'")

    def run_pods(self) -> None:
        self.runner = PodRunner(
            self.cluster, [self.system_ns, NS], self.models_dir, self.cluster.dir / "pods"
        )
        self.runner.start()

        def up(pods: list) -> bool:
            ready = {
                (p.program, p.labels.get("terrace.dev/modeltier", "")) for p in pods if p.ready
            }
            return {
                ("terrace-operator", ""),
                ("terrace-agent", ""),
                ("terrace-router", ""),
                ("terrace-runtime", "small-cpu"),
                ("terrace-runtime", "large-gpu"),
                ("llama-server", "llama-cpu"),
            } <= ready

        self.runner.wait_ready(up, timeout=240)
        router = next(p for p in self.runner.pods.values() if p.program == "terrace-router")
        self.router_url = router.url
        # The router re-reads its table once a second: wait until the table it
        # serves names a live endpoint for every tier, not a placeholder.
        from podrunner import NO_ENDPOINT

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            routing = router.router_config
            if (
                routing.exists()
                and NO_ENDPOINT not in routing.read_text()
                and time.time() - routing.stat().st_mtime > 2.5
            ):
                break
            time.sleep(0.5)
        print(
            table(
                ["pod", "program", "local address"],
                [[f"{p.namespace}/{p.name}", p.program, p.url] for p in self.runner.pods.values()],
            )
        )

    def wait_tiers_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.cluster.kubectl("get", "mtier,trouter", "-n", NS, "-o", "json").stdout
            items = json.loads(out)["items"]
            ready = [
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (i.get("status") or {}).get("conditions", [])
                )
                for i in items
            ]
            if items and all(ready):
                print(self.cluster.kubectl("get", "terrace", "-n", NS).stdout, end="")
                return
            time.sleep(1)
        raise ClusterError(
            "tiers did not become Ready:\n"
            + self.cluster.kubectl("get", "terrace", "-n", NS).stdout
        )

    # -- traffic -----------------------------------------------------------
    def client(self):
        import openai

        return openai.OpenAI(
            base_url=self.router_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120
        )

    def ask(self, prompts: list[str]) -> list[dict]:
        results = []
        with self.client() as c:
            for prompt in prompts:
                started = time.perf_counter()
                raw = c.chat.completions.with_raw_response.create(
                    model="auto",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=24,
                    temperature=0,
                    stop=["\n"],
                )
                completion = raw.parse()
                seconds = time.perf_counter() - started
                tokens = completion.usage.completion_tokens if completion.usage else 0
                results.append(
                    {
                        "prompt": prompt,
                        "tier": raw.headers.get("x-terrace-tier"),
                        "complexity": float(raw.headers.get("x-terrace-complexity", "nan")),
                        "escalated": raw.headers.get("x-terrace-escalated", "") or "-",
                        "latency_ms": seconds * 1000,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                        "answer": (completion.choices[0].message.content or "").strip(),
                    }
                )
        return results

    async def _burst(self, seconds: float, concurrency: int, counts: dict[str, int]) -> None:
        import openai

        deadline = time.monotonic() + seconds
        prompts = EASY + HARD

        async def worker(i: int) -> None:
            async with openai.AsyncOpenAI(
                base_url=self.router_url + "/v1", api_key=API_KEY, max_retries=2, timeout=120
            ) as c:
                n = i
                while time.monotonic() < deadline:
                    n += 1
                    try:
                        raw = await c.chat.completions.with_raw_response.create(
                            model="auto",
                            messages=[{"role": "user", "content": prompts[n % len(prompts)]}],
                            max_tokens=24,
                            temperature=0.7,
                        )
                        tier = raw.headers.get("x-terrace-tier", "?")
                        counts[tier] = counts.get(tier, 0) + 1
                        # Why an answer came from a larger tier than scored (overload,
                        # low confidence, error): shown beside the tier counts.
                        why = raw.headers.get("x-terrace-escalated")
                        if why:
                            key = f"escalated: {why}"
                            counts[key] = counts.get(key, 0) + 1
                    except openai.APIStatusError as e:
                        counts[f"HTTP {e.status_code}"] = counts.get(f"HTTP {e.status_code}", 0) + 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))

    def burst(self, seconds: float = 45, concurrency: int = 24) -> dict[str, int]:
        counts: dict[str, int] = {}
        asyncio.run(self._burst(seconds, concurrency, counts))
        return counts

    # -- what the operator did -------------------------------------------------
    def new_decisions(self) -> list[dict]:
        out = self.cluster.kubectl("get", "events", "-n", NS, "-o", "json").stdout
        fresh = []
        for e in sorted(
            json.loads(out)["items"],
            key=lambda e: e.get("lastTimestamp") or e["metadata"]["creationTimestamp"],
        ):
            key = e["metadata"]["uid"] + str(e.get("count", 1))
            if key in self.events_seen:
                continue
            self.events_seen.add(key)
            reason = e.get("reason", "")
            if any(w in reason.lower() for w in ("scal", "power")):
                d = {
                    "object": e["involvedObject"]["name"],
                    "reason": reason,
                    "message": e.get("message", ""),
                }
                fresh.append(d)
                self.decisions.append(d)
        return fresh

    def tiers(self) -> dict[str, dict]:
        items = json.loads(self.cluster.kubectl("get", "mtier", "-n", NS, "-o", "json").stdout)[
            "items"
        ]
        return {i["metadata"]["name"]: i for i in items}

    def watch(
        self, seconds: float, until: Callable[[], bool] | None = None, every: float = 3.0
    ) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for d in self.new_decisions():
                print(
                    f"    [{time.strftime('%H:%M:%S')}] {d['object']}: {d['reason']}: {d['message']}",
                    flush=True,
                )
            if until is not None and until():
                return
            time.sleep(every)

    def snapshot(self) -> str:
        rows = []
        for name, t in self.tiers().items():
            st = t.get("status") or {}
            rows.append(
                [
                    name,
                    t["spec"]["device"],
                    f"{st.get('readyReplicas', 0)}/{st.get('replicas', 0)}",
                    st.get("powerLimitWatts", "-"),
                    st.get("energyPerRequestJoules", "-"),
                    st.get("energyPerTokenJoules", "-"),
                ]
            )
        return table(
            ["tier", "device", "ready/replicas", "power limit (W, enforced)", "J/request",
             "J/token"],
            rows,
        )

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
            self.runner = None


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="    %(name)s: %(message)s")
    keep = os.environ.get("KEEP", "") not in ("", "0")
    started = time.monotonic()
    cluster = Cluster(dir=Path(os.environ.get("TERRACE_CLUSTER_DIR", DEFAULT_DIR)).resolve())
    demo = Demo(cluster)
    try:
        step(
            "1/7 Dev cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok, Prometheus (127.0.0.1)"
        )
        print(
            "    kwok fakes the nodes cpu-node and gpu-node; pods scheduled there run NO containers."
        )
        print(
            "    Terrace's pods run as local processes instead (step 5): the same programs the images run."
        )
        if not cluster.up():
            print("    already running; reusing it")
        print(cluster.kubectl("get", "nodes", "-L", "terrace.dev/accelerator").stdout, end="")

        step(
            "2/7 The model: Gemma 3 270M (base, Google's Gemma terms) from PyPI, converted by terrace-runtime convert"
        )
        demo.build_models()

        step(
            "3/7 helm install terrace (operator + power agent on fake GPUs), Prometheus as its metrics source"
        )
        demo.install()

        step(
            "4/7 kubectl apply -f crds/samples/  (onnx CPU tier, external llama.cpp tier, torch GPU tier, a router)"
        )
        demo.apply_samples()

        step(
            "5/7 Running the pods as local processes (operator, agent, runtimes, llama-server, router)"
        )
        demo.run_pods()
        demo.wait_tiers_ready()

        step("6/7 Easy and hard prompts through the openai client (model=auto)")
        results = demo.ask(EASY[:3] + HARD[:3])
        print(
            table(
                ["prompt", "complexity", "tier", "escalated", "tokens/s"],
                [
                    [
                        r["prompt"][:48] + ("…" if len(r["prompt"]) > 48 else ""),
                        f"{r['complexity']:.3f}",
                        r["tier"],
                        r["escalated"],
                        f"{r['tokens_per_s']:.1f}",
                    ]
                    for r in results
                ],
            )
        )
        for r in results:
            print(f"    Q: {r['prompt'][:70]}{'…' if len(r['prompt']) > 70 else ''}")
            print(f"    A ({r['tier']}): {r['answer'][:110]}")

        step(
            "7/7 A burst of load (45 s, 24 clients), then quiet: scaling and power decisions as they happen"
        )
        print(demo.snapshot())
        demo.new_decisions()  # only what happens from here on
        counts: dict[str, int] = {}
        t = threading.Thread(target=lambda: counts.update(demo.burst()), daemon=True)
        t.start()
        while t.is_alive():
            demo.watch(6)
        print(f"    burst done: {counts}")
        print(demo.snapshot())
        peak_watts = (demo.tiers()["large-gpu"].get("status") or {}).get("powerLimitWatts") or 0
        print(
            "    quiet now; waiting for the scale-down window and for the idle GPU to be capped again"
        )

        def settled() -> bool:
            tiers = demo.tiers()
            at_min = all(
                (t.get("status") or {}).get("replicas", 0) <= t["spec"]["replicas"]["min"]
                for t in tiers.values()
            )
            capped = (
                (tiers["large-gpu"].get("status") or {}).get("powerLimitWatts") or 0
            ) < peak_watts
            return at_min and capped

        demo.watch(150, until=settled)
        print(demo.snapshot())
        step(f"Done in {time.monotonic() - started:.0f}s. Decisions: {len(demo.decisions)}")
    except (ClusterError, TimeoutError, subprocess.CalledProcessError) as e:
        print(f"demo failed: {e}", file=sys.stderr)
        demo.stop()
        if not keep:
            cluster.down()
        return 1
    if keep:
        print(cluster.describe())
        print(f"Router (OpenAI API): {demo.router_url}/v1   key: {API_KEY}")
        print(
            "KEEP=1: everything stays up while this process runs; Ctrl-C stops the local pods,"
            " `make cluster-down` the cluster."
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        demo.stop()
    else:
        step("Tearing down (KEEP=1 keeps it running)")
        demo.stop()
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
