"""Every condition reason docs/troubleshooting.md documents, on a real object:
the real terrace-operator (as its ServiceAccount, control loop on, ticking
every 2 s against the real Prometheus) against the real apiserver, with the
real controllers and scheduler, and kwok making pods Ready on fake nodes.

Covered elsewhere on the real cluster, not repeated here: `ScaledToZero` and
`TierNotFound` (test_operator_reconcile.py); `ScaledUp`, `ScaledDown`,
`MetricsAvailable=False`, `Enforced` and `ExternalAutoscaler`
(test_control_loop.py).

GPU tiers go to a fake GPU node of this module's own (8 GPUs, a taint only
these tiers tolerate), so no other test's pods, agents or power requests
meet them; with no power agent on it, nothing ever reports an enforced
limit there.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from operator_harness import (
    OperatorProcess,
    Watch,
    condition,
    get_or_none,
    install_crds,
    install_rbac,
    kubectl_json,
    private_gpu_node,
    wait_for,
)
from terrace_operator.agent.protocol import ENFORCED_KEY, desired_entries, desired_key

pytestmark = pytest.mark.cluster

SUFFIX = uuid.uuid4().hex[:6]  # unique: a reused cluster may still be deleting the last run's
NS = f"reasons-{SUFFIX}"
QUOTA_NS = f"reasons-quota-{SUFFIX}"  # a namespace whose quota refuses every Deployment
GPU_NODE = f"reasons-gpu-{SUFFIX}"
TICK = 2.0
TIMEOUT = 90
NOWHERE = {"kubernetes.io/hostname": "no-such-node"}  # pods that never get a node


def tier(name: str, namespace: str = NS, **spec: Any) -> dict:
    body = {
        "model": {"uri": f"file:///models/{name}.onnx"},
        "replicas": {"min": 1, "max": 3},
        # A constant the real Prometheus evaluates: 4 for a target of 4 per
        # replica is one replica, inside the tolerance band.
        "scaling": {"metric": "custom", "query": "vector(4)", "target": 4},
        **spec,
    }
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "ModelTier",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def gpu_tier(name: str, **spec: Any) -> dict:
    """A GPU tier pinned to this module's GPU node (or `nodeSelector` given)."""
    placement = {
        "nodeSelector": {"kubernetes.io/hostname": GPU_NODE},
        "tolerations": [{"key": "terrace.dev/test", "operator": "Exists", "effect": "NoSchedule"}],
    }
    return tier(name, device="gpu", gpus=1, **{**placement, **spec})


def router(name: str, tiers: list[str], namespace: str = NS, **spec: Any) -> dict:
    return {
        "apiVersion": "terrace.dev/v1alpha1",
        "kind": "TierRouter",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"tiers": [{"name": t} for t in tiers], **spec},
    }


