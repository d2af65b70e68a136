"""How fast terrace-operator converges, what its control tick costs, how much memory it needs.

    python bench/operator.py                                # 200 tiers, 1 namespace
    python bench/operator.py --tiers 1000 --namespaces 50   # the issue's scale
    TERRACE_CLUSTER_DIR=DIR python bench/operator.py        # reuse a running dev cluster

Runs the real operator (as its ServiceAccount, like the tests) against the
real dev cluster (kube-apiserver, controllers, scheduler, kwok, Prometheus),
with TERRACE_PROMETHEUS_URL set to the cluster's Prometheus and a control
interval of --interval seconds (5), watching exactly the bench's namespaces
(-n, one kopf watch per namespace and kind). Three phases, one operator:

1. one tier: seconds from `kubectl apply` of one ModelTier to its Ready
   condition, and how long after its pods turned Ready that was
   (target: under 2 s after the pods);
2. a small count (--small, default --tiers/10, no pods): until all Ready,
   then the control tick over --ticks ticks (as in 3); then deleted;
3. --tiers ModelTiers spread round-robin over --namespaces namespaces,
   created with one `kubectl create` of one multi-document YAML:
   * ready_s: wall time from the start of `kubectl create` until every tier
     is Ready, and on the way when all Deployments existed (the operator),
     were rolled out (kube-controller-manager, at its default 20 requests/s
     the slow part at 1,000 tiers) and all pods were Ready, all seen through
     watches, not polls;
   * tick_p95_s: p95 of terrace_operator_control_tick_duration_seconds over
     --ticks (8) ticks that start after all tiers are Ready. The bench
     scrapes the operator's /metrics every second, more often than a tick
     (every 5 s), so between two scrapes `_count` grows by one and the growth
     of `_sum` is that one tick's exact duration: p95 is taken (nearest rank)
     over those per-tick observations (with 8 ticks, that is the slowest).
     The p95 interpolated from the bucket increase over the same window
     (what histogram_quantile would say; coarse, the buckets are 0.5, 1, 2 s)
     is printed too. The histogram times a tick from sending the tick's
     Prometheus queries to the last tier's tick tried;
   * queries_per_tick: increase of terrace_operator_prometheus_queries_total
     divided by the increase of the histogram's `_count` over that window
     (the window starts and ends right after a tick completed), here and in
     phase 2: equal values show it does not grow with the number of tiers.
     The per-tier terrace_operator_control_ticks_total says whether every
     tier ticked in every one of those ticks;
   * rss_mb: the operator's peak RSS (VmHWM) at the end, which covers all
     phases.

Pods: the two kwok nodes hold 110 pods each. In phase 3 as many tiers as
there are free pod slots (less 10) get one pod: replicas {min: 1, max: 1}
and no count, so their tick runs the scaling decision (with no router series
in Prometheus it holds 1 replica, MetricsUnavailable). Every other tier (and
every phase-2 tier) is pinned at zero with replicas {min: 0, max: 1, count:
0}: Ready with no pods (a min-0 tier without count would not do: with no
metrics the tick holds at least one replica). A tier with `count` still
ticks every interval (signals observed, status and energy kept; the scaling
decision stands aside for the external count). All tiers are CPU tiers, so
power control is off and a tick makes no API call unless something changes.

Targets (the issue): all Ready; operator peak RSS < 300 MB; control tick
p95 < 2 s at 1,000 tiers; Prometheus queries per tick constant in the number
of tiers. Prints a table; the last line is JSON with tiers, ready_s, rss_mb,
tick_p95_s, queries_per_tick and more.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import ssl
import sys
import tempfile
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from devcluster import Cluster  # noqa: E402
from operator_harness import (  # noqa: E402
    OperatorProcess,
    install_crds,
    install_rbac,
    is_ready,
)

BENCH_LABEL = "terrace.dev/bench"
PHASE_LABEL = "terrace.dev/bench-phase"
RUNTIME_SELECTOR = "app.kubernetes.io/name=terrace-runtime"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
TIERS_PATH = "/apis/terrace.dev/v1alpha1/modeltiers"

TICK = "terrace_operator_control_tick_duration_seconds"
QUERIES = "terrace_operator_prometheus_queries_total"
TIER_TICKS = "terrace_operator_control_ticks_total"
# How often the tick window scrapes the operator: well under the interval, so
# one tick at a time completes between scrapes; no more often, since every
# scrape renders a sample per tier in the operator (its CPU, its GIL).
SCRAPE_EVERY = 1.0


def namespaces(n: int) -> list[str]:
    return ["bench-operator"] if n == 1 else [f"bench-operator-{i:02d}" for i in range(n)]


def tier(name: str, namespace: str, replicas: dict, phase: str) -> dict:
    # Tolerating the GPU node's taint lets the scheduler spread the pods over
    # both kwok nodes (110 pods each).
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": name, "namespace": namespace, "labels": {PHASE_LABEL: phase}},
        "spec": {
            "model": {"uri": f"file:///models/{name}.onnx"},
            "replicas": replicas,
            "tolerations": [GPU_TOLERATION],
        },
    }


ONE_POD = {"min": 1, "max": 1}  # the tick decides (and holds 1 without metrics)
AT_ZERO = {"min": 0, "max": 1, "count": 0}  # pinned at zero: Ready, no pods


class Api:
    """Admin reads straight from the apiserver: cheap enough to poll every 20 ms.

    Credentials come from the cluster's admin kubeconfig itself (CA, client
    certificate or token), not from the operator's client code."""

    def __init__(self, kubeconfig: Path, scratch: Path) -> None:
        doc = yaml.safe_load(kubeconfig.read_text())
        ctx_name = doc.get("current-context")
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cl = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
        scratch.mkdir(parents=True, exist_ok=True)

        def file_of(key: str) -> str | None:
            if user.get(f"{key}-data"):
                path = scratch / key
                path.write_bytes(base64.b64decode(user[f"{key}-data"]))
                path.chmod(0o600)
                return str(path)
            return user.get(key)

        if cl.get("certificate-authority-data"):
            ca = base64.b64decode(cl["certificate-authority-data"]).decode()
            verify = ssl.create_default_context(cadata=ca)
        else:
            verify = ssl.create_default_context(cafile=cl.get("certificate-authority"))
        cert, key = file_of("client-certificate"), file_of("client-key")
        if cert and key:
            verify.load_cert_chain(cert, key)
        self._base = cl["server"]
        self._verify = verify
        self._headers = {"Authorization": f"Bearer {user['token']}"} if user.get("token") else {}
        self.http = self.client()

    def client(self) -> httpx.Client:
        """A client of its own (one per thread)."""
        return httpx.Client(
            base_url=self._base, verify=self._verify, headers=self._headers, timeout=30
        )

    def get(self, path: str, **params: str) -> dict:
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()


