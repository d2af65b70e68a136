"""Documented rules of the operator, the wake endpoint and the power agent,
each on a real object: the real terrace-operator (its ServiceAccount, control
loop ticking every 2 s against the real Prometheus, wake endpoint on) against
the real apiserver, kwok making pods Ready, and the real terrace-agent (a fake
H100: 200-700 W) on a GPU Node of the test's own.

- docs/modeltier.md, "What the operator creates": a hand-edited field the
  operator sets is set back (an `Updated` Event), fields it does not set are
  left alone;
- docs/modeltier.md, "Replicas: who decides": the operator's replica writes
  are the `terrace-operator-replicas` field manager's; `spec.replicas.count`
  makes the control loop stand aside, and removing it hands the tier back;
- docs/modeltier.md, "Status": `lastTransitionTime` changes only when a
  condition's status flips; docs/tierrouter.md: `status.configHash` is the
  digest of the routing table in the ConfigMap;
- docs/troubleshooting.md: the wake endpoint answers 404 for a namespace the
  operator does not watch (and for a tier that does not exist) and 409 for a
  tier that does not scale to zero, has no Deployment of its own, or has an
  invalid spec;
- docs/troubleshooting.md and power.md: power bounds outside the device's
  range are no error, the device's range wins; the agent clamps a request
  to the GPU's constraints;
- docs/modeltier.md: `Ready=False` `InvalidSpec`, which the apiserver's
  validation prevents unless the installed CRD is looser than the operator
  (an older or newer CRD): produced here with a loosened copy of the CRD,
  restored before the test ends.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_harness import (
    CRD_DIR,
    OPERATOR_NAMESPACE,
    AgentProcess,
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
from terrace_operator.conditions import now_rfc3339

pytestmark = pytest.mark.cluster

SUFFIX = uuid.uuid4().hex[:6]  # unique: a reused cluster may still be deleting the last run's
NS = f"rules-{SUFFIX}"
UNWATCHED = f"rules-unwatched-{SUFFIX}"
TICK = 2.0
TIMEOUT = 90
NOWHERE = {"kubernetes.io/hostname": "no-such-node"}  # pods that never get a node
AGENT_RBAC = Path(__file__).resolve().parents[2] / "operator/terrace_operator/agent/rbac.yaml"
HASH_ANNOTATION = "terrace.dev/desired-hash"


def tier(name: str, **spec: Any) -> dict:
    body = {
        "model": {"uri": f"file:///models/{name}.onnx"},
        "replicas": {"min": 1, "max": 3},
        # A constant the real Prometheus evaluates: one replica, inside the band.
        "scaling": {"metric": "custom", "query": "vector(4)", "target": 4},
        **spec,
    }
    return {"apiVersion": "terrace.dev/v1alpha1", "kind": "ModelTier",
            "metadata": {"name": name, "namespace": NS}, "spec": body}  # fmt: skip


def apply(cluster, *objs: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def patch(cluster, kind: str, name: str, body: dict | list, kind_of_patch: str = "merge") -> None:
    cluster.kubectl("patch", kind, name, "-n", NS, f"--type={kind_of_patch}", "-p",
                    json.dumps(body))  # fmt: skip


def wait_reason(
    cluster,
    kind: str,
    name: str,
    type_: str,
    reason: str,
    message: str | None = None,
    timeout: float = TIMEOUT,
) -> tuple[dict, dict]:
    """Until condition `type_` has `reason` (and `message`) for the object's
    current generation; returns (object, condition)."""
    seen: dict = {}

    def check() -> tuple[dict, dict] | None:
        obj = get_or_none(cluster, kind, name, NS)
        c = condition(obj, type_)
        seen["last"] = c
        fresh = obj is not None and c.get("observedGeneration") == obj["metadata"]["generation"]
        if fresh and c.get("reason") == reason and message in (None, c.get("message")):
            return obj, c
        return None

    try:
        return wait_for(check, timeout, what=f"{kind} {name} {type_}={reason}")
    except AssertionError:
        raise AssertionError(f"{kind} {name} {type_}: last {seen.get('last')}") from None


def events(cluster, name: str, reason: str, type_: str = "Normal") -> list[dict]:
    return kubectl_json(cluster, "get", "events", "-n", NS, "--field-selector",
                        f"involvedObject.name={name},reason={reason},type={type_}")["items"]  # fmt: skip


def replicas(cluster, name: str) -> int:
    return int(kubectl_json(cluster, "get", "deployment", name, "-n", NS)["spec"]["replicas"])


def ticks(operator: OperatorProcess, name: str) -> float:
    """The operator's own count of completed control-loop ticks for a tier."""
    pattern = re.compile(
        r'^terrace_operator_control_ticks_total\{(?=[^}]*namespace="' + re.escape(NS)
        + r'")(?=[^}]*tier="' + re.escape(name) + r'")[^}]*\}\s+(\S+)$', re.M
    )  # fmt: skip
    m = pattern.search(operator.metrics())
    return float(m.group(1)) if m else 0.0


