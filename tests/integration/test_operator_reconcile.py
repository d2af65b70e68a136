"""terrace-operator on the real cluster, running as its own ServiceAccount.

Real kube-apiserver (CEL, RBAC, server-side apply), real
kube-controller-manager (Deployments, ReplicaSets, garbage collector), real
scheduler (GPU node selector and taints), kwok making pods Ready.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml
from operator_harness import (
    SAMPLES,
    OperatorProcess,
    fresh_namespace,
    get_or_none,
    install_crds,
    install_rbac,
    is_ready,
    kubectl_json,
    ready_condition,
    wait_for,
)
from terrace_router.config import RouterConfig

pytestmark = pytest.mark.cluster

NS = "op-reconcile"
TIMEOUT = 90


def tier_yaml(
    name: str,
    *,
    min_replicas: int = 1,
    max_replicas: int = 4,
    device: str = "cpu",
    count: int | None = None,
) -> str:
    replicas: dict = {"min": min_replicas, "max": max_replicas}
    if count is not None:
        # The scale subresource's count: the control loop stands aside. (Without
        # Prometheus it would otherwise hold a min-0 tier at one replica.)
        replicas["count"] = count
    spec: dict = {
        "model": {"uri": f"file:///models/{name}.onnx"},
        "device": device,
        "replicas": replicas,
    }
    return yaml.safe_dump(
        {
            "apiVersion": "terrace.dev/v1alpha1",
            "kind": "ModelTier",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        }
    )


@pytest.fixture(scope="module")
def op(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_crds(cluster)
    install_rbac(cluster)
    fresh_namespace(cluster, NS)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    process = OperatorProcess(cluster, [NS], log).start()
    try:
        yield process
    finally:
        # Delete the custom resources while the operator still runs: the control
        # loop's kopf timers keep a finalizer on every ModelTier.
        cluster.kubectl(
            "delete",
            "trouter,mtier",
            "--all",
            "-n",
            NS,
            "--wait=true",
            "--timeout=120s",
            check=False,
            timeout=150,
        )
        process.stop()
        # Never leave a failing run without the operator's side of the story.
        print(process.log_tail(200))
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


def get(cluster, kind: str, name: str) -> dict | None:
    return get_or_none(cluster, kind, name, NS)


def apply(cluster, text: str) -> None:
    cluster.kubectl("apply", "-n", NS, "-f", "-", input=text)


def wait_ready(cluster, kind: str, name: str, timeout: float = TIMEOUT) -> dict:
    return wait_for(
        lambda: (o := get(cluster, kind, name)) and is_ready(o) and o,
        timeout,
        what=f"{kind} {name} Ready",
    )


def deployment_replicas(cluster, name: str) -> int | None:
    d = get(cluster, "deployment", name)
    return None if d is None else d["spec"]["replicas"]


def test_samples_become_ready_workloads(cluster, op: OperatorProcess) -> None:
    for sample in sorted(SAMPLES.glob("*.yaml")):
        cluster.kubectl("apply", "-n", NS, "-f", str(sample))

    small = wait_ready(cluster, "mtier", "small-cpu")
    large = wait_ready(cluster, "mtier", "large-gpu")
    llama = wait_ready(cluster, "mtier", "llama-cpu")
    router = wait_ready(cluster, "trouter", "router")

    for name in ("small-cpu", "llama-cpu", "large-gpu"):
        for kind in ("deployment", "service", "pdb"):
            child = get(cluster, kind, name)
            assert child is not None, f"{kind} {name} missing"
            (ref,) = child["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["controller"]) == ("ModelTier", name, True)
    assert small["status"]["replicas"] == small["status"]["readyReplicas"] == 1
    assert small["status"]["endpoint"] == f"http://small-cpu.{NS}.svc:8080"
    assert (
        small["status"]["selector"]
        == "app.kubernetes.io/name=terrace-runtime,terrace.dev/modeltier=small-cpu"
    )

    # The real scheduler put the GPU tier's pod on the tainted GPU node.
    pods = kubectl_json(cluster, "get", "pods", "-n", NS, "-l", "terrace.dev/modeltier=large-gpu")[
        "items"
    ]
    assert [p["spec"]["nodeName"] for p in pods] == ["gpu-node"]
    container = pods[0]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--device" in container["args"] and "cuda" in container["args"]
    small_pods = kubectl_json(
        cluster, "get", "pods", "-n", NS, "-l", "terrace.dev/modeltier=small-cpu"
    )["items"]
    assert [p["spec"]["nodeName"] for p in small_pods] == ["cpu-node"]
    assert large["status"]["readyReplicas"] == 1
    # The external tier runs its own image with its args, probed on its health path.
    (llama_pod,) = kubectl_json(
        cluster, "get", "pods", "-n", NS, "-l", "terrace.dev/modeltier=llama-cpu"
    )["items"]
    server = llama_pod["spec"]["containers"][0]
    assert server["image"] == "ghcr.io/ggml-org/llama.cpp:server" and "command" not in server
    assert server["args"][:2] == ["-m", "/models/gemma3-270m/gemma3-270m-q4_k_m.gguf"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert llama["status"]["readyReplicas"] == 1

    # The router's table is what terrace-router reads, with the tiers in order.
    cm = get(cluster, "configmap", "router-routing")
    config = RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"]))
    assert [(t.name, t.endpoints) for t in config.tiers] == [
        ("small-cpu", [f"http://small-cpu.{NS}.svc:8080"]),
        ("llama-cpu", [f"http://llama-cpu.{NS}.svc:8080"]),
        ("large-gpu", [f"http://large-gpu.{NS}.svc:8080"]),
    ]
    assert config.calibration.target_large_share == 0.3
    assert config.auth.api_keys_file == "/etc/terrace-auth/api-keys"
    assert router["status"]["endpoint"] == f"http://router.{NS}.svc:8080"
    assert [t["ready"] for t in router["status"]["tiers"]] == [True, True, True]

    # What a user sees.
    table = cluster.kubectl("get", "mtier", "-n", NS).stdout
    header, *rows = table.strip().splitlines()
    assert header.split()[:5] == ["NAME", "READY", "REPLICAS", "READY-REPLICAS", "DEVICE"]
    by_name = {r.split()[0]: r.split() for r in rows}
    assert by_name["small-cpu"][1:5] == ["True", "1", "1", "cpu"]
    assert by_name["large-gpu"][1:5] == ["True", "1", "1", "gpu"]
    listed = cluster.kubectl("get", "terrace", "-n", NS).stdout
    assert "modeltier.terrace.dev/small-cpu" in listed and "tierrouter.terrace.dev/router" in listed

    events = kubectl_json(
        cluster,
        "get",
        "events",
        "-n",
        NS,
        "--field-selector",
        "involvedObject.name=small-cpu,involvedObject.kind=ModelTier",
    )
    created = " ".join(e["message"] for e in events["items"] if e["reason"] == "Created")
    for child in ("Deployment small-cpu", "Service small-cpu", "PodDisruptionBudget small-cpu"):
        assert child in created, created


def test_min_and_max_edits_move_the_deployment_without_fighting_the_autoscaler(cluster, op) -> None:
    apply(cluster, tier_yaml("bounds", min_replicas=1, max_replicas=6))
    wait_ready(cluster, "mtier", "bounds")
    assert deployment_replicas(cluster, "bounds") == 1

    cluster.kubectl(
        "patch",
        "mtier",
        "bounds",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"spec":{"replicas":{"min":3}}}',
    )
    wait_for(
        lambda: deployment_replicas(cluster, "bounds") == 3, TIMEOUT, what="deployment at min 3"
    )
    tier = wait_ready(cluster, "mtier", "bounds")
    assert tier["status"]["readyReplicas"] == 3

    # An autoscaler scales through the Deployment's scale subresource...
    cluster.kubectl("scale", "deployment", "bounds", "-n", NS, "--replicas=5")
    wait_for(
        lambda: (t := get(cluster, "mtier", "bounds"))["status"].get("readyReplicas") == 5 and t,
        TIMEOUT,
        what="status follows the autoscaler",
    )
    # ...and a reconcile (forced by a spec edit) keeps its choice inside [min, max].
    cluster.kubectl(
        "patch",
        "mtier",
        "bounds",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"spec":{"replicas":{"min":1}}}',
    )
    wait_ready(cluster, "mtier", "bounds")
    assert deployment_replicas(cluster, "bounds") == 5

    cluster.kubectl(
        "patch",
        "mtier",
        "bounds",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"spec":{"replicas":{"max":2}}}',
    )
    wait_for(lambda: deployment_replicas(cluster, "bounds") == 2, TIMEOUT, what="clamped to max 2")

    def scaled_event() -> bool:
        events = kubectl_json(
            cluster, "get", "events", "-n", NS, "--field-selector", "involvedObject.name=bounds"
        )
        return any(e["reason"] == "Scaled" and "from 5 to 2" in e["message"]
                   for e in events["items"])  # fmt: skip

    # The Event follows the Deployment's update (after the Service and PDB).
    wait_for(scaled_event, TIMEOUT, what="the Scaled Event for 5 -> 2")


def test_scale_subresource_drives_the_tier(cluster, op) -> None:
    apply(cluster, tier_yaml("scaled", min_replicas=1, max_replicas=3))
    wait_ready(cluster, "mtier", "scaled")
    cluster.kubectl("scale", "mtier", "scaled", "-n", NS, "--replicas=2")
    wait_for(lambda: deployment_replicas(cluster, "scaled") == 2, TIMEOUT, what="count 2")
    cluster.kubectl("scale", "mtier", "scaled", "-n", NS, "--replicas=7")  # clamped to max
    wait_for(
        lambda: deployment_replicas(cluster, "scaled") == 3, TIMEOUT, what="count clamped to 3"
    )
    wait_for(lambda: get(cluster, "mtier", "scaled")["status"].get("readyReplicas") == 3, TIMEOUT)
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/terrace.dev/v1alpha1/namespaces/{NS}/modeltiers/scaled/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 7  # what was asked; the Deployment runs the clamped value
    assert scale["status"] == {
        "replicas": 3,
        "selector": "app.kubernetes.io/name=terrace-runtime,terrace.dev/modeltier=scaled",
    }


def test_deleted_and_edited_children_are_restored(cluster, op) -> None:
    apply(cluster, tier_yaml("drift"))
    wait_ready(cluster, "mtier", "drift")

    for kind in ("service", "pdb", "deployment"):
        old_uid = get(cluster, kind, "drift")["metadata"]["uid"]
        cluster.kubectl("delete", kind, "drift", "-n", NS, "--wait=true")
        restored = wait_for(
            lambda k=kind, u=old_uid: (
                (o := get(cluster, k, "drift")) and o["metadata"]["uid"] != u and o
            ),
            TIMEOUT,
            what=f"{kind} restored",
        )
        assert restored["metadata"]["ownerReferences"][0]["name"] == "drift"
    wait_ready(cluster, "mtier", "drift")

    # A hand edit of a field the operator sets is taken back.
    cluster.kubectl(
        "patch",
        "deployment",
        "drift",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/template/spec/containers/0/image","value":"evil:1"}]',
    )
    wait_for(
        lambda: (
            get(cluster, "deployment", "drift")["spec"]["template"]["spec"]["containers"][0][
                "image"
            ]
            == "terrace:test"
        ),
        TIMEOUT,
        what="image restored",
    )
    cluster.kubectl(
        "patch",
        "service",
        "drift",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"spec":{"selector":{"terrace.dev/modeltier":"someone-else"}}}',
    )
    wait_for(
        lambda: (
            get(cluster, "service", "drift")["spec"]["selector"]["terrace.dev/modeltier"] == "drift"
        ),
        TIMEOUT,
        what="selector restored",
    )


def test_deleting_the_tier_removes_its_children(cluster, op) -> None:
    apply(cluster, tier_yaml("doomed"))
    wait_ready(cluster, "mtier", "doomed")
    cluster.kubectl("delete", "mtier", "doomed", "-n", NS, "--wait=true")
    # The garbage collector in kube-controller-manager follows the owner references.
    for kind in ("deployment", "service", "pdb"):
        wait_for(
            lambda k=kind: get(cluster, k, "doomed") is None, TIMEOUT, what=f"{kind} collected"
        )
    wait_for(
        lambda: (
            not kubectl_json(
                cluster, "get", "pods", "-n", NS, "-l", "terrace.dev/modeltier=doomed"
            )["items"]
        ),
        TIMEOUT,
        what="pods gone",
    )


def test_router_naming_a_missing_tier_recovers_when_it_appears(cluster, op) -> None:
    apply(cluster, tier_yaml("present"))
    apply(
        cluster,
        yaml.safe_dump(
            {
                "apiVersion": "terrace.dev/v1alpha1",
                "kind": "TierRouter",
                "metadata": {"name": "waiting", "namespace": NS},
                "spec": {"tiers": [{"name": "present"}, {"name": "ghost"}]},
            }
        ),
    )
    cond = wait_for(
        lambda: (
            (c := ready_condition(get(cluster, "trouter", "waiting"))).get("reason")
            == "TierNotFound"
            and c
        ),
        TIMEOUT,
        what="TierNotFound",
    )
    assert cond["status"] == "False"
    assert '"ghost"' in cond["message"] and NS in cond["message"]
    # The router still serves the tier that exists.
    cm = wait_for(lambda: get(cluster, "configmap", "waiting-routing"), TIMEOUT)
    assert [t["name"] for t in yaml.safe_load(cm["data"]["router.yaml"])["tiers"]] == ["present"]
    events = kubectl_json(
        cluster, "get", "events", "-n", NS, "--field-selector", "involvedObject.name=waiting"
    )
    assert any(e["reason"] == "TierNotFound" and e["type"] == "Warning" for e in events["items"])

    apply(cluster, tier_yaml("ghost"))
    router = wait_ready(cluster, "trouter", "waiting")
    assert [t["name"] for t in router["status"]["tiers"]] == ["present", "ghost"]
    cm = get(cluster, "configmap", "waiting-routing")
    assert [t["name"] for t in yaml.safe_load(cm["data"]["router.yaml"])["tiers"]] == [
        "present",
        "ghost",
    ]


def test_objects_the_operator_did_not_create_are_never_adopted(cluster, op) -> None:
    foreign = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "squatter", "namespace": NS, "labels": {"owner": "someone"}},
        "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]},
    }
    apply(cluster, json.dumps(foreign))
    apply(cluster, tier_yaml("squatter"))
    cond = wait_for(
        lambda: (
            (c := ready_condition(get(cluster, "mtier", "squatter"))).get("reason")
            == "ChildConflict"
            and c
        ),
        TIMEOUT,
        what="ChildConflict",
    )
    assert "Service squatter" in cond["message"] and "not controlled" in cond["message"]
    svc = get(cluster, "service", "squatter")
    assert not svc["metadata"].get("ownerReferences")
    assert svc["spec"]["selector"] == {"app": "other"} and svc["metadata"]["labels"] == {
        "owner": "someone"
    }
    # Once the other object is gone the tier converges by itself (retry with backoff).
    cluster.kubectl("delete", "service", "squatter", "-n", NS)
    wait_ready(cluster, "mtier", "squatter", timeout=180)


def test_odd_but_valid_objects_do_not_crash_the_operator(cluster, op) -> None:
    mark = len(op.log_text())  # the module's log: only what these objects caused
    long_name = "l" + "o" * 61 + "g"  # 63 characters, the most a Service name allows
    apply(cluster, tier_yaml("zero", min_replicas=0))
    apply(cluster, tier_yaml("parked", min_replicas=0, count=0))
    apply(cluster, tier_yaml(long_name, min_replicas=0, count=0))
    many = [f"t{i:02d}" for i in range(64)]
    apply(cluster, "---\n".join(tier_yaml(n, min_replicas=0, count=0) for n in many))
    apply(
        cluster,
        yaml.safe_dump(
            {
                "apiVersion": "terrace.dev/v1alpha1",
                "kind": "TierRouter",
                "metadata": {"name": "wide", "namespace": NS},
                "spec": {"tiers": [{"name": n} for n in many], "replicas": 0},
            }
        ),
    )

    # min 0: the Deployment starts with no pods (the control loop may wake it later).
    wait_ready(cluster, "mtier", "zero")
    events = kubectl_json(
        cluster, "get", "events", "-n", NS, "--field-selector", "involvedObject.name=zero"
    )
    assert any("Deployment zero (0 replicas)" in e["message"] for e in events["items"])
    parked = wait_ready(cluster, "mtier", "parked")
    assert ready_condition(parked)["reason"] == "ScaledToZero"
    assert deployment_replicas(cluster, "parked") == 0
    assert parked["status"]["replicas"] == 0
    wait_ready(cluster, "mtier", long_name)
    assert get(cluster, "service", long_name) is not None
    router = wait_ready(cluster, "trouter", "wide", timeout=180)
    assert router["status"]["tierCount"] == 64
    cm = get(cluster, "configmap", "wide-routing")
    assert len(yaml.safe_load(cm["data"]["router.yaml"])["tiers"]) == 64
    assert op.alive()
    assert "Traceback" not in op.log_text()[mark:]


def test_operator_runs_with_least_privilege(cluster, op) -> None:
    mark = len(op.log_text())
    # Its own tier, reconciled as the ServiceAccount: not whatever another
    # test left in the namespace.
    apply(cluster, tier_yaml("privilege"))
    wait_ready(cluster, "mtier", "privilege")
    sa = "system:serviceaccount:terrace-system:terrace-operator"

    def can(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", *args, "--as", sa, check=False).stdout.strip()

    assert can("patch", "deployments", "-n", NS) == "yes"
    assert can("get", "secrets", "-n", NS) == "no"
    assert can("delete", "deployments", "-n", NS) == "no"
    assert can("create", "pods", "-n", NS) == "no"
    metrics = op.metrics()
    assert 'terrace_operator_reconcile_total{kind="ModelTier",result="success"}' in metrics
    assert "Forbidden" not in op.log_text()[mark:]


def test_restart_mid_way_converges_without_duplicates(cluster, op: OperatorProcess) -> None:
    apply(cluster, tier_yaml("before"))
    wait_ready(cluster, "mtier", "before")
    op.stop()
    try:
        # While the operator is down: new tiers, an edit, a deleted child.
        apply(cluster, "---\n".join(tier_yaml(n) for n in ("after-1", "after-2")))
        cluster.kubectl(
            "patch",
            "mtier",
            "before",
            "-n",
            NS,
            "--type=merge",
            "-p",
            '{"spec":{"replicas":{"min":2}}}',
        )
        cluster.kubectl("delete", "service", "before", "-n", NS)
    finally:
        op.start()
    for name in ("before", "after-1", "after-2"):
        wait_ready(cluster, "mtier", name)
    assert deployment_replicas(cluster, "before") == 2
    assert get(cluster, "service", "before") is not None

    # Exactly one of each child per tier, and the restart changed no pod
    # template: one ReplicaSet per Deployment, nothing rolled.
    names = ("before", "after-1", "after-2")
    for kind in ("deployments", "services", "pdb", "replicasets"):
        items = kubectl_json(
            cluster, "get", kind, "-n", NS, "-l", "app.kubernetes.io/name=terrace-runtime"
        )["items"]
        owners = [i["metadata"]["labels"]["terrace.dev/modeltier"] for i in items]
        owners = [o for o in owners if o in names]
        assert sorted(owners) == sorted(names), f"{kind}: {owners}"
    tiers = {
        t["metadata"]["name"] for t in kubectl_json(cluster, "get", "mtier", "-n", NS)["items"]
    }
    deployments = {
        d["metadata"]["name"]
        for d in kubectl_json(
            cluster, "get", "deployments", "-n", NS, "-l", "app.kubernetes.io/name=terrace-runtime"
        )["items"]
    }
    assert deployments == tiers


def test_a_router_with_batch_gets_terrace_batch_and_forwards_to_it(cluster, op) -> None:
    apply(cluster, tier_yaml("bt"))
    router = {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "TierRouter",
        "metadata": {"name": "batched", "namespace": NS},
        "spec": {
            "tiers": [{"name": "bt"}],
            "batch": {"storage": "2Gi", "signal": {"query": "grid", "threshold": "250"}},
        },
    }
    apply(cluster, yaml.safe_dump(router))
    dep = wait_for(lambda: get(cluster, "deployment", "batched-batch"), TIMEOUT,
                   what="terrace-batch Deployment")  # fmt: skip
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--router") + 1] == f"http://batched.{NS}.svc:8080"
    assert args[args.index("--threshold") + 1] == "250"
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("TierRouter", "batched", True)
    pvc = wait_for(lambda: get(cluster, "pvc", "batched-batch"), TIMEOUT, what="the store's claim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
    svc = wait_for(lambda: get(cluster, "service", "batched-batch"), TIMEOUT, what="its Service")
    assert svc["spec"]["ports"][0]["port"] == 8090
    cm = wait_for(lambda: get(cluster, "configmap", "batched-routing"), TIMEOUT)
    table = RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"]))
    assert table.batch_url == f"http://batched-batch.{NS}.svc:8090"
    # spec.batch removed: terrace-batch scaled to zero, its claim (the store) kept.
    cluster.kubectl("patch", "trouter", "batched", "-n", NS, "--type=json",
                    "-p", '[{"op": "remove", "path": "/spec/batch"}]')  # fmt: skip
    wait_for(lambda: get(cluster, "deployment", "batched-batch")["spec"]["replicas"] == 0,
             TIMEOUT, what="terrace-batch at zero")  # fmt: skip
    assert get(cluster, "pvc", "batched-batch") is not None
    cm = wait_for(
        lambda: (
            (c := get(cluster, "configmap", "batched-routing"))
            and "batch_url" not in yaml.safe_load(c["data"]["router.yaml"])
            and c
        ),
        TIMEOUT,
        what="the table without batch_url",
    )