def apply(cluster, *objs: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def patch(cluster, kind: str, name: str, body: dict) -> None:
    cluster.kubectl("patch", kind, name, "-n", NS, "--type=merge", "-p", json.dumps(body))


def wait_reason(
    cluster,
    kind: str,
    name: str,
    type_: str,
    reason: str,
    namespace: str = NS,
    timeout: float = TIMEOUT,
    message: str | None = None,
) -> tuple[dict, dict]:
    """Until condition `type_` has `reason` (and `message`, if given) for the
    object's current generation; returns (object, condition). Fails with the
    last one seen."""
    seen: dict = {}

    def check() -> tuple[dict, dict] | None:
        obj = get_or_none(cluster, kind, name, namespace)
        c = condition(obj, type_)
        seen["last"] = c
        fresh = obj is not None and c.get("observedGeneration") == obj["metadata"]["generation"]
        wanted = c.get("reason") == reason and message in (None, c.get("message"))
        return (obj, c) if fresh and wanted else None  # type: ignore[return-value]

    try:
        return wait_for(check, timeout, what=f"{kind} {name} {type_} {reason}")
    except AssertionError:
        raise AssertionError(
            f"{kind} {name}: {type_} never {reason}; last {seen.get('last')}"
        ) from None


def warning_events(cluster, name: str, reason: str, namespace: str = NS) -> list[dict]:
    events = kubectl_json(cluster, "get", "events", "-n", namespace, "--field-selector",
                          f"involvedObject.name={name},reason={reason},type=Warning")  # fmt: skip
    return events["items"]


def node_annotations(cluster) -> dict:
    return kubectl_json(cluster, "get", "node", GPU_NODE)["metadata"].get("annotations") or {}


@pytest.fixture(scope="module")
def op(cluster, tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("reasons")
    install_crds(cluster)
    install_rbac(cluster)
    for ns in (NS, QUOTA_NS):
        cluster.kubectl("create", "namespace", ns)
    operator = OperatorProcess(cluster, [NS, QUOTA_NS], tmp / "operator.log", env={
        "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
        "TERRACE_CONTROL_INTERVAL_SECONDS": str(TICK),
        "TERRACE_METRICS_WINDOW": "10s",
    }, wake=True)  # fmt: skip
    try:
        private_gpu_node(cluster, GPU_NODE, gpus=8)
        operator.start()
        yield {"operator": operator, "wake": operator.wake_url(NS)}
    finally:
        for ns in (NS, QUOTA_NS):
            cluster.kubectl("delete", "trouter,mtier", "--all", "-n", ns, "--wait=true",
                            "--timeout=120s", check=False, timeout=150)  # fmt: skip
        operator.stop()
        print(operator.log_tail(200))
        for ns in (NS, QUOTA_NS):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.kubectl("delete", "node", GPU_NODE, "--ignore-not-found", check=False)


# ------------------------------------------------------------ ModelTier Ready


def test_pods_that_get_no_node_are_pods_not_ready(cluster, op):
    apply(cluster, tier("unplaced", nodeSelector=NOWHERE))
    _, ready = wait_reason(cluster, "mtier", "unplaced", "Ready", "PodsNotReady")
    assert ready["status"] == "False" and ready["message"] == "0/1 pods ready"
    (pod,) = kubectl_json(cluster, "get", "pods", "-n", NS, "-l",
                          "terrace.dev/modeltier=unplaced")["items"]  # fmt: skip
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    # Placeable again: the same tier becomes Available by itself.
    patch(cluster, "mtier", "unplaced", {"spec": {"nodeSelector": None}})
    _, ready = wait_reason(cluster, "mtier", "unplaced", "Ready", "Available")
    assert ready["status"] == "True" and ready["message"] == "1/1 pods ready"


def test_a_rollout_that_cannot_finish_is_progressing(cluster, op):
    apply(cluster, tier("rolling"))
    obj, ready = wait_reason(cluster, "mtier", "rolling", "Ready", "Available")
    assert ready["status"] == "True" and ready["message"] == "1/1 pods ready"
    assert obj["status"]["readyReplicas"] == 1
    # A new pod template whose pod gets no node: the Deployment surges one new
    # pod and keeps the old one serving until the new one is ready.
    patch(cluster, "mtier", "rolling", {"spec": {"nodeSelector": NOWHERE}})
    # (Progressing first says the Deployment controller has not seen the new
    # spec yet; then, for as long as the new pod has no node:)
    obj, ready = wait_reason(
        cluster,
        "mtier",
        "rolling",
        "Ready",
        "Progressing",
        message="rolling out: 1/1 pods updated, 2 running",
    )
    assert ready["status"] == "False"
    assert obj["status"]["readyReplicas"] == 1  # the old pod still serves
    patch(cluster, "mtier", "rolling", {"spec": {"nodeSelector": None}})
    wait_reason(cluster, "mtier", "rolling", "Ready", "Available")


def test_a_deployment_the_apiserver_refuses_is_child_rejected(cluster, op):
    # A quota of zero Deployments: the apiserver refuses the tier's (403).
    quota = {"apiVersion": "v1", "kind": "ResourceQuota",
             "metadata": {"name": "no-deployments", "namespace": QUOTA_NS},
             "spec": {"hard": {"count/deployments.apps": "0"}}}  # fmt: skip
    apply(cluster, quota)
    wait_for(lambda: (get_or_none(cluster, "resourcequota", "no-deployments", QUOTA_NS) or {})
             .get("status", {}).get("hard"), 60, what="the quota counted")  # fmt: skip
    apply(cluster, tier("refused", QUOTA_NS), router("refused-router", ["refused"], QUOTA_NS))
    for kind, name in (("mtier", "refused"), ("trouter", "refused-router")):
        _, ready = wait_reason(cluster, kind, name, "Ready", "ChildRejected", QUOTA_NS)
        assert ready["status"] == "False"
        assert "Forbidden" in ready["message"] and "exceeded quota" in ready["message"]
        assert warning_events(cluster, name, "ChildRejected", QUOTA_NS)
        assert get_or_none(cluster, "deployment", name, QUOTA_NS) is None
    # The control loop has nothing to scale.
    _, scaling = wait_reason(cluster, "mtier", "refused", "Scaling", "NoDeployment", QUOTA_NS)
    assert scaling["status"] == "Unknown"
    # The quota gone, the operator's retries create them and the tier is served.
    cluster.kubectl("delete", "resourcequota", "no-deployments", "-n", QUOTA_NS)
    wait_reason(cluster, "mtier", "refused", "Ready", "Available", QUOTA_NS, timeout=240)
    wait_reason(cluster, "trouter", "refused-router", "Ready", "Available", QUOTA_NS, timeout=240)


# ---------------------------------------------------------------- Scaling


def test_a_metric_inside_the_tolerance_band_is_steady(cluster, op):
    apply(cluster, tier("steady"))  # vector(4) at a target of 4: one replica
    obj, scaling = wait_reason(cluster, "mtier", "steady", "Scaling", "Steady")
    assert scaling["status"] == "True"
    assert scaling["message"] == "1 replicas; custom target 4"
    assert condition(obj, "MetricsAvailable")["status"] == "True"
    assert not obj["status"].get("lastScaling")  # nothing moved
    assert kubectl_json(cluster, "get", "deployment", "steady", "-n", NS)["spec"]["replicas"] == 1


def test_a_wake_call_shows_waking_up(cluster, op):
    apply(cluster, tier("sleeper", replicas={"min": 0, "max": 2}, scaling={
        "metric": "custom", "query": "vector(0)", "target": 4,
        "scaleDownStabilizationSeconds": 600,  # once woken, it stays up for this test
    }))  # fmt: skip
    _, scaling = wait_reason(cluster, "mtier", "sleeper", "Scaling", "Steady")
    assert scaling["message"] == "0 replicas; custom target 4"
    wait_reason(cluster, "mtier", "sleeper", "Ready", "ScaledToZero")
    watch = Watch(cluster, "mtier", "sleeper", NS)
    try:
        wait_for(lambda: watch.versions, 30, what="the watch's first version")
        # What a router holding a request for it does: the operator's wake endpoint.
        req = urllib.request.Request(f"{op['wake']}/sleeper", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 202, r.read()
        # The next tick records the wake-up; it shows until the tick after.
        woke = wait_for(lambda: [c for c in watch.conditions("Scaling")
                                 if c["reason"] == "WakingUp"], 30,
                        what="Scaling WakingUp in some version")  # fmt: skip
    finally:
        watch.stop()
    assert woke[0]["status"] == "True"
    assert woke[0]["message"].startswith("0 -> 1: woken by the router")
    obj = get_or_none(cluster, "mtier", "sleeper", NS)
    assert obj["status"]["lastScaling"][-1]["from"] == 0
    assert obj["status"]["lastScaling"][-1]["to"] == 1
    assert kubectl_json(cluster, "get", "deployment", "sleeper", "-n", NS)["spec"]["replicas"] == 1
    wait_reason(cluster, "mtier", "sleeper", "Ready", "Available")


# ---------------------------------------------------------------- PowerApplied


def test_gpu_tiers_without_a_power_policy_are_policy_off(cluster, op):
    apply(cluster, gpu_tier("gpu-off", power={"policy": "off"}), gpu_tier("gpu-unset"))
    for name in ("gpu-off", "gpu-unset"):
        obj, power = wait_reason(cluster, "mtier", name, "PowerApplied", "PolicyOff")
        assert power["status"] == "False"
        wait_reason(cluster, "mtier", name, "Ready", "Available")
        assert "desiredPowerLimitWatts" not in get_or_none(cluster, "mtier", name, NS)["status"]
        # no request for the agent on the node its pod runs on
        assert desired_key(NS, name) not in node_annotations(cluster)


def test_a_limit_nobody_enforces_is_agent_not_reporting(cluster, op):
    apply(cluster, gpu_tier("gpu-noagent", power={"policy": "fixed", "minWatts": 200,
                                                  "maxWatts": 300}))  # fmt: skip
    obj, power = wait_reason(cluster, "mtier", "gpu-noagent", "PowerApplied", "AgentNotReporting")
    assert power["status"] == "False"
    assert power["message"] == f"no power agent report on {GPU_NODE}"
    # The operator did ask: the request is on the node, for the agent that is not there.
    annotations = node_annotations(cluster)
    assert ENFORCED_KEY not in annotations
    key = desired_key(NS, "gpu-noagent")
    (entry,) = desired_entries({key: annotations[key]})
    assert (entry.tier, entry.watts) == (f"{NS}/gpu-noagent", 300)
    assert obj["status"]["desiredPowerLimitWatts"] == 300
    assert "powerLimitWatts" not in obj["status"]


def test_a_gpu_tier_whose_pods_get_no_node_is_no_pods(cluster, op):
    apply(
        cluster,
        gpu_tier(
            "gpu-nowhere",
            nodeSelector=NOWHERE,
            power={"policy": "fixed", "minWatts": 200, "maxWatts": 300},
        ),
    )
    _, power = wait_reason(cluster, "mtier", "gpu-nowhere", "PowerApplied", "NoPods")
    assert power["status"] == "Unknown"
    _, ready = wait_reason(cluster, "mtier", "gpu-nowhere", "Ready", "PodsNotReady")
    assert ready["message"] == "0/1 pods ready"


def test_power_bounds_that_leave_no_limit_are_invalid_power_spec(cluster, op):
    apply(
        cluster,
        # No minWatts/maxWatts and no agent to report the device's range.
        gpu_tier("gpu-nobounds", power={"policy": "adaptive"}),
        # A window whose schedule passes the CRD's pattern but is no cron expression.
        gpu_tier("gpu-badcron", power={"policy": "fixed", "minWatts": 200, "maxWatts": 400,
                                       "windows": [{"schedule": "99 * * * *", "maxWatts": 300}]}),
    )  # fmt: skip
    _, power = wait_reason(cluster, "mtier", "gpu-nobounds", "PowerApplied", "InvalidPowerSpec")
    assert power["status"] == "False" and "power bounds unknown" in power["message"]
    _, power = wait_reason(cluster, "mtier", "gpu-badcron", "PowerApplied", "InvalidPowerSpec")
    assert power["status"] == "False" and "99 * * * *" in power["message"]
    # The rest of the tick still runs: replicas are decided (the tick used to
    # fail here and write nothing at all), and nothing is asked of the agent.
    obj, _ = wait_reason(cluster, "mtier", "gpu-badcron", "Scaling", "Steady")
    assert condition(obj, "PowerApplied")["reason"] == "InvalidPowerSpec"
    annotations = node_annotations(cluster)
    for name in ("gpu-nobounds", "gpu-badcron"):
        assert desired_key(NS, name) not in annotations


# ------------------------------------------------------------------ TierRouter


def test_a_router_whose_tier_is_not_ready_says_so_on_tiers_ready(cluster, op):
    apply(cluster, tier("fine"), tier("late", nodeSelector=NOWHERE),
          router("waits", ["fine", "late"]))  # fmt: skip
    # (Until `fine` is Ready too, the message names both.)
    _, tiers = wait_reason(
        cluster, "trouter", "waits", "TiersReady", "TiersNotReady", message="not ready: late"
    )
    assert tiers["status"] == "False"
    # Ready is the router's own: every tier exists and its pods are ready.
    _, ready = wait_reason(cluster, "trouter", "waits", "Ready", "Available")
    assert ready["status"] == "True"
    obj = get_or_none(cluster, "trouter", "waits", NS)
    assert [(t["name"], t["ready"]) for t in obj["status"]["tiers"]] == [
        ("fine", True),
        ("late", False),
    ]
    listed = cluster.kubectl("get", "trouter", "waits", "-n", NS).stdout
    assert listed.splitlines()[1].split()[1] == "True", listed  # the READY column
    patch(cluster, "mtier", "late", {"spec": {"nodeSelector": None}})
    _, tiers = wait_reason(cluster, "trouter", "waits", "TiersReady", "AllTiersReady")
    assert tiers["status"] == "True" and tiers["message"] == "2 of 2 tiers ready"


def test_router_pods_that_get_no_node_are_pods_not_ready(cluster, op):
    # More CPU than any node the router may use has.
    big = {"resources": {"requests": {"cpu": "64"}}}
    apply(cluster, tier("for-heavy"), router("heavy", ["for-heavy"], **big))
    _, ready = wait_reason(cluster, "trouter", "heavy", "Ready", "PodsNotReady")
    assert ready["status"] == "False" and ready["message"] == "0/1 router pods ready"
    patch(cluster, "trouter", "heavy", {"spec": {"resources": None}})
    wait_reason(cluster, "trouter", "heavy", "Ready", "Available")


def test_a_router_rollout_that_cannot_finish_is_progressing(cluster, op):
    apply(cluster, tier("for-rolling"), router("rolls", ["for-rolling"]))
    wait_reason(cluster, "trouter", "rolls", "Ready", "Available")
    patch(cluster, "trouter", "rolls", {"spec": {"resources": {"requests": {"cpu": "64"}}}})
    obj, ready = wait_reason(
        cluster,
        "trouter",
        "rolls",
        "Ready",
        "Progressing",
        message="rolling out: 1/1 router pods updated, 2 running",
    )
    assert ready["status"] == "False"
    assert obj["status"]["readyReplicas"] == 1  # the old router pod still serves
    patch(cluster, "trouter", "rolls", {"spec": {"resources": None}})
    wait_reason(cluster, "trouter", "rolls", "Ready", "Available")


def test_a_router_child_someone_else_owns_is_child_conflict(cluster, op):
    foreign = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "squatted-routing", "namespace": NS},
               "data": {"router.yaml": "not ours"}}  # fmt: skip
    apply(cluster, foreign, tier("for-squatted"), router("squatted", ["for-squatted"]))
    _, ready = wait_reason(cluster, "trouter", "squatted", "Ready", "ChildConflict")
    assert ready["status"] == "False"
    assert "ConfigMap squatted-routing" in ready["message"]
    assert "not controlled" in ready["message"]
    assert warning_events(cluster, "squatted", "ChildConflict")
    cm = get_or_none(cluster, "configmap", "squatted-routing", NS)
    assert cm["data"] == {"router.yaml": "not ours"} and not cm["metadata"].get("ownerReferences")


def test_a_router_naming_only_missing_tiers_says_so_on_both_conditions(cluster, op):
    apply(cluster, router("lost", ["ghost-a", "ghost-b"]))
    _, ready = wait_reason(cluster, "trouter", "lost", "Ready", "TierNotFound")
    assert ready["status"] == "False"
    assert ready["message"] == f'ModelTiers "ghost-a", "ghost-b" do not exist in namespace {NS}'
    _, tiers = wait_reason(cluster, "trouter", "lost", "TiersReady", "TierNotFound")
    assert tiers["status"] == "False" and tiers["message"] == "some tiers do not exist"
