"""Every CEL rule and schema constraint of the CRDs, enforced by the real apiserver.

Each case sends a bad object with `kubectl apply --dry-run=server` and checks
the apiserver refuses it with a message a user can act on; the samples and
odd-but-valid objects must pass the same door.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from operator_harness import SAMPLES, ensure_namespace, install_crds

pytestmark = pytest.mark.cluster

NS = "crd-validation"

TIER = {
    "apiVersion": "terrace.dev/v1alpha1",
    "kind": "ModelTier",
    "metadata": {"name": "t", "namespace": NS},
    "spec": {"model": {"uri": "file:///m.onnx"}},
}
GPU_TIER = {**TIER, "spec": {"model": {"uri": "file:///m.pt", "format": "torch"}, "device": "gpu"}}
ROUTER = {
    "apiVersion": "terrace.dev/v1alpha1",
    "kind": "TierRouter",
    "metadata": {"name": "r", "namespace": NS},
    "spec": {"tiers": [{"name": "small"}, {"name": "large"}]},
}
DELETE = object()


def merged(base: dict, patch: dict) -> dict:
    """`base` with `patch` merged in (DELETE removes a key)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v is DELETE:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = v
    return out


def spec(base: dict, **fields) -> dict:
    return merged(base, {"spec": fields})


@pytest.fixture(scope="module")
def crds(cluster):
    install_crds(cluster)
    ensure_namespace(cluster, NS)
    return cluster


def dry_run(cluster, obj: dict):
    return cluster.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False
    )


