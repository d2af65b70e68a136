"""The Helm chart: lint, render, validate against Kubernetes' schemas, refuse bad values.

Runs the real helm (built by hack/build-tools.sh); no cluster needed.
tests/integration/test_chart_install.py installs it into the real cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "terrace"
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
sys.path.insert(0, str(ROOT / "hack"))
from devcluster import tools_dir  # noqa: E402

ALL_FEATURES = [
    "--set",
    "agent.enabled=true",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "grafanaDashboard.enabled=true",
    "--set",
    "operator.watchNamespaces={demo,prod}",
    "--set",
    "global.imageRegistry=registry.example.com",
]
# Kinds from the Prometheus Operator: not in Kubernetes' own schemas.
FOREIGN_KINDS = {"ServiceMonitor", "PodMonitor"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(tools_dir() / "helm"), *args], capture_output=True, text=True, timeout=120
    )
    if check and out.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{out.stderr}")
    return out


def render(*values: str) -> list[dict]:
    out = helm(
        "template", "t", str(CHART), "--namespace", "terrace-system", "--include-crds", *values
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", ["terrace.dev_modeltiers.yaml", "terrace.dev_tierrouters.yaml"])
def test_chart_crds_are_identical_to_crds_folder(name: str) -> None:
    assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
        f"charts/terrace/crds/{name} differs from crds/{name}: run `make chart-sync`"
    )
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == sorted(
        p.name for p in (ROOT / "crds").glob("*.yaml")
    )


@pytest.mark.parametrize(
    ("copy", "source"),
    [
        ("files/operator-clusterrole.yaml", "operator/terrace_operator/rbac/clusterrole.yaml"),
        ("files/operator-role.yaml", "operator/terrace_operator/rbac/role.yaml"),
        ("files/agent-rbac.yaml", "operator/terrace_operator/agent/rbac.yaml"),
    ],
)
def test_chart_rbac_is_the_components_own(copy: str, source: str) -> None:
    assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), (
        f"charts/terrace/{copy} differs from {source}: run `make chart-sync`"
    )


@pytest.mark.parametrize("values", [[], ALL_FEATURES], ids=["default", "all-features"])
def test_lint_strict(values: list[str]) -> None:
    out = helm("lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("values", [[], ALL_FEATURES], ids=["default", "all-features"])
def test_rendered_objects_are_valid_kubernetes(values: list[str]) -> None:
    docs = render(*values)
    kinds = {d["kind"] for d in docs}
    assert {
        "CustomResourceDefinition",
        "Deployment",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    } <= kinds
    for doc in docs:
        if doc["kind"] in FOREIGN_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, "1.36.0", strict=True)


def test_all_features_render_agent_monitoring_and_dashboard() -> None:
    docs = render(*ALL_FEATURES)
    assert {"DaemonSet", "ServiceMonitor", "PodMonitor"} <= {d["kind"] for d in docs}
    dashboard = next(
        d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")
    )
    panels = json.loads(dashboard["data"]["terrace.json"])["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "terrace_router_requests_total",
        "terrace_router_tier_share",
        "terrace_gpu_power_limit_watts",
        "terrace_tier_energy_per_request_joules",
        "terrace_router_request_duration_seconds_bucket",
    ):
        assert metric in exprs
    operator = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert operator["image"].startswith("registry.example.com/")
    env = {e["name"]: e.get("value") for e in operator["env"]}
    assert env["TERRACE_NAMESPACES"] == "demo,prod"
    # Routers reach the wake endpoint through the operator's Service.
    service = next(
        d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-operator-metrics")
    )
    wake = next(p for p in service["spec"]["ports"] if p["name"] == "wake")
    assert env["TERRACE_WAKE_PORT"] == str(wake["port"])
    ns = service["metadata"]["namespace"]
    assert env["TERRACE_WAKE_URL"] == (
        f"http://{service['metadata']['name']}.{ns}.svc:{wake['port']}"
    )


def test_defaults_are_secure_and_agent_is_off() -> None:
    docs = render()
    assert not by_kind(docs, "DaemonSet")
    deploy = by_kind(docs, "Deployment")[0]
    # One replica, with a Lease all the same: a rolling update hands it over.
    assert deploy["spec"]["replicas"] == 1 and "strategy" not in deploy["spec"]
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["TERRACE_LEADER_ELECTION"] == "true"
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_agent_is_privileged_only_for_real_nvml() -> None:
    real = by_kind(render("--set", "agent.enabled=true"), "DaemonSet")[0]["spec"]["template"][
        "spec"
    ]
    assert real["containers"][0]["securityContext"] == {"privileged": True}
    assert real["nodeSelector"] == {"terrace.dev/accelerator": "nvidia"}
    fake = by_kind(render("--set", "agent.enabled=true", "--set", "agent.fakeGpus=1"), "DaemonSet")[
        0
    ]["spec"]["template"]["spec"]["containers"][0]
    assert (
        "privileged" not in fake["securityContext"]
        and fake["securityContext"]["runAsNonRoot"] is True
    )
    assert "--fake-gpus=1" in fake["args"]
    assert {"name": "tmp", "mountPath": "/tmp"} in fake["volumeMounts"]
    assert not any(a.startswith("--advertise-resource") for a in fake["args"])


def test_the_kind_values_advertise_the_fake_gpu_and_use_images_built_here() -> None:
    docs = render("-f", str(CHART / "ci" / "kind-values.yaml"))
    agent = by_kind(docs, "DaemonSet")[0]["spec"]["template"]["spec"]["containers"][0]
    assert "--advertise-resource=nvidia.com/gpu" in agent["args"]
    assert agent["image"] == "terrace.local/terrace-agent:" + APP_VERSION
    [operator] = by_kind(docs, "Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "terrace.local/terrace-operator:" + APP_VERSION
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TERRACE_RUNTIME_IMAGE"] == "terrace.local/terrace-runtime:" + APP_VERSION
    # Advertising needs the Node's status; the agent's rules grant only that.
    rules = [r for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"].endswith("agent")
             for r in d["rules"]]  # fmt: skip
    assert {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]} in rules


def test_rendered_rbac_is_the_operators_rules() -> None:
    role = next(
        d for d in by_kind(render(), "ClusterRole") if d["metadata"]["name"].endswith("-operator")
    )
    source = yaml.safe_load((ROOT / "operator/terrace_operator/rbac/clusterrole.yaml").read_text())
    assert role["rules"] == source["rules"]
    lease = next(d for d in by_kind(render(), "Role") if "leader-election" in d["metadata"]["name"])
    source = yaml.safe_load((ROOT / "operator/terrace_operator/rbac/role.yaml").read_text())
    assert lease["rules"] == source["rules"] and lease["metadata"]["namespace"]
    binding = next(
        d for d in by_kind(render(), "RoleBinding") if "leader-election" in d["metadata"]["name"]
    )
    assert binding["roleRef"]["name"] == lease["metadata"]["name"]


def test_two_operator_replicas_elect_a_leader() -> None:
    def operator(docs: list[dict]) -> dict:
        return next(
            d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator")
        )

    two = operator(render("--set", "operator.replicas=2"))
    assert two["spec"]["replicas"] == 2 and "strategy" not in two["spec"]
    env = {e["name"]: e for e in two["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TERRACE_LEADER_ELECTION"]["value"] == "true"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    out = helm(
        "template", "t", str(CHART), "--set", "operator.replicas=2",
        "--set", "operator.leaderElection=false", check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "needs operator.leaderElection" in out.stderr


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["--set-string", "operator.tickSeconds=15"], "tickSeconds"),
        (["--set", "operator.tickSeconds=0"], "tickSeconds"),
        (["--set", "operator.replicas=0"], "replicas"),
        (["--set", "operator.bogus=1"], "bogus"),
        (["--set", "agent.fakeModel=h200x"], "fakeModel"),
        (["--set", "agent.advertiseResource=nvidia.com/gpu x"], "advertiseResource"),
        (["--set", "operator.prometheusUrl=prometheus:9090"], "prometheusUrl"),
    ],
)
def test_bad_values_are_refused_by_the_schema(values: list[str], complaint: str) -> None:
    out = helm("template", "t", str(CHART), *values, check=False)
    assert out.returncode != 0
    assert (
        "values don't meet the specifications of the schema" in out.stderr or "schema" in out.stderr
    )
    assert complaint in out.stderr, out.stderr
