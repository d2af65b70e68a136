#!/usr/bin/env python3
"""`make demo`: bring up the real dev cluster and put Terrace's API on it.

Steps are printed as they happen. KEEP=1 leaves the cluster running with
instructions; otherwise it is torn down at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

from devcluster import DEFAULT_DIR, Cluster, ClusterError  # noqa: E402


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def main() -> int:
    keep = os.environ.get("KEEP", "") not in ("", "0")
    started = time.monotonic()
    cluster = Cluster(dir=Path(os.environ.get("TERRACE_CLUSTER_DIR", DEFAULT_DIR)).resolve())
    try:
        step("Starting the dev cluster: etcd, kube-apiserver, controller-manager, scheduler, kwok, Prometheus")
        print("    (kwok fakes the nodes `cpu-node` and `gpu-node`: pods there run no containers)")
        if not cluster.up():
            print("    already running; reusing it")
        print(cluster.kubectl("get", "nodes", "-L", "terrace.dev/accelerator").stdout, end="")

        crds = sorted((ROOT / "crds").glob("*.yaml"))
        if crds:
            step("Applying Terrace's CustomResourceDefinitions from crds/")
            for crd in crds:
                print("    " + cluster.kubectl("apply", "-f", str(crd)).stdout.strip())
            cluster.kubectl("wait", "--for=condition=Established", "crd", "-l", "app.kubernetes.io/part-of=terrace",
                            "--timeout=30s", check=False)
            samples = ROOT / "crds" / "samples"
            if samples.is_dir():
                step("Applying the samples from crds/samples/")
                print(cluster.kubectl("apply", "-f", str(samples)).stdout, end="")
                print(cluster.kubectl("get", "terrace", "-A").stdout, end="")
        step(f"Done in {time.monotonic() - started:.0f}s")
        print(cluster.describe())
    except ClusterError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        cluster.down()
        return 1
    if keep:
        print("KEEP=1: the cluster stays up. Stop it with `make cluster-down`.")
    else:
        step("Tearing down (KEEP=1 keeps the cluster)")
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