def rolled_out(deployment: dict) -> bool:
    """The Deployment controller has caught up: what a tier's Ready waits for
    (reconcile.deployment_readiness, restated here)."""
    meta, spec = deployment["metadata"], deployment.get("spec") or {}
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration", 0)) < int(meta.get("generation", 0)):
        return False
    want, total = int(spec.get("replicas", 1)), int(status.get("replicas", 0))
    if want == 0:
        return total == 0
    return total <= want and all(
        int(status.get(k, 0)) >= want
        for k in ("updatedReplicas", "readyReplicas", "availableReplicas")
    )


def pod_ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


class Tracker(threading.Thread):
    """List, then watch, a collection; note when `target` of its objects
    first satisfy `ok` (perf_counter time in `reached_at`)."""

    def __init__(self, api: Api, path: str, selector: str, ok, target: int, nss: list[str]) -> None:
        super().__init__(daemon=True)
        self.http = api.client()
        self.path, self.selector, self.ok, self.target = path, selector, ok, target
        self.nss = set(nss)
        self.good: set[tuple[str, str]] = set()
        self.reached_at: float | None = None
        self.error: BaseException | None = None
        self.listed = threading.Event()
        self.stopping = False

    def _note(self, obj: dict, deleted: bool = False) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if key[0] not in self.nss:
            return
        if not deleted and self.ok(obj):
            self.good.add(key)
        else:
            self.good.discard(key)
        if self.reached_at is None and len(self.good) >= self.target:
            self.reached_at = time.perf_counter()

    def run(self) -> None:
        try:
            while not self.stopping:
                r = self.http.get(self.path, params={"labelSelector": self.selector})
                r.raise_for_status()
                body = r.json()
                self.good.clear()
                for obj in body["items"]:
                    self._note(obj)
                self.listed.set()
                rv = body["metadata"]["resourceVersion"]
                params = {
                    "labelSelector": self.selector,
                    "watch": "1",
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "120",
                }
                timeout = httpx.Timeout(30, read=150)
                with self.http.stream("GET", self.path, params=params, timeout=timeout) as resp:
                    resp.raise_for_status()
                    for line in resp.iter_lines():
                        if self.stopping:
                            return
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        if ev["type"] == "ERROR":  # e.g. 410 Gone: list again
                            break
                        if ev["type"] == "BOOKMARK":
                            continue
                        self._note(ev["object"], deleted=ev["type"] == "DELETED")
        except BaseException as e:  # reported by the waiter
            self.error = e
            self.listed.set()

    def stop(self) -> None:
        self.stopping = True


