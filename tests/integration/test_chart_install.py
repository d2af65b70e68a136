"""helm install / upgrade / uninstall of the chart into the real cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

CHART = Path(__file__).resolve().parents[2] / "charts" / "terrace"

# Not "terrace": the operator tests apply the ClusterRoles `terrace-operator`
# and `terrace-agent` to the same cluster, and Helm refuses to adopt objects it
# did not create. Its own release name makes this test pass in any order.
RELEASE, NS = "terrace-chart", "terrace-chart"
OPERATOR = f"{RELEASE}-operator"


def helm(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(cluster.bin_dir / "helm"), f"--kubeconfig={cluster.kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def release_objects(cluster) -> list[str]:
    kinds = "deployments,daemonsets,services,serviceaccounts,configmaps,clusterroles,clusterrolebindings"
    out = cluster.kubectl(
        "get", kinds, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name"
    )
    return out.stdout.split()


def test_install_upgrade_uninstall_leave_nothing_behind(cluster) -> None:
    # A run that died before its uninstall left the release on a reused
    # cluster (TERRACE_CLUSTER_DIR): start from none.
    helm(cluster, "uninstall", RELEASE, "-n", NS, "--ignore-not-found", "--wait")
    helm(
        cluster,
        "install",
        RELEASE,
        str(CHART),
        "-n",
        NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "120s",
        "--set",
        "agent.enabled=true",
        "--set",
        "agent.fakeGpus=1",
        "--set",
        "grafanaDashboard.enabled=true",
    )
    try:
        names = release_objects(cluster)
        assert f"deployment.apps/{OPERATOR}" in names
        assert f"daemonset.apps/{RELEASE}-agent" in names
        crds = cluster.kubectl(
            "get", "crd", "modeltiers.terrace.dev", "tierrouters.terrace.dev", "-o", "name"
        )
        assert len(crds.stdout.split()) == 2

        # The chart's RBAC is what the operator needs, and no more.
        sa = f"system:serviceaccount:{NS}:{OPERATOR}"

        def can(verb: str, resource: str) -> bool:
            out = cluster.kubectl("auth", "can-i", verb, resource, "--as", sa, "-A", check=False)
            return out.stdout.strip() == "yes"

        assert can("list", "modeltiers.terrace.dev") and can("patch", "deployments.apps")
        assert can("create", "persistentvolumeclaims")  # terrace-batch's SQLite store
        assert not can("get", "secrets") and not can("delete", "deployments.apps")
        # Replicas are set on the Deployment itself: no scale subresource.
        scale = cluster.kubectl("auth", "can-i", "patch", "deployments.apps",
                                "--subresource=scale", "--as", sa, "-A", check=False)  # fmt: skip
        assert scale.stdout.strip() == "no"
        # The leader Lease: in the release namespace only.
        lease = cluster.kubectl("auth", "can-i", "update", "leases.coordination.k8s.io",
                                "--as", sa, "-n", NS, check=False)  # fmt: skip
        assert lease.stdout.strip() == "yes"
        elsewhere = cluster.kubectl("auth", "can-i", "update", "leases.coordination.k8s.io",
                                    "--as", sa, "-n", "default", check=False)  # fmt: skip
        assert elsewhere.stdout.strip() == "no"

        # The agent DaemonSet lands on the GPU node only.
        pods = json.loads(
            cluster.kubectl(
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/component=power-agent",
                "-o",
                "json",
            ).stdout
        )["items"]
        assert [p["spec"]["nodeName"] for p in pods] == ["gpu-node"]

        helm(
            cluster,
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            NS,
            "--wait",
            "--timeout",
            "120s",
            "--reuse-values",
            "--set",
            "operator.tickSeconds=5",
            "--set",
            "operator.replicas=2",  # a standby: both watch, the Lease holder acts
        )
        deploy = json.loads(
            cluster.kubectl("get", "deployment", OPERATOR, "-n", NS, "-o", "json").stdout
        )
        env = {
            e["name"]: e.get("value")
            for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["TERRACE_CONTROL_INTERVAL_SECONDS"] == "5"
        assert env["TERRACE_LEADER_ELECTION"] == "true"
        assert deploy["spec"]["replicas"] == 2 and deploy["status"].get("readyReplicas") == 2
        assert (
            json.loads(helm(cluster, "history", RELEASE, "-n", NS, "-o", "json").stdout)[-1][
                "revision"
            ]
            == 2
        )

        refused = helm(
            cluster,
            "upgrade",
            RELEASE,
            str(CHART),
            "-n",
            NS,
            "--reuse-values",
            "--set-string",
            "operator.metricsPort=eighty",
            check=False,
        )
        assert refused.returncode != 0 and "metricsPort" in refused.stderr
    finally:
        helm(cluster, "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "120s")
    assert release_objects(cluster) == []
    assert helm(cluster, "list", "-n", NS, "-q").stdout.strip() == ""
    # Helm never deletes CRDs it installed from crds/ (that would delete every
    # user's ModelTier); removing them is a deliberate `kubectl delete -f crds/`.
    assert cluster.kubectl("get", "crd", "modeltiers.terrace.dev", check=False).returncode == 0


@pytest.mark.parametrize(
    "bad", [["--set", "operator.replicas=0"], ["--set-string", "agent.fakeGpus=1"]]
)
def test_install_refuses_bad_values(cluster, bad: list[str]) -> None:
    out = helm(
        cluster,
        "install",
        "bad",
        str(CHART),
        "-n",
        "terrace-bad",
        "--create-namespace",
        "--dry-run=server",
        *bad,
        check=False,
    )
    assert out.returncode != 0
    assert "schema" in out.stderr