def wait_ticks(operator: OperatorProcess, name: str, n: int) -> None:
    """Until the control loop completed `n` more ticks of tier `name`."""
    start = ticks(operator, name)
    wait_for(lambda: ticks(operator, name) >= start + n, 20 * TICK * n,
             what=f"{n} control ticks of {name}")  # fmt: skip


def wake(url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())["message"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["message"]


@pytest.fixture(scope="module")
def op(cluster, tmp_path_factory) -> Iterator[OperatorProcess]:
    tmp = tmp_path_factory.mktemp("rules")
    install_crds(cluster)
    install_rbac(cluster)
    cluster.kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", str(AGENT_RBAC))
    cluster.kubectl("create", "namespace", NS)
    operator = OperatorProcess(cluster, [NS], tmp / "operator.log", env={
        "TERRACE_PROMETHEUS_URL": cluster.prometheus_url,
        "TERRACE_CONTROL_INTERVAL_SECONDS": str(TICK),
        "TERRACE_METRICS_WINDOW": "10s",
    }, wake=True)  # fmt: skip
    try:
        operator.start()
        yield operator
    finally:
        cluster.kubectl("delete", "trouter,mtier", "--all", "-n", NS, "--wait=true",
                        "--timeout=120s", check=False, timeout=150)  # fmt: skip
        operator.stop()
        print(operator.log_tail(200))
        cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


# ------------------------------------------------------- children and replicas


def test_a_drifted_child_is_put_back_with_an_updated_event(cluster, op):
    apply(cluster, tier("drift"))
    wait_reason(cluster, "mtier", "drift", "Ready", "Available")
    assert not events(cluster, "drift", "Updated")
    dep = kubectl_json(cluster, "get", "deployment", "drift", "-n", NS)
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    # Someone edits the Deployment: a field the operator sets (the image) and
    # one it does not (an annotation of their own).
    patch(cluster, "deployment", "drift", [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image",
         "value": "example.com/other:1"},
        {"op": "add", "path": "/metadata/annotations/example.com~1note", "value": "mine"},
    ], "json")  # fmt: skip

    def restored_deployment() -> dict | None:
        d = kubectl_json(cluster, "get", "deployment", "drift", "-n", NS)
        return d if d["spec"]["template"]["spec"]["containers"][0]["image"] == image else None

    dep = wait_for(restored_deployment, TIMEOUT, what="the image set back")
    assert dep["metadata"]["annotations"]["example.com/note"] == "mine"  # not the operator's
    wait_for(lambda: [e for e in events(cluster, "drift", "Updated")
                      if e["message"] == "Updated Deployment drift"], 30,
             what="an Updated Event for the Deployment")  # fmt: skip

    # The Service: its selector pointed elsewhere is pointed back.
    selector = kubectl_json(cluster, "get", "service", "drift", "-n", NS)["spec"]["selector"]
    patch(cluster, "service", "drift",
          {"spec": {"selector": {k: "someone-else" for k in selector}}})  # fmt: skip
    wait_for(lambda: kubectl_json(cluster, "get", "service", "drift", "-n", NS)["spec"]
             ["selector"] == selector, TIMEOUT, what="the Service's selector set back")  # fmt: skip
    wait_for(lambda: [e for e in events(cluster, "drift", "Updated")
                      if e["message"] == "Updated Service drift"], 30,
             what="an Updated Event for the Service")  # fmt: skip
    wait_reason(cluster, "mtier", "drift", "Ready", "Available")