def wait_reached(trackers: list[Tracker], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while any(t.reached_at is None for t in trackers):
        for t in trackers:
            if t.error is not None:
                raise RuntimeError(f"watching {t.path} failed: {t.error!r}")
        if time.monotonic() > deadline:
            status = ", ".join(f"{t.path}: {len(t.good)}/{t.target}" for t in trackers)
            raise RuntimeError(f"{what} not reached within {timeout:.0f} s ({status})")
        time.sleep(0.05)


def free_pod_slots(cluster: Cluster) -> int:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    capacity = sum(int(n["status"]["allocatable"].get("pods", 0)) for n in nodes)
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    return capacity - len(pods)


def one_tier(cluster: Cluster, api: Api, ns: str) -> tuple[float, float]:
    doc = tier("single", ns, {"min": 1, "max": 4, "count": 1}, "single")
    path = f"/apis/terrace.dev/v1alpha1/namespaces/{ns}/modeltiers/single"
    t0 = time.perf_counter()
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    pods_ready_at = None
    while True:
        now = time.perf_counter()
        if now - t0 > 120:
            raise RuntimeError("one tier not Ready within 120 s")
        if pods_ready_at is None:
            pods = api.get(
                f"/api/v1/namespaces/{ns}/pods", labelSelector="terrace.dev/modeltier=single"
            )["items"]
            if pods and all(pod_ready(p) for p in pods):
                pods_ready_at = now
        try:
            obj = api.get(path)
        except httpx.HTTPStatusError:
            obj = None
        if is_ready(obj):
            done = time.perf_counter()
            return done - t0, done - (pods_ready_at or done)
        time.sleep(0.02)


def create_tiers(
    cluster: Cluster, api: Api, nss: list[str], n: int, phase: str, with_pods: int
) -> dict[str, float]:
    """Create n tiers round-robin over nss (the first `with_pods` get one pod)
    with one `kubectl create`; seconds from its start until it returned, all
    Deployments existed, all pods were Ready and all tiers were Ready."""
    docs = [
        tier(f"{phase}-{i:04d}", nss[i % len(nss)], ONE_POD if i < with_pods else AT_ZERO, phase)
        for i in range(n)
    ]
    tiers = Tracker(api, TIERS_PATH, f"{PHASE_LABEL}={phase}", is_ready, n, nss)
    deployments = Tracker(
        api, "/apis/apps/v1/deployments", RUNTIME_SELECTOR, lambda o: True, n, nss
    )
    rollouts = Tracker(api, "/apis/apps/v1/deployments", RUNTIME_SELECTOR, rolled_out, n, nss)
    pods = Tracker(api, "/api/v1/pods", RUNTIME_SELECTOR, pod_ready, with_pods, nss)
    trackers = [tiers, deployments, rollouts] + ([pods] if with_pods else [])
    for t in trackers:
        t.start()
    for t in trackers:
        t.listed.wait(30)
    try:
        t0 = time.perf_counter()
        cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(docs), timeout=600)
        created = time.perf_counter() - t0
        wait_reached(trackers, max(600.0, 0.6 * n), f"{n} {phase} tiers Ready")
    finally:
        for t in trackers:
            t.stop()
    assert tiers.reached_at and deployments.reached_at and rollouts.reached_at
    return {
        "rolled_out": rollouts.reached_at - t0,
        "created": created,
        "deployments": deployments.reached_at - t0,
        # No pods: "all pods Ready" is when the last Deployment appeared.
        "pods": (pods.reached_at or deployments.reached_at) - t0,
        "tiers": tiers.reached_at - t0,
        "with_pods": float(with_pods),
    }