REFUSED = [
    # --- CEL rules (cross-field) -------------------------------------------
    (
        "min-above-max",
        spec(TIER, replicas={"min": 5, "max": 2}),
        "replicas.min must be less than or equal to replicas.max",
    ),
    (
        "min-above-default-max",
        spec(TIER, replicas={"min": 9}),
        "replicas.min must be less than or equal to replicas.max",
    ),
    (
        "power-on-cpu",
        spec(TIER, power={"policy": "adaptive", "maxWatts": 300}),
        "power is only allowed when device is gpu",
    ),
    ("gpus-on-cpu", spec(TIER, gpus=1), "gpus is only allowed when device is gpu"),
    (
        "gpu-metric-on-cpu",
        spec(TIER, scaling={"metric": "gpuUtilization"}),
        "scaling.metric gpuUtilization is only allowed when device is gpu",
    ),
    (
        "watts-min-above-max",
        spec(GPU_TIER, power={"minWatts": 500, "maxWatts": 300}),
        "power.minWatts must be less than or equal to power.maxWatts",
    ),
    (
        "fixed-without-max",
        spec(GPU_TIER, power={"policy": "fixed"}),
        "power.maxWatts is required when power.policy is fixed",
    ),
    (
        "window-below-min",
        spec(
            GPU_TIER,
            power={"minWatts": 300, "windows": [{"schedule": "* 17 * * *", "maxWatts": 200}]},
        ),
        "every power window's maxWatts must be at least power.minWatts",
    ),
    (
        "custom-without-query",
        spec(TIER, scaling={"metric": "custom"}),
        "scaling.query (a PromQL expression) is required when scaling.metric is custom",
    ),
    (
        "custom-empty-query",
        spec(TIER, scaling={"metric": "custom", "query": ""}),
        "scaling.query (a PromQL expression) is required when scaling.metric is custom",
    ),
    (
        "external-without-image",
        spec(TIER, model={"format": "external"}),
        "model.image is required when model.format is external",
    ),
    (
        "runtime-without-uri",
        spec(TIER, model={"uri": DELETE}),
        "model.uri is required unless model.format is external",
    ),
    (
        "args-without-external",
        spec(TIER, model={"args": ["--x"]}),
        "model.args is only allowed when model.format is external",
    ),
    (
        "name-not-dns-1035",
        merged(TIER, {"metadata": {"name": "9lives"}}),
        "metadata.name must be a DNS-1035 label",
    ),
    (
        "name-with-dot",
        merged(TIER, {"metadata": {"name": "a.b"}}),
        "metadata.name must be a DNS-1035 label",
    ),
    (
        "name-too-long",
        merged(TIER, {"metadata": {"name": "a" * 64}}),
        "metadata.name must be a DNS-1035 label",
    ),
    (
        "router-name-too-long",
        merged(ROUTER, {"metadata": {"name": "r" * 64}}),
        "metadata.name must be a DNS-1035 label",
    ),
    (
        "duplicate-tiers",
        spec(ROUTER, tiers=[{"name": "a"}, {"name": "b"}, {"name": "a"}]),
        "tier names must be unique",
    ),
    ("tier-named-auto", spec(ROUTER, tiers=[{"name": "auto"}]), "'auto' cannot name a tier"),
    (
        "classifier-both",
        spec(ROUTER, classifier={"model": "/opt/clf", "configMapName": "clf"}),
        "set classifier.model or classifier.configMapName, not both",
    ),
    # --- schema constraints --------------------------------------------------
    (
        "share-above-100",
        spec(ROUTER, classifier={"targetLargeSharePercent": 101}),
        "spec.classifier.targetLargeSharePercent: Invalid value: 101",
    ),
    (
        "share-negative",
        spec(ROUTER, classifier={"targetLargeSharePercent": -1}),
        "spec.classifier.targetLargeSharePercent: Invalid value: -1",
    ),
    (
        "share-as-float",
        spec(ROUTER, classifier={"targetLargeSharePercent": 0.3}),
        'spec.classifier.targetLargeSharePercent: Invalid value: "number"',
    ),
    (
        "watts-as-float",
        spec(GPU_TIER, power={"maxWatts": 300.5}),
        'spec.power.maxWatts: Invalid value: "number"',
    ),
    ("min-negative", spec(TIER, replicas={"min": -1}), "spec.replicas.min: Invalid value: -1"),
    ("max-zero", spec(TIER, replicas={"max": 0}), "spec.replicas.max: Invalid value: 0"),
    (
        "tolerance-above-100",
        spec(TIER, scaling={"tolerancePercent": 101}),
        "spec.scaling.tolerancePercent: Invalid value: 101",
    ),
    ("target-zero", spec(TIER, scaling={"target": 0}), "spec.scaling.target: Invalid value: 0"),
    ("device-enum", spec(TIER, device="tpu"), 'spec.device: Unsupported value: "tpu"'),
    (
        "format-enum",
        spec(TIER, model={"format": "gguf"}),
        'spec.model.format: Unsupported value: "gguf"',
    ),
    ("task-enum", spec(TIER, model={"task": "chat"}), 'spec.model.task: Unsupported value: "chat"'),
    (
        "metric-enum",
        spec(TIER, scaling={"metric": "cpu"}),
        'spec.scaling.metric: Unsupported value: "cpu"',
    ),
    (
        "policy-enum",
        spec(GPU_TIER, power={"policy": "turbo"}),
        'spec.power.policy: Unsupported value: "turbo"',
    ),
    ("uri-scheme", spec(TIER, model={"uri": "ftp://host/m.onnx"}), "spec.model.uri: Invalid value"),
    (
        "cron-fields",
        spec(GPU_TIER, power={"windows": [{"schedule": "evenings", "maxWatts": 300}]}),
        "spec.power.windows[0].schedule: Invalid value",
    ),
    (
        "window-needs-watts",
        spec(GPU_TIER, power={"windows": [{"schedule": "* 17 * * *"}]}),
        "spec.power.windows[0].maxWatts: Required value",
    ),
    (
        "bad-quantity",
        spec(TIER, resources={"requests": {"cpu": "lots"}}),
        "spec.resources.requests.cpu: Invalid value",
    ),
    ("gpus-above-16", spec(GPU_TIER, gpus=17), "spec.gpus: Invalid value: 17"),
    ("port-range", spec(TIER, model={"port": 70000}), "spec.model.port: Invalid value: 70000"),
    (
        "model-required",
        merged(TIER, {"spec": {"model": DELETE, "device": "cpu"}}),
        "spec.model: Required value",
    ),
    ("spec-required", merged(TIER, {"spec": DELETE}), "spec: Required value"),
    ("unknown-field", spec(TIER, replica={"min": 1}), 'unknown field "spec.replica"'),
    ("no-tiers", spec(ROUTER, tiers=[]), "spec.tiers: Invalid value"),
    (
        "too-many-tiers",
        spec(ROUTER, tiers=[{"name": f"t{i}"} for i in range(65)]),
        "spec.tiers: Too many: 65: must have at most 64 items",
    ),
    (
        "tier-name-too-long",
        spec(ROUTER, tiers=[{"name": "t" * 64}]),
        "spec.tiers[0].name: Too long",
    ),
    (
        "tiers-required",
        merged(ROUTER, {"spec": {"tiers": DELETE, "replicas": 1}}),
        "spec.tiers: Required value",
    ),
    ("auth-needs-secret", spec(ROUTER, auth={}), "spec.auth.apiKeySecretRef: Required value"),
    (
        "service-type-enum",
        spec(ROUTER, service={"type": "ExternalName"}),
        'spec.service.type: Unsupported value: "ExternalName"',
    ),
    ("router-port-range", spec(ROUTER, service={"port": 0}), "spec.service.port: Invalid value: 0"),
    (
        "escalation-attempts",
        spec(ROUTER, escalation={"maxAttempts": 0}),
        "spec.escalation.maxAttempts: Invalid value: 0",
    ),
    (
        "router-nodeport-on-clusterip",
        spec(ROUTER, service={"type": "ClusterIP", "nodePort": 30080}),
        "service.nodePort needs service.type NodePort or LoadBalancer",
    ),
    (
        "escalation-logprob-float",
        spec(ROUTER, escalation={"minMeanLogprob": -2.5}),
        'spec.escalation.minMeanLogprob: Invalid value: "number"',
    ),
    (
        "escalation-logprob-positive",
        spec(ROUTER, escalation={"minMeanLogprob": "2.5"}),
        'spec.escalation.minMeanLogprob: Invalid value: "2.5"',
    ),
    (
        "batch-replicas-need-postgres",
        spec(ROUTER, batch={"replicas": 2}),
        "batch.replicas above 1 needs batch.postgresUrlSecretRef",
    ),
    (
        "batch-signal-needs-query",
        spec(ROUTER, batch={"signal": {"threshold": "300"}}),
        "spec.batch.signal.query: Required value",
    ),
    (
        "batch-forecast-empty",
        spec(ROUTER, batch={"signal": {"query": "grid", "forecastQuery": ""}}),
        "spec.batch.signal.forecastQuery: Invalid value",
    ),
    (
        "batch-threshold-float",
        spec(ROUTER, batch={"signal": {"query": "grid", "threshold": 300.5}}),
        'spec.batch.signal.threshold: Invalid value: "number"',
    ),
    (
        "batch-router-name-too-long",
        merged(spec(ROUTER, batch={}), {"metadata": {"name": "r" * 58}}),
        "a TierRouter with spec.batch has a name of at most 57 characters",
    ),
    (
        "batch-storage-quantity",
        spec(ROUTER, batch={"storage": "lots"}),
        'spec.batch.storage: Invalid value: "lots"',
    ),
]