def owners_of_replicas(deployment: dict) -> set[tuple[str, str]]:
    """(manager, operation) of every managedFields entry holding spec.replicas."""
    return {
        (m["manager"], m["operation"])
        for m in deployment["metadata"].get("managedFields") or []
        if "f:replicas" in ((m.get("fieldsV1") or {}).get("f:spec") or {})
    }


def test_count_set_then_removed_hands_the_tier_back_to_the_control_loop(cluster, op):
    # The metric asks for two replicas: 8 for a target of 4 per replica.
    apply(cluster, tier("handback", replicas={"min": 1, "max": 4}, scaling={
        "metric": "custom", "query": "vector(8)", "target": 4,
        "scaleDownStabilizationSeconds": 0,
    }))  # fmt: skip
    wait_for(lambda: replicas(cluster, "handback") == 2, TIMEOUT,
             what="the control loop scaling to 2")  # fmt: skip
    # An HPA (here kubectl) writes spec.replicas.count through the scale subresource.
    cluster.kubectl("scale", "mtier", "handback", "-n", NS, "--replicas=3")
    assert get_or_none(cluster, "mtier", "handback", NS)["spec"]["replicas"]["count"] == 3
    wait_for(lambda: replicas(cluster, "handback") == 3, TIMEOUT, what="count 3 applied")
    dep = kubectl_json(cluster, "get", "deployment", "handback", "-n", NS,
                       "--show-managed-fields")  # fmt: skip
    # The operator's replica write is its replicas manager's; its main manager
    # never holds spec.replicas (so its applies never undo an autoscaler).
    assert ("terrace-operator-replicas", "Apply") in owners_of_replicas(dep), dep["metadata"]
    assert ("terrace-operator", "Apply") not in owners_of_replicas(dep)
    wait_for(lambda: [e for e in events(cluster, "handback", "Scaled")
                      if "from 2 to 3 replicas" in e["message"]], 30,
             what="a Scaled Event")  # fmt: skip
    _, scaling = wait_reason(cluster, "mtier", "handback", "Scaling", "ExternalAutoscaler")
    assert scaling["status"] == "False"
    # The control loop stands aside: ticks pass, the metric still asks for 2.
    wait_ticks(op, "handback", 3)
    assert replicas(cluster, "handback") == 3
    # count removed: the control loop decides again, down to what the metric asks.
    patch(cluster, "mtier", "handback", [{"op": "remove", "path": "/spec/replicas/count"}], "json")
    obj, scaling = wait_reason(cluster, "mtier", "handback", "Scaling", "ScaledDown")
    assert scaling["message"].startswith("3 -> 2"), scaling
    assert obj["status"]["lastScaling"][-1]["from"] == 3
    assert obj["status"]["lastScaling"][-1]["to"] == 2
    wait_for(lambda: replicas(cluster, "handback") == 2, TIMEOUT, what="back to 2")


def test_last_transition_time_moves_only_when_the_status_flips(cluster, op):
    apply(cluster, tier("flips", nodeSelector=NOWHERE))
    obj, ready = wait_reason(cluster, "mtier", "flips", "Ready", "PodsNotReady",
                             message="0/1 pods ready")  # fmt: skip
    assert ready["status"] == "False"
    became_false = ready["lastTransitionTime"]
    # A rewrite of the condition from now on would carry a later time.
    wait_for(lambda: now_rfc3339() > became_false, 5, interval=0.1, what="the next second")
    # Another message (and generation), the same status: the time stays.
    patch(cluster, "mtier", "flips", {"spec": {"replicas": {"min": 2, "max": 3}}})
    obj2, ready = wait_reason(cluster, "mtier", "flips", "Ready", "PodsNotReady",
                              message="0/2 pods ready")  # fmt: skip
    assert obj2["metadata"]["generation"] > obj["metadata"]["generation"]
    assert ready["lastTransitionTime"] == became_false
    wait_for(lambda: now_rfc3339() > became_false, 5, interval=0.1, what="the next second")
    # The status flips: the time moves.
    patch(cluster, "mtier", "flips", {"spec": {"nodeSelector": None}})
    _, ready = wait_reason(cluster, "mtier", "flips", "Ready", "Available",
                           message="2/2 pods ready")  # fmt: skip
    assert ready["status"] == "True"
    assert ready["lastTransitionTime"] > became_false