def delete_tiers(cluster: Cluster, api: Api, nss: list[str], phase: str) -> None:
    """Delete a phase's tiers; wait until their Deployments are gone too."""
    cluster.kubectl(
        "delete", "mtier", "-A", "-l", f"{PHASE_LABEL}={phase}", "--wait=true", timeout=300
    )
    deadline = time.monotonic() + 180

    def left() -> int:
        items = api.get("/apis/apps/v1/deployments", labelSelector=RUNTIME_SELECTOR)["items"]
        return sum(1 for d in items if d["metadata"]["namespace"] in nss)

    while left():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Deployments of the {phase} tiers were not collected")
        time.sleep(0.5)


# ------------------------------------------------------------------ the tick


@dataclass
class Scrape:
    at: float
    count: float = 0.0
    sum: float = 0.0
    queries: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    per_tier: dict[tuple[str, str], float] = field(default_factory=dict)


LABELS = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(op: OperatorProcess, per_tier: bool = False) -> Scrape:
    """The operator's tick metrics now (per tier ticks only when asked: 1000s of lines)."""
    for attempt in range(5):
        try:
            text = op.metrics()
            break
        except (OSError, urllib.error.URLError):
            if attempt == 4:
                raise
            time.sleep(0.2)
    s = Scrape(at=time.perf_counter())
    for line in text.splitlines():
        if line.startswith(TICK):
            name, _, value = line.rpartition(" ")
            if name == f"{TICK}_count":
                s.count = float(value)
            elif name == f"{TICK}_sum":
                s.sum = float(value)
            elif name.startswith(f"{TICK}_bucket"):
                le = dict(LABELS.findall(name))["le"]
                s.buckets[math.inf if le == "+Inf" else float(le)] = float(value)
        elif line.startswith(f"{QUERIES} "):
            s.queries = float(line.rpartition(" ")[2])
        elif per_tier and line.startswith(TIER_TICKS + "{"):
            name, _, value = line.rpartition(" ")
            labels = dict(LABELS.findall(name))
            s.per_tier[(labels["namespace"], labels["tier"])] = float(value)
    return s


def bucket_quantile(q: float, a: Scrape, b: Scrape) -> float:
    """histogram_quantile(q) over the bucket increase from a to b."""
    les = sorted(b.buckets)
    cum = [b.buckets[le] - a.buckets.get(le, 0.0) for le in les]
    total = cum[-1]
    if total <= 0:
        return math.nan
    rank = q * total
    for i, le in enumerate(les):
        if cum[i] >= rank:
            if math.isinf(le):
                return les[i - 1] if i else math.nan
            lo = les[i - 1] if i else 0.0
            below = cum[i - 1] if i else 0.0
            inside = cum[i] - below
            return lo + (le - lo) * ((rank - below) / inside if inside else 1.0)
    return math.nan


