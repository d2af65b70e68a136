"""How fast terrace-operator converges, and how much memory it needs.

    python bench/operator.py                 # starts a dev cluster, stops it after
    TERRACE_CLUSTER_DIR=.cache/cluster python bench/operator.py   # reuse a running one

Runs the real operator (as its ServiceAccount, like the tests) against the
real dev cluster (kube-apiserver, controllers, scheduler, kwok) and measures:

* one tier: seconds from `kubectl apply` of one ModelTier to its Ready
  condition, and how long after its pods turned Ready that was
  (target: under 2 s after the pods);
* 200 tiers: wall time from `kubectl create` of 200 ModelTiers until all are
  Ready (target: under 60 s), and the operator's peak RSS (VmHWM; target:
  under 250 MB).

Prints a table; the last line is JSON with one_tier_ready_s,
tiers_200_ready_s and operator_peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from devcluster import Cluster  # noqa: E402
from operator_harness import (  # noqa: E402
    OperatorProcess,
    fresh_namespace,
    install_crds,
    install_rbac,
    is_ready,
)
from terrace_operator.kube import Credentials, _ssl_context  # noqa: E402

NS = "bench-operator"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def tier(name: str, min_replicas: int) -> dict:
    # Tolerating the GPU node's taint lets the scheduler spread 200 pods over
    # both kwok nodes (110 pods each).
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"uri": f"file:///models/{name}.onnx"},
            # count pins the scale (the control loop stands aside; without
            # Prometheus it would hold a min-0 tier at one replica).
            "replicas": {"min": min_replicas, "max": 4, "count": min_replicas},
            "tolerations": [GPU_TOLERATION],
        },
    }


class Api:
    """Admin reads straight from the apiserver: cheap enough to poll every 20 ms."""

    def __init__(self, kubeconfig: Path) -> None:
        import kopf

        os.environ["KUBECONFIG"] = str(kubeconfig)
        info = kopf.login_with_kubeconfig(settings=kopf.OperatorSettings(), logger=None)
        creds = Credentials.from_kopf(info)
        headers = {"Authorization": f"Bearer {creds.token}"} if creds.token else {}
        self.http = httpx.Client(
            base_url=creds.server, verify=_ssl_context(creds), headers=headers, timeout=30
        )

    def get(self, path: str, **params: str) -> dict:
        r = self.http.get(path, params=params)
        r.raise_for_status()
        return r.json()

    def count(self, path: str, **params: str) -> int:
        """How many objects a list holds, fetching metadata only (cheap to poll)."""
        accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
        r = self.http.get(path, params=params, headers={"Accept": accept})
        r.raise_for_status()
        return len(r.json()["items"])


def free_pod_slots(cluster: Cluster) -> int:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    capacity = sum(int(n["status"]["allocatable"].get("pods", 0)) for n in nodes)
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json").stdout)["items"]
    return capacity - len(pods)


def one_tier(cluster: Cluster, api: Api) -> tuple[float, float]:
    doc = yaml.safe_dump(tier("single", 1))
    tiers = f"/apis/terrace.dev/v1alpha1/namespaces/{NS}/modeltiers/single"
    t0 = time.perf_counter()
    cluster.kubectl("apply", "-f", "-", input=doc)
    pods_ready_at = None
    while True:
        now = time.perf_counter()
        if now - t0 > 120:
            raise RuntimeError("one tier not Ready within 120 s")
        if pods_ready_at is None:
            pods = api.get(
                f"/api/v1/namespaces/{NS}/pods", labelSelector="terrace.dev/modeltier=single"
            )["items"]
            if pods and all(
                any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (p.get("status") or {}).get("conditions") or []
                )
                for p in pods
            ):
                pods_ready_at = now
        try:
            obj = api.get(tiers)
        except httpx.HTTPStatusError:
            obj = None
        if is_ready(obj):
            done = time.perf_counter()
            return done - t0, done - (pods_ready_at or done)
        time.sleep(0.02)


def pod_ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def many_tiers(cluster: Cluster, api: Api, n: int) -> dict[str, float]:
    """Times (from the start of `kubectl create`) until all Deployments exist,
    all pods are Ready, and all tiers are Ready."""
    with_pods = max(0, min(n, free_pod_slots(cluster) - 10))
    docs = [tier(f"bulk-{i:03d}", 1 if i < with_pods else 0) for i in range(n)]
    t0 = time.perf_counter()
    cluster.kubectl("create", "-f", "-", input=yaml.safe_dump_all(docs), timeout=300)
    out = {"created": time.perf_counter() - t0, "with_pods": float(with_pods)}
    selector = "app.kubernetes.io/name=terrace-runtime"
    while True:
        now = time.perf_counter() - t0
        if "deployments" not in out:
            if api.count(f"/apis/apps/v1/namespaces/{NS}/deployments", labelSelector=selector) >= n:
                out["deployments"] = now
        elif "pods" not in out:
            pods = api.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=selector)["items"]
            if sum(1 for p in pods if pod_ready(p)) >= with_pods:
                out["pods"] = now
        items = api.get(f"/apis/terrace.dev/v1alpha1/namespaces/{NS}/modeltiers")["items"]
        ready = sum(1 for o in items if o["metadata"]["name"].startswith("bulk-") and is_ready(o))
        if ready >= n:
            out["tiers"] = now
            out.setdefault("pods", now)
            return out
        if now > 600:
            raise RuntimeError(f"only {ready}/{n} tiers Ready after 600 s")
        time.sleep(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiers", type=int, default=200)
    args = ap.parse_args(argv)

    reuse = os.environ.get("TERRACE_CLUSTER_DIR")
    own = None
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
        try:
            install_crds(cluster)
            install_rbac(cluster)
            fresh_namespace(cluster, NS)
            op = OperatorProcess(cluster, [NS], Path(tmp) / "operator.log").start()
            api = Api(cluster.kubeconfig)

            one_s, after_pods_s = one_tier(cluster, api)
            cluster.kubectl("delete", "mtier", "single", "-n", NS, "--wait=true")
            assert op.proc is not None
            cpu_before = cpu_seconds(op.proc.pid)
            many = many_tiers(cluster, api, args.tiers)
            cpu = cpu_seconds(op.proc.pid) - cpu_before
            many_s = many["tiers"]
            rss = op.peak_rss_mb()
        finally:
            if op is not None:
                # While the operator still runs: the control loop's kopf timers
                # keep a finalizer on every ModelTier.
                cluster.kubectl(
                    "delete",
                    "mtier",
                    "--all",
                    "-n",
                    NS,
                    "--wait=true",
                    "--timeout=300s",
                    check=False,
                    timeout=330,
                )
                op.stop()
            cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
            if own is not None:
                own.down()

    rows = [
        ("one tier: kubectl apply -> Ready", f"{one_s:.2f} s", "-"),
        ("one tier: pods Ready -> tier Ready", f"{after_pods_s:.2f} s", "< 2 s"),
        (f"{args.tiers} tiers: kubectl create -> all Ready", f"{many_s:.2f} s", "< 60 s"),
        ("  kubectl create returned", f"{many['created']:.2f} s", ""),
        ("  all Deployments created by the operator", f"{many['deployments']:.2f} s", ""),
        (
            f"  all {int(many['with_pods'])} pods Ready (controllers, scheduler, kwok)",
            f"{many['pods']:.2f} s",
            "",
        ),
        ("  last pod Ready -> last tier Ready", f"{many_s - many['pods']:.2f} s", ""),
        ("  operator CPU time for them (user + system)", f"{cpu:.1f} s", ""),
        ("operator peak RSS (VmHWM)", f"{rss:.0f} MB", "< 250 MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>10}  {target}")
    print(
        json.dumps(
            {
                "one_tier_ready_s": round(one_s, 3),
                "one_tier_ready_after_pods_s": round(after_pods_s, 3),
                f"tiers_{args.tiers}_ready_s": round(many_s, 3),
                "operator_cpu_s": round(cpu, 1),
                "operator_peak_rss_mb": round(rss, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