def test_config_hash_is_the_digest_of_the_routing_table(cluster, op):
    router = {"apiVersion": "terrace.dev/v1alpha1", "kind": "TierRouter",
              "metadata": {"name": "hashed", "namespace": NS},
              "spec": {"tiers": [{"name": "hashed-a"}]}}  # fmt: skip
    apply(cluster, tier("hashed-a"), tier("hashed-b"), router)

    def table() -> tuple[str, str, str] | None:
        """(status.configHash, the ConfigMap's digest, its routing table)."""
        status = (get_or_none(cluster, "trouter", "hashed", NS) or {}).get("status") or {}
        cm = get_or_none(cluster, "configmap", "hashed-routing", NS)
        if not status.get("configHash") or cm is None:
            return None
        return (status["configHash"], cm["metadata"]["annotations"][HASH_ANNOTATION],
                cm["data"]["router.yaml"])  # fmt: skip

    first, digest, text = wait_for(table, TIMEOUT, what="a routing table and its hash")
    assert first == digest
    assert "hashed-a" in text and "hashed-b" not in text
    # The table changes (a second tier): so does the hash, with the ConfigMap.
    patch(cluster, "trouter", "hashed",
          {"spec": {"tiers": [{"name": "hashed-a"}, {"name": "hashed-b"}]}})  # fmt: skip
    second, digest, text = wait_for(lambda: (t := table()) and t[0] != first and t, TIMEOUT,
                                    what="a new hash")  # fmt: skip
    assert second == digest and "hashed-b" in text
    # Only the router's Deployment changes: the table and its hash do not.
    patch(cluster, "trouter", "hashed", {"spec": {"resources": {"requests": {"cpu": "100m"}}}})
    wait_for(lambda: kubectl_json(cluster, "get", "deployment", "hashed", "-n", NS)["spec"]
             ["template"]["spec"]["containers"][0].get("resources", {}).get("requests", {})
             .get("cpu") == "100m", TIMEOUT, what="the router Deployment updated")  # fmt: skip
    obj, _ = wait_reason(cluster, "trouter", "hashed", "Ready", "Available")
    assert obj["status"]["configHash"] == second
    assert table() == (second, second, text)


# ------------------------------------------------------------- wake endpoint


def test_the_wake_endpoint_refuses_what_it_must_not_wake(cluster, op):
    apply(cluster,
          tier("always-on"),  # min 1
          tier("driven", replicas={"min": 0, "max": 2, "count": 1}),  # an HPA drives it
          tier("sleeper", replicas={"min": 0, "max": 2}, scaling={
              "metric": "custom", "query": "vector(0)", "target": 4,
              "scaleDownStabilizationSeconds": 600}))  # fmt: skip
    wait_reason(cluster, "mtier", "always-on", "Ready", "Available")
    wait_reason(cluster, "mtier", "driven", "Ready", "Available")
    wait_reason(cluster, "mtier", "sleeper", "Ready", "ScaledToZero")

    assert wake(op.wake_url(UNWATCHED, "x")) == (
        404,
        f"namespace {UNWATCHED!r} is not watched by this operator",
    )
    assert wake(op.wake_url(NS, "ghost")) == (404, f"no ModelTier {NS}/ghost")
    for name in ("always-on", "driven"):
        assert wake(op.wake_url(NS, name)) == (409, f"ModelTier {NS}/{name} does not scale to zero")
        assert replicas(cluster, name) == 1
    assert not events(cluster, "driven", "WakingUp")
    # The one it may wake: 202, and once it has a replica, 200.
    assert wake(op.wake_url(NS, "sleeper")) == (202, "0 -> 1: waking")
    assert replicas(cluster, "sleeper") == 1
    assert wake(op.wake_url(NS, "sleeper")) == (200, "1 replicas: awake")