@pytest.mark.parametrize(("case", "obj", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_invalid_objects_are_refused_with_a_clear_message(
    crds, case: str, obj: dict, message: str
) -> None:
    out = dry_run(crds, obj)
    assert out.returncode != 0, f"{case}: the apiserver accepted it:\n{out.stdout}"
    assert message in out.stderr, f"{case}: expected {message!r} in:\n{out.stderr}"


ACCEPTED = [
    ("min-zero", spec(TIER, replicas={"min": 0, "max": 1})),
    ("longest-name", merged(TIER, {"metadata": {"name": "a" * 63}})),
    (
        "external",
        spec(
            TIER,
            model={
                "uri": DELETE,
                "format": "external",
                "image": "vllm/vllm-openai",
                "args": ["--model", "x"],
                "port": 8000,
                "healthPath": "/health",
            },
        ),
    ),
    ("pvc-uri", spec(TIER, model={"uri": "pvc://models/small.onnx"})),
    (
        "gpu-power-windows",
        spec(
            GPU_TIER,
            gpus=2,
            power={
                "policy": "fixed",
                "minWatts": 150,
                "maxWatts": 300,
                "windows": [{"schedule": "0 17 * * 1-5", "durationMinutes": 240, "maxWatts": 200}],
            },
        ),
    ),
    (
        "custom-metric",
        spec(TIER, scaling={"metric": "custom", "query": "sum(rate(x[1m]))", "target": 10}),
    ),
    ("int-quantities", spec(TIER, resources={"requests": {"cpu": 2, "memory": "1Gi"}})),
    ("many-tiers", spec(ROUTER, tiers=[{"name": f"t{i}"} for i in range(64)])),
    ("share-bounds", spec(ROUTER, classifier={"targetLargeSharePercent": 0})),
    ("share-all", spec(ROUTER, classifier={"targetLargeSharePercent": 100})),
]


@pytest.mark.parametrize(("case", "obj"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_odd_but_valid_objects_are_accepted(crds, case: str, obj: dict) -> None:
    out = dry_run(crds, obj)
    assert out.returncode == 0, f"{case} refused:\n{out.stderr}"


@pytest.mark.parametrize(
    "sample", sorted(SAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(SAMPLES))
)
def test_samples_apply_cleanly(crds, sample) -> None:
    out = crds.kubectl("apply", "--dry-run=server", "-n", NS, "-f", str(sample), check=False)
    assert out.returncode == 0, out.stderr


def test_defaults_are_filled_in_by_the_apiserver(crds) -> None:
    out = crds.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(TIER))
    tier = json.loads(out.stdout)["spec"]
    assert tier["replicas"] == {"min": 1, "max": 8}
    assert tier["device"] == "cpu"
    assert tier["model"] == {
        "uri": "file:///m.onnx",
        "format": "onnx",
        "task": "text-generation",
        "port": 8080,
    }
    assert tier["scaling"] == {
        "metric": "inflight",
        "target": 4,
        "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": 120,
        "metricsUnavailableReplicas": 1,
        "tolerancePercent": 10,
    }
    out = crds.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-f", "-", input=yaml.safe_dump(ROUTER)
    )
    router = json.loads(out.stdout)["spec"]
    assert router["classifier"] == {
        "model": "builtin",
        "targetLargeSharePercent": 30,
        "followBudget": True,
        "calibrationWindow": 2000,
    }
    assert router["tiers"][0] == {
        "name": "small",
        "maxInflightPerEndpoint": 64,
        "timeoutSeconds": 60,
        "activationTimeoutSeconds": 5,
    }
    assert router["service"] == {"type": "ClusterIP", "port": 8080}
