"""The dev cluster is the real thing: CEL validation, controllers, scheduling, RBAC, Prometheus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from operator_harness import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.check.terrace.dev}
spec:
  group: check.terrace.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: "spec.min must not exceed spec.max"
            properties:
              min: {type: integer, minimum: 0}
              max: {type: integer}
"""


def unique(prefix: str) -> str:
    """A name no earlier run on a reused cluster (TERRACE_CLUSTER_DIR) has taken."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_cel_rule_rejects_with_its_message(cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=CRD)
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.check.terrace.dev", "--timeout=30s"
    )
    ok = "apiVersion: check.terrace.dev/v1\nkind: Widget\nmetadata: {name: ok, namespace: default}\nspec: {min: 1, max: 2}\n"
    bad = ok.replace("name: ok", "name: bad").replace("min: 1, max: 2", "min: 3, max: 2")
    wait_for(
        lambda: cluster.kubectl("apply", "-f", "-", input=ok, check=False).returncode == 0,
        what="the CRD to serve",
    )
    out = cluster.kubectl("apply", "-f", "-", input=bad, check=False)
    assert out.returncode != 0
    assert "spec.min must not exceed spec.max" in out.stderr
    schema = cluster.kubectl("apply", "-f", "-", input=ok.replace("min: 1", "min: -1"), check=False)
    assert schema.returncode != 0 and "should be greater than or equal to 0" in schema.stderr


def test_deployment_becomes_ready_on_the_cpu_node(cluster) -> None:
    ns = unique("cluster-check")
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl(
            "create", "deployment", "web", "-n", ns, "--image=example.invalid/web:1", "--replicas=2"
        )
        cluster.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s")
        pods = json.loads(
            cluster.kubectl("get", "pods", "-n", ns, "-l", "app=web", "-o", "json").stdout
        )
        assert len(pods["items"]) == 2
        # The untolerated GPU taint keeps ordinary pods off gpu-node.
        assert {p["spec"]["nodeName"] for p in pods["items"]} == {"cpu-node"}
        assert all(p["status"]["phase"] == "Running" for p in pods["items"])
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_gpu_pod_lands_on_the_gpu_node(cluster) -> None:
    name = unique("gpu-check")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "example.invalid/cuda:1",
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ]
        },
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(pod))
    try:
        cluster.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=60s")
        got = json.loads(cluster.kubectl("get", "pod", name, "-o", "json").stdout)
        assert got["spec"]["nodeName"] == "gpu-node"
        # ExtendedResourceToleration added the toleration for the GPU taint.
        assert any(t.get("key") == "nvidia.com/gpu" for t in got["spec"]["tolerations"])
    finally:
        cluster.kubectl("delete", "pod", name, "--wait=false", check=False)


def test_rbac_is_enforced_for_service_accounts(cluster) -> None:
    ns = unique("rbac-check")
    cluster.kubectl("create", "namespace", ns)
    try:
        cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
        kubeconfig = cluster.service_account_kubeconfig(ns, "reader")
        denied = cluster.kubectl("get", "configmaps", "-n", ns, kubeconfig=kubeconfig, check=False)
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
        cluster.kubectl(
            "create", "role", "read-cm", "-n", ns, "--verb=get,list", "--resource=configmaps"
        )
        cluster.kubectl(
            "create", "rolebinding", "read-cm", "-n", ns, "--role=read-cm",
            f"--serviceaccount={ns}:reader",
        )  # fmt: skip
        wait_for(
            lambda: cluster.kubectl(
                "get", "configmaps", "-n", ns, kubeconfig=kubeconfig, check=False
            ).returncode == 0,
            what="the RoleBinding to take effect",
        )  # fmt: skip
        still_denied = cluster.kubectl(
            "get", "secrets", "-n", ns, kubeconfig=kubeconfig, check=False
        )
        assert still_denied.returncode != 0 and "forbidden" in still_denied.stderr.lower()
    finally:
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def prom_query(cluster, expr: str) -> list[dict]:
    url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_etcd_and_registered_targets(cluster, tmp_path: Path) -> None:
    # etcd is a real scrape target from the start.
    result = wait_for(
        lambda: prom_query(cluster, 'etcd_server_has_leader{job="etcd"}'),
        what="etcd's leader metric",
    )
    assert float(result[0]["value"][1]) == 1.0
    # A process registered at run time is scraped within seconds. It binds a
    # port the OS picks and prints it (no port chosen here and reused later).
    exporter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from prometheus_client import Gauge, start_http_server;"
            "Gauge('terrace_check_value', 'check').set(42);"
            "server, _ = start_http_server(0, addr='127.0.0.1');"
            "print(server.server_port, flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert exporter.stdout is not None
        port = int(exporter.stdout.readline())
        cluster.add_scrape_target("check", f"127.0.0.1:{port}", {"tier": "probe"})
        result = wait_for(
            lambda: prom_query(cluster, 'terrace_check_value{job="check",tier="probe"}'),
            timeout=30,
            what="the registered target's sample",
        )
        assert float(result[0]["value"][1]) == 42.0
    finally:
        cluster.remove_scrape_target("check")
        exporter.kill()
        exporter.wait()


def test_cluster_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path, cluster) -> None:
    # A second, private cluster driven through the same CLI that `make cluster-up` runs.
    env = {**os.environ, "TERRACE_CLUSTER_DIR": ""}
    cli = [sys.executable, str(ROOT / "hack" / "devcluster.py")]
    state = tmp_path / "c"
    pids: list[int] = []
    try:
        # Everything after the first `up` is inside the try: whatever fails,
        # `down` still stops what it started.
        first = subprocess.run(
            [*cli, "up", "--dir", str(state)], capture_output=True, text=True, env=env, timeout=120
        )
        assert first.returncode == 0, first.stderr
        pids = [int(p.read_text().split()[0]) for p in (state / "pids").glob("*.pid")]
        assert len(pids) == 6
        second = subprocess.run(
            [*cli, "up", "--dir", str(state)], capture_output=True, text=True, env=env, timeout=120
        )
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stderr
        assert sorted(
            int(p.read_text().split()[0]) for p in (state / "pids").glob("*.pid")
        ) == sorted(pids)
    finally:
        down = subprocess.run(
            [*cli, "down", "--dir", str(state)], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )
    assert not state.exists()