def test_a_deployment_the_tier_does_not_control_is_never_scaled(cluster, op):
    # Someone else's Deployment with the tier's name, at zero replicas.
    foreign = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "squat", "namespace": NS},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "squat"}},
                 "template": {"metadata": {"labels": {"app": "squat"}},
                              "spec": {"containers": [{"name": "c", "image": "example.com/x:1"}]}}},
    }  # fmt: skip
    apply(cluster, foreign)
    # A tier that may sleep and whose metric asks for two replicas.
    apply(cluster, tier("squat", replicas={"min": 0, "max": 2}, scaling={
        "metric": "custom", "query": "vector(8)", "target": 4}))  # fmt: skip
    wait_reason(cluster, "mtier", "squat", "Ready", "ChildConflict")
    assert wake(op.wake_url(NS, "squat")) == (409, f"ModelTier {NS}/squat has no Deployment yet")
    _, scaling = wait_reason(cluster, "mtier", "squat", "Scaling", "NoDeployment")
    assert scaling["status"] == "Unknown"
    wait_ticks(op, "squat", 3)
    assert replicas(cluster, "squat") == 0  # neither the wake call nor the loop touched it
    assert not events(cluster, "squat", "WakingUp") and not events(cluster, "squat", "ScaledUp")


# ----------------------------------------------------------------------- power


@pytest.fixture
def gpu_node(cluster) -> Iterator[str]:
    """A fake GPU Node (one GPU) only this test's tier may use; no agent yet."""
    name = f"rules-gpu-{uuid.uuid4().hex[:6]}"
    try:
        private_gpu_node(cluster, name, gpus=1)
        yield name
    finally:
        cluster.kubectl("delete", "node", name, "--ignore-not-found", check=False)


def node_power(cluster, node: str, tier_name: str, obj: dict | None = None) -> tuple:
    """(the operator's request for the tier in watts, the agent's enforced watts per GPU)."""
    ann = (obj or kubectl_json(cluster, "get", "node", node))["metadata"].get("annotations") or {}
    key = desired_key(NS, tier_name)
    asked = [e.watts for e in desired_entries({key: ann[key]})] if key in ann else []
    report = json.loads(ann.get(ENFORCED_KEY) or "{}")
    enforced = sorted(g["enforcedWatts"] for g in (report.get("gpus") or {}).values())
    return (asked[0] if asked else None), enforced, report.get("agent")


def test_bounds_outside_the_device_range_the_device_wins(cluster, op, gpu_node, tmp_path):
    placement = {"nodeSelector": {"kubernetes.io/hostname": gpu_node},
                 "tolerations": [{"key": "terrace.dev/test", "operator": "Exists",
                                  "effect": "NoSchedule"}]}  # fmt: skip
    # 50-100 W: below the H100's 200 W minimum.
    apply(cluster, tier("watts", device="gpu", gpus=1, **placement,
                        power={"policy": "fixed", "minWatts": 50, "maxWatts": 100}))  # fmt: skip
    # No agent yet, so no device range known: the operator asks the tier's own 100 W.
    obj, _ = wait_reason(cluster, "mtier", "watts", "PowerApplied", "AgentNotReporting")
    assert obj["status"]["desiredPowerLimitWatts"] == 100
    assert node_power(cluster, gpu_node, "watts")[0] == 100
    watch = Watch(cluster, "node", gpu_node, NS)  # (a Node has no namespace)
    agent = AgentProcess(cluster.service_account_kubeconfig(OPERATOR_NAMESPACE, "terrace-agent"),
                         gpu_node, tmp_path / "agent.log", gpus=1)  # fmt: skip
    try:
        # The agent clamps the 100 W request to the GPU's 200 W minimum ...
        wait_for(lambda: [v for v in watch.versions
                          if node_power(cluster, gpu_node, "watts", v) == (100, [200], "running")],
                 60, what="the agent enforcing 200 W for a 100 W request")  # fmt: skip
        # ... and, with the device's range reported, the operator asks 200 W too: no error.
        obj, power = wait_reason(cluster, "mtier", "watts", "PowerApplied", "Enforced",
                                 message="200 W enforced on 1 GPU(s)")  # fmt: skip
        assert power["status"] == "True"
        assert (obj["status"]["desiredPowerLimitWatts"], obj["status"]["powerLimitWatts"]) == (
            200,
            200,
        )
        assert node_power(cluster, gpu_node, "watts") == (200, [200], "running")
        # Above the 700 W maximum: 700 W.
        patch(cluster, "mtier", "watts", {"spec": {"power": {"maxWatts": 900}}})
        obj, power = wait_reason(cluster, "mtier", "watts", "PowerApplied", "Enforced",
                                 message="700 W enforced on 1 GPU(s)")  # fmt: skip
        assert (obj["status"]["desiredPowerLimitWatts"], obj["status"]["powerLimitWatts"]) == (
            700,
            700,
        )
        assert node_power(cluster, gpu_node, "watts") == (700, [700], "running")
    finally:
        watch.stop()
        assert agent.stop() == 0
        print(agent.log_path.read_text()[-3000:])
        cluster.kubectl("delete", "mtier", "watts", "-n", NS, "--wait=true", "--timeout=60s",
                        check=False, timeout=90)  # fmt: skip