def nearest_rank(q: float, values: list[float]) -> float:
    v = sorted(values)
    return v[max(0, math.ceil(q * len(v)) - 1)] if v else math.nan


def measure_ticks(
    op: OperatorProcess, tiers: set[tuple[str, str]], ticks: int, interval: float
) -> dict:
    """Watch `ticks` control ticks; the window starts right after one completed."""
    assert op.proc is not None
    limit = time.monotonic() + 3 * interval + 60
    s = scrape(op)
    first = s.count
    while s.count == first:  # the tick in progress, if any, ends the warm-up
        if time.monotonic() > limit:
            raise RuntimeError(f"no control tick completed in {3 * interval + 60:.0f} s")
        time.sleep(SCRAPE_EVERY)
        s = scrape(op)
    start = scrape(op, per_tier=True)
    cpu0 = cpu_seconds(op.proc.pid)
    prev, per_tick, merged = start, [], 0
    limit = time.monotonic() + ticks * interval * 3 + 60
    while prev.count - start.count < ticks:
        if time.monotonic() > limit:
            raise RuntimeError(
                f"only {prev.count - start.count:.0f}/{ticks} control ticks completed in time"
            )
        time.sleep(SCRAPE_EVERY)
        s = scrape(op)
        done = round(s.count - prev.count)
        if done == 1:
            per_tick.append(s.sum - prev.sum)
        elif done > 1:  # two ticks between scrapes: only their mean is known
            merged += done
            per_tick += [(s.sum - prev.sum) / done] * done
        prev = s
    end = scrape(op, per_tier=True)
    cpu = cpu_seconds(op.proc.pid) - cpu0
    n = end.count - start.count
    # `end` is a second scrape after the last completion: if a further tick
    # finished in between (it cannot, ticks are `interval` apart) say so.
    counted = [end.per_tier.get(k, 0.0) - start.per_tier.get(k, 0.0) for k in tiers]
    return {
        "ticks": n,
        "seconds": end.at - start.at,
        "p95": nearest_rank(0.95, per_tick),
        "p50": nearest_rank(0.50, per_tick),
        "max": max(per_tick) if per_tick else math.nan,
        "p95_buckets": bucket_quantile(0.95, start, end),
        "merged": merged,
        "queries_per_tick": (end.queries - start.queries) / n if n else math.nan,
        "tiers_every_tick": sum(1 for c in counted if c >= n),
        "tiers_ticked_min": min(counted) if counted else 0.0,
        "cpu_per_tick": cpu / n if n else math.nan,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_problems(text: str) -> tuple[int, int, list[str]]:
    """Counts of ERROR (and traceback) and WARNING lines in the operator's log,
    and one line per kind of problem: how many, and the first of its kind."""
    lines = text.splitlines()
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith("Traceback")]
    warnings = [ln for ln in lines if " WARNING " in ln]
    kinds: dict[str, list[str]] = {}
    for ln in errors + warnings:
        body = re.sub(r"^\S+ \S+ ", "", ln)  # no timestamp
        kind = re.sub(r"[0-9]+", "#", body)[:90]  # namespaces, ports, attempts alike
        kinds.setdefault(kind, []).append(body)
    summary = [f"{len(v)} x {v[0][:300]}" for v in kinds.values()]
    return len(errors), len(warnings), summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiers", type=int, default=200, help="ModelTiers of the big phase")
    ap.add_argument("--namespaces", type=int, default=1, help="spread over this many")
    ap.add_argument("--small", type=int, help="tiers of the small phase (default tiers/10)")
    ap.add_argument("--interval", type=float, default=5.0, help="control interval, seconds")
    ap.add_argument("--ticks", type=int, default=8, help="ticks to time after all are Ready")
    ap.add_argument("--operator-log", type=Path, help="keep a copy of the operator's log here")
    args = ap.parse_args(argv)
    small_n = args.small if args.small is not None else max(1, args.tiers // 10)
    nss = namespaces(args.namespaces)

    reuse = os.environ.get("TERRACE_CLUSTER_DIR")
    own = None
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="terrace-bench-") as tmp:
        if reuse:
            cluster = Cluster.attach(Path(reuse).resolve())
            if cluster is None:
                print(f"TERRACE_CLUSTER_DIR={reuse} holds no healthy cluster", file=sys.stderr)
                return 1
        else:
            own = cluster = Cluster(dir=Path(tmp) / "cluster")
            print("starting a dev cluster ...", file=sys.stderr)
            cluster.up()
        op = None
        log_text = ""
        try:
            install_crds(cluster)
            install_rbac(cluster)
            # Left-overs of an earlier run first, then all namespaces in one apply.
            cluster.kubectl(
                "delete", "namespace", "-l", f"{BENCH_LABEL}=operator", "--wait=true",
                "--timeout=300s", timeout=330,
            )  # fmt: skip
            ns_docs = [
                {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": ns, "labels": {BENCH_LABEL: "operator"}}}
                for ns in nss
            ]  # fmt: skip
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(ns_docs))
            env = {
                "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
                "TERRACE_CONTROL_INTERVAL_SECONDS": str(args.interval),
            }
            op = OperatorProcess(cluster, nss, Path(tmp) / "operator.log", env=env).start()
            api = Api(cluster.kubeconfig, Path(tmp) / "admin")

            print("one tier ...", file=sys.stderr)
            one_s, after_pods_s = one_tier(cluster, api, nss[0])
            delete_tiers(cluster, api, nss, "single")

            print(f"{small_n} tiers (no pods) ...", file=sys.stderr)
            small = create_tiers(cluster, api, nss, small_n, "small", 0)
            small_keys = {(nss[i % len(nss)], f"small-{i:04d}") for i in range(small_n)}
            small_tick = measure_ticks(op, small_keys, args.ticks, args.interval)
            delete_tiers(cluster, api, nss, "small")

            with_pods = max(0, min(args.tiers, free_pod_slots(cluster) - 10))
            print(
                f"{args.tiers} tiers over {len(nss)} namespace(s) ({with_pods} with a pod) ...",
                file=sys.stderr,
            )
            assert op.proc is not None
            cpu_before = cpu_seconds(op.proc.pid)
            big = create_tiers(cluster, api, nss, args.tiers, "large", with_pods)
            cpu = cpu_seconds(op.proc.pid) - cpu_before
            big_keys = {(nss[i % len(nss)], f"large-{i:04d}") for i in range(args.tiers)}
            print(f"timing {args.ticks} control ticks ...", file=sys.stderr)
            big_tick = measure_ticks(op, big_keys, args.ticks, args.interval)
            rss = op.peak_rss_mb()
            alive = op.alive()
        finally:
            if op is not None:
                log_text = op.log_text()
                op.stop()  # no finalizers: the namespaces go without it
            if own is None:
                cluster.kubectl(
                    "delete", "namespace", "-l", f"{BENCH_LABEL}=operator", "--wait=true",
                    "--timeout=300s", check=False, timeout=330,
                )  # fmt: skip
            else:
                own.down()
    wall = time.perf_counter() - wall0

    if args.operator_log is not None:
        args.operator_log.write_text(log_text)
    errors, warnings, kinds = log_problems(log_text)
    if kinds:
        print("operator log, ERROR/WARNING lines by kind:", file=sys.stderr)
        for line in kinds:
            print("  " + line, file=sys.stderr)

    def ok(passed: bool) -> str:
        return "pass" if passed else "FAIL"

    n = args.tiers
    qpt_small, qpt_big = small_tick["queries_per_tick"], big_tick["queries_per_tick"]
    constant = qpt_small == qpt_big
    tick_ok = big_tick["p95"] < 2.0
    rss_ok = rss < 300
    rows = [
        ("one tier: kubectl apply -> Ready", f"{one_s:.2f} s", "-"),
        ("one tier: pods Ready -> tier Ready", f"{after_pods_s:.2f} s",
         f"< 2 s {ok(after_pods_s < 2)}"),
        (f"{small_n} tiers (no pods): kubectl create -> all Ready", f"{small['tiers']:.2f} s",
         "all Ready pass"),
        (f"  control tick p95 ({small_tick['ticks']:.0f} ticks)", f"{small_tick['p95']:.3f} s",
         ""),
        ("  Prometheus queries per tick", f"{qpt_small:.2f}", ""),
        (f"{n} tiers / {len(nss)} ns: kubectl create -> all Ready", f"{big['tiers']:.2f} s",
         "all Ready pass"),
        ("  kubectl create returned", f"{big['created']:.2f} s", ""),
        ("  all Deployments created by the operator", f"{big['deployments']:.2f} s", ""),
        ("  all Deployments rolled out (controller-manager)", f"{big['rolled_out']:.2f} s", ""),
        (f"  all {int(big['with_pods'])} pods Ready (controllers, scheduler, kwok)",
         f"{big['pods']:.2f} s", ""),
        ("  last pod Ready -> last tier Ready", f"{big['tiers'] - big['pods']:.2f} s", ""),
        ("  last Deployment rolled out -> last tier Ready",
         f"{big['tiers'] - big['rolled_out']:.2f} s", ""),
        ("  operator CPU time until all Ready (user + system)", f"{cpu:.1f} s", ""),
        (f"{n} tiers: control tick p95 ({big_tick['ticks']:.0f} ticks, per tick)",
         f"{big_tick['p95']:.3f} s", f"< 2 s {ok(tick_ok)}"),
        ("  control tick p50 / max", f"{big_tick['p50']:.3f} / {big_tick['max']:.3f}", ""),
        ("  control tick p95 from the bucket increase", f"{big_tick['p95_buckets']:.3f} s", ""),
        ("  operator CPU time per tick interval (all of it)",
         f"{big_tick['cpu_per_tick']:.2f} s", ""),
        ("  tiers that ticked in every tick", f"{big_tick['tiers_every_tick']}/{n}",
         ok(big_tick["tiers_every_tick"] == n)),
        (f"Prometheus queries per tick: {small_n} vs {n} tiers",
         f"{qpt_small:g} vs {qpt_big:g}", f"constant {ok(constant)}"),
        ("operator peak RSS (VmHWM)", f"{rss:.0f} MB", f"< 300 MB {ok(rss_ok)}"),
        ("operator log: ERROR / WARNING lines", f"{errors} / {warnings}", ""),
        ("bench wall time", f"{wall:.0f} s", ""),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>14}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>14}  {target}")
    print(
        json.dumps(
            {
                "tiers": n,
                "namespaces": len(nss),
                "ready_s": round(big["tiers"], 3),
                "rss_mb": round(rss, 1),
                "tick_p95_s": round(big_tick["p95"], 4),
                "tick_p95_buckets_s": round(big_tick["p95_buckets"], 4),
                "tick_max_s": round(big_tick["max"], 4),
                "ticks": int(big_tick["ticks"]),
                "queries_per_tick": round(qpt_big, 3),
                "small_tiers": small_n,
                "small_queries_per_tick": round(qpt_small, 3),
                "small_tick_p95_s": round(small_tick["p95"], 4),
                "tiers_every_tick": big_tick["tiers_every_tick"],
                "one_tier_ready_s": round(one_s, 3),
                "one_tier_ready_after_pods_s": round(after_pods_s, 3),
                "with_pods": int(big["with_pods"]),
                "deployments_s": round(big["deployments"], 3),
                "rolled_out_s": round(big["rolled_out"], 3),
                "operator_cpu_s": round(cpu, 1),
                "operator_log_errors": errors,
                "operator_log_warnings": warnings,
                "operator_alive": alive,
                "wall_s": round(wall, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