# --------------------------------------------------------------- InvalidSpec


def loosened_crd() -> str:
    """The ModelTier CRD without the enum on spec.model.format: what an
    operator older (or newer) than its CRD meets."""
    crd = yaml.safe_load((CRD_DIR / "terrace.dev_modeltiers.yaml").read_text())
    for version in crd["spec"]["versions"]:
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["model"]["properties"]["format"].pop("enum")
    return yaml.safe_dump(crd)


def test_a_spec_the_operator_cannot_read_is_invalid_spec(cluster, op):
    bad = tier("unreadable", model={"uri": "file:///models/x.gguf", "format": "gguf"})
    apply(cluster, tier("neighbour"))
    mark = len(op.log_text())
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-",
                        input=loosened_crd())  # fmt: skip
        # Until the apiserver serves the loosened schema, it refuses the tier.
        wait_for(lambda: apply(cluster, bad) or True, 60, what="the loose CRD accepting the tier")
        obj, ready = wait_reason(cluster, "mtier", "unreadable", "Ready", "InvalidSpec")
        assert ready["status"] == "False"
        assert "model.format" in ready["message"] and "gguf" in ready["message"], ready
        assert get_or_none(cluster, "deployment", "unreadable", NS) is None
        assert wake(op.wake_url(NS, "unreadable")) == (
            409,
            f"ModelTier {NS}/unreadable has an invalid spec",
        )
        # Ticks pass (the neighbour's count): still one Warning, no new status,
        # and the log does not repeat itself every tick.
        wait_ticks(op, "neighbour", 4)
        warnings = events(cluster, "unreadable", "InvalidSpec", "Warning")
        assert len(warnings) == 1 and warnings[0]["count"] == 1, warnings
        assert (
            get_or_none(cluster, "mtier", "unreadable", NS)["metadata"]["resourceVersion"]
            == obj["metadata"]["resourceVersion"]
        )
        log = op.log_text()[mark:]
        assert "Traceback" not in log, log[-3000:]
        said = [line for line in log.splitlines() if "unreadable" in line]
        assert len(said) == 1 and "cannot read" in said[0], said
    finally:
        cluster.kubectl("delete", "mtier", "unreadable", "-n", NS, "--ignore-not-found",
                        "--wait=true", "--timeout=60s", check=False, timeout=90)  # fmt: skip
        install_crds(cluster)
    # The real CRD is back: the apiserver refuses the format again.
    wait_for(lambda: cluster.kubectl("apply", "--dry-run=server", "-f", "-",
                                     input=yaml.safe_dump(bad), check=False).returncode != 0,
             60, what="the real CRD refusing format gguf again")  # fmt: skip
