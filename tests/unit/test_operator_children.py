"""Desired children built from typed specs: the contracts other components rely on."""

from __future__ import annotations

import copy

import kubernetes_validate
import yaml
from terrace_operator import children as ch
from terrace_operator.api import ModelTierSpec, TierRouterSpec
from terrace_operator.settings import OperatorSettings
from terrace_router.config import RouterConfig

SETTINGS = OperatorSettings(
    runtime_image="example.org/terrace:test", router_image="example.org/router:test"
)
TIER = ch.Owner("ModelTier", "small-cpu", "demo", "uid-1", 3)
ROUTER = ch.Owner("TierRouter", "router", "demo", "uid-2", 1)
K8S = "1.36.0"


def tier(**spec) -> ModelTierSpec:
    base = {"model": {"uri": "file:///models/small.onnx"}}
    base.update(spec)
    return ModelTierSpec.model_validate(base)


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def valid(obj: dict) -> None:
    # The real Kubernetes OpenAPI schema (strict: no unknown fields).
    kubernetes_validate.validate(obj, K8S, strict=True)


def test_cpu_runtime_deployment_runs_terrace_runtime() -> None:
    dep = ch.runtime_deployment(TIER, tier(), SETTINGS)
    valid(dep)
    c = container(dep)
    assert c["image"] == "example.org/terrace:test"
    assert [*c["command"], *c["args"]] == [
        "terrace-runtime",
        "serve",
        "--model",
        "file:///models/small.onnx",
        "--format",
        "onnx",
        "--device",
        "cpu",
        "--port",
        "8080",
        "--name",
        "small-cpu",
    ]
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    pod = dep["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert "replicas" not in dep["spec"]  # decided by the controller, never by the builder
    assert dep["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "terrace.dev/v1alpha1",
            "kind": "ModelTier",
            "name": "small-cpu",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[ch.LABEL_MANAGED_BY] == "terrace-operator"


def test_gpu_tier_gets_a_gpu_limit_and_gpu_node_placement() -> None:
    spec = tier(
        device="gpu",
        gpus=2,
        model={"uri": "hf://org/model", "format": "torch"},
        resources={"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
        nodeSelector={"zone": "a"},
        tolerations=[{"key": "spot", "operator": "Exists"}],
    )
    dep = ch.runtime_deployment(TIER, spec, SETTINGS)
    valid(dep)
    c = container(dep)
    assert c["args"][c["args"].index("--device") + 1] == "cuda"
    assert c["args"][c["args"].index("--format") + 1] == "torch"
    assert c["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"memory": "16Gi", "nvidia.com/gpu": "2"},
    }
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"terrace.dev/accelerator": "nvidia", "zone": "a"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"},
    ]


def test_gpu_placement_comes_from_settings() -> None:
    settings = OperatorSettings(
        gpu_node_selector={"gpu": "h100"}, gpu_tolerations=[], gpu_resource_name="amd.com/gpu"
    )
    dep = ch.runtime_deployment(TIER, tier(device="gpu"), settings)
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and "tolerations" not in pod
    assert container(dep)["resources"]["limits"] == {"amd.com/gpu": "1"}


def test_external_image_runs_as_is() -> None:
    spec = tier(
        model={
            "format": "external",
            "image": "vllm/vllm-openai:v0.9",
            "port": 8000,
            "args": ["--model", "Qwen/Qwen2.5-0.5B"],
            "healthPath": "/health",
        }
    )
    dep = ch.runtime_deployment(TIER, spec, SETTINGS)
    valid(dep)
    c = container(dep)
    assert c["image"] == "vllm/vllm-openai:v0.9"
    assert "command" not in c and c["args"] == ["--model", "Qwen/Qwen2.5-0.5B"]
    assert c["ports"][0]["containerPort"] == 8000
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    no_health = ch.runtime_deployment(
        TIER, tier(model={"format": "external", "image": "x"}), SETTINGS
    )
    assert container(no_health)["readinessProbe"]["tcpSocket"] == {"port": "http"}


def test_terraces_own_images_run_non_root_on_a_read_only_root_external_ones_as_they_are() -> None:
    def hardened(dep: dict) -> bool:
        c = container(dep)
        sc = c["securityContext"]
        tmp = {"name": "tmp", "mountPath": "/tmp"} in c.get("volumeMounts", [])
        return sc.get("readOnlyRootFilesystem") is True and sc.get("runAsNonRoot") is True and tmp

    runtime = ch.runtime_deployment(TIER, tier(), SETTINGS)
    external = ch.runtime_deployment(
        TIER, tier(model={"format": "external", "image": "x"}), SETTINGS
    )
    router = ch.router_deployment(ROUTER, router_spec(), SETTINGS)
    for dep in (runtime, external, router):
        valid(dep)
    assert hardened(runtime) and hardened(router) and not hardened(external)
    assert container(external)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_pvc_uri_mounts_the_claim_read_only() -> None:
    dep = ch.runtime_deployment(TIER, tier(model={"uri": "pvc://models/tiny/model.onnx"}), SETTINGS)
    valid(dep)
    c = container(dep)
    assert c["args"][c["args"].index("--model") + 1] == "file:///mnt/models/tiny/model.onnx"
    assert c["volumeMounts"] == [
        {"name": "model-store", "mountPath": "/mnt/models", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    assert dep["spec"]["template"]["spec"]["volumes"] == [
        {"name": "model-store", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    assert ch.model_location("pvc://models") == (
        "file:///mnt/models",
        {"claimName": "models", "readOnly": True},
    )
    assert ch.model_location("s3://b/k") == ("s3://b/k", None)


def test_service_and_pdb_select_the_tier_pods() -> None:
    spec = tier()
    dep = ch.runtime_deployment(TIER, spec, SETTINGS)
    svc = ch.tier_service(TIER, spec)
    pdb = ch.tier_pdb(TIER, spec)
    valid(svc)
    valid(pdb)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert ch.tier_endpoint("small-cpu", "demo") == "http://small-cpu.demo.svc:8080"
    assert (
        ch.selector_string(ch.tier_selector("a"))
        == "app.kubernetes.io/name=terrace-runtime,terrace.dev/modeltier=a"
    )


def test_digest_tracks_the_spec() -> None:
    a = ch.runtime_deployment(TIER, tier(), SETTINGS)
    b = ch.runtime_deployment(TIER, tier(), SETTINGS)
    c = ch.runtime_deployment(TIER, tier(env=[{"name": "X", "value": "1"}]), SETTINGS)
    h = ch.HASH_ANNOTATION
    assert a["metadata"]["annotations"][h] == b["metadata"]["annotations"][h]
    assert a["metadata"]["annotations"][h] != c["metadata"]["annotations"][h]


def router_spec(**spec) -> TierRouterSpec:
    base = {"tiers": [{"name": "small-cpu"}, {"name": "large-gpu", "upstreamModel": "big"}]}
    base.update(spec)
    return TierRouterSpec.model_validate(base)


RESOLVED = [
    ch.ResolvedTier("small-cpu", "demo", tier()),
    ch.ResolvedTier(
        "large-gpu", "demo", tier(device="gpu", model={"uri": "file:///l.pt", "format": "torch"})
    ),
]


def test_router_table_is_terrace_router_config() -> None:
    spec = router_spec(
        classifier={"targetLargeSharePercent": 25, "calibrationWindow": 500},
        escalation={"onOverload": False, "maxAttempts": 2},
        cache={"enabled": False, "ttlSeconds": 5, "maxEntries": 7},
        auth={"apiKeySecretRef": {"name": "keys"}},
    )
    config = ch.render_router_config(spec, RESOLVED)
    cm = ch.router_configmap(ROUTER, config)
    valid(cm)
    assert cm["metadata"]["name"] == "router-routing"
    # What the router reads back is exactly what was rendered.
    loaded = RouterConfig.model_validate(yaml.safe_load(cm["data"]["router.yaml"]))
    assert loaded == config
    assert [(t.name, t.endpoints, t.protocol, t.upstream_model) for t in loaded.tiers] == [
        ("small-cpu", ["http://small-cpu.demo.svc:8080"], "openai", None),
        ("large-gpu", ["http://large-gpu.demo.svc:8080"], "openai", "big"),
    ]
    assert loaded.calibration.target_large_share == 0.25 and loaded.calibration.window == 500
    assert (loaded.escalation.on_overload, loaded.escalation.max_attempts) == (False, 2)
    assert (loaded.cache.enabled, loaded.cache.ttl_seconds, loaded.cache.max_entries) == (
        False,
        5,
        7,
    )
    assert loaded.auth.api_keys_file == "/etc/terrace-auth/api-keys"


def test_tensor_tiers_speak_v2_and_served_model_name_is_used() -> None:
    tensor = ch.ResolvedTier(
        "t", "demo", tier(model={"uri": "file:///m.onnx", "task": "tensor", "servedModelName": "m"})
    )
    config = ch.render_router_config(router_spec(tiers=[{"name": "t"}]), [tensor])
    assert (config.tiers[0].protocol, config.tiers[0].upstream_model) == ("v2", "m")
    assert config.auth.api_keys_file is None


def test_only_a_tier_that_can_sleep_is_waited_for() -> None:
    spec = router_spec(
        tiers=[{"name": "small-cpu", "activationTimeoutSeconds": 9}, {"name": "large-gpu"}]
    )
    sleepy = ch.ResolvedTier("small-cpu", "demo", tier(replicas={"min": 0, "max": 2}))
    awake = RESOLVED[1]
    config = ch.render_router_config(spec, [sleepy, awake])
    assert [t.activation_timeout_seconds for t in config.tiers] == [9.0, 0.0]
    # The default wait, a few seconds, for a tier at min 0 that names none.
    config = ch.render_router_config(router_spec(), [sleepy, awake])
    assert config.tiers[0].activation_timeout_seconds == 5.0
    assert [t.wake_url for t in config.tiers] == [None, None]  # no wake endpoint known
    # With the operator's wake endpoint, the sleeping tier (only) is woken there.
    config = ch.render_router_config(router_spec(), [sleepy, awake], "http://op.ns.svc:8082/")
    assert [t.wake_url for t in config.tiers] == [
        "http://op.ns.svc:8082/wake/demo/small-cpu",
        None,
    ]


def test_router_deployment_mounts_table_keys_and_classifier() -> None:
    spec = router_spec(
        auth={"apiKeySecretRef": {"name": "router-keys", "key": "k"}},
        classifier={"configMapName": "clf"},
        replicas=2,
        resources={"requests": {"cpu": "100m"}},
    )
    dep = ch.router_deployment(ROUTER, spec, SETTINGS)
    valid(dep)
    c = container(dep)
    assert [*c["command"], *c["args"]] == [
        "terrace-router",
        "serve",
        "--config",
        "/etc/terrace/router.yaml",
        "--port",
        "8080",
    ]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    # Whole-directory mounts (no subPath) so ConfigMap and Secret updates reach the pod.
    assert all("subPath" not in m for m in c["volumeMounts"])
    assert volumes["routing"]["configMap"] == {"name": "router-routing"}
    assert volumes["api-keys"]["secret"] == {
        "secretName": "router-keys",
        "items": [{"key": "k", "path": "api-keys"}],
    }
    assert volumes["classifier"]["configMap"] == {"name": "clf"}
    assert ch.render_router_config(spec, RESOLVED).classifier.model == "/etc/terrace-classifier"
    svc = ch.router_service(ROUTER, router_spec(service={"type": "NodePort", "port": 9000}))
    valid(svc)
    assert svc["spec"]["type"] == "NodePort" and svc["spec"]["ports"][0]["port"] == 9000
    assert (
        ch.router_endpoint(ROUTER, router_spec(service={"port": 9000}))
        == "http://router.demo.svc:9000"
    )


def test_longest_valid_names_build_valid_children() -> None:
    name = "a" * 63
    owner = ch.Owner("ModelTier", name, "demo", "u", 1)
    for obj in (
        ch.runtime_deployment(owner, tier(), SETTINGS),
        ch.tier_service(owner, tier()),
        ch.tier_pdb(owner, tier()),
    ):
        valid(obj)
    router = ch.Owner("TierRouter", name, "demo", "u", 1)
    many = router_spec(tiers=[{"name": f"t{i}"} for i in range(64)])
    resolved = [ch.ResolvedTier(f"t{i}", "demo", tier()) for i in range(64)]
    valid(ch.router_configmap(router, ch.render_router_config(many, resolved)))
    valid(ch.router_deployment(router, many, SETTINGS))


def test_controller_of_reads_owner_references() -> None:
    dep = ch.runtime_deployment(TIER, tier(), SETTINGS)
    assert ch.controller_of(dep) == ("ModelTier", "small-cpu")
    assert ch.is_controlled_by(dep, "uid-1") and not ch.is_controlled_by(dep, "other")
    foreign = copy.deepcopy(dep)
    foreign["metadata"]["ownerReferences"][0]["apiVersion"] = "apps/v1"
    assert ch.controller_of(foreign) is None
    foreign["metadata"].pop("ownerReferences")
    assert ch.controller_of(foreign) is None and not ch.is_controlled_by(foreign, "uid-1")


def test_a_router_with_none_of_its_tiers_lists_exactly_the_named_ones() -> None:
    """No ModelTier exists yet (or any more): the table names the router's
    tiers at their future Services, never a tier the router no longer names."""
    spec = TierRouterSpec.model_validate(
        {"tiers": [{"name": "ghost"}, {"name": "later", "upstreamModel": "m"}]}
    )
    config = ch.render_router_config(spec, [], None, "demo")
    assert [(t.name, t.endpoints, t.upstream_model) for t in config.tiers] == [
        ("ghost", ["http://ghost.demo.svc:8080"], None),
        ("later", ["http://later.demo.svc:8080"], "m"),
    ]
    assert all(t.wake_url is None and t.activation_timeout_seconds == 0 for t in config.tiers)


def test_a_router_with_batch_gets_terrace_batch_on_a_claim_and_forwards_to_it() -> None:
    spec = router_spec(
        auth={"apiKeySecretRef": {"name": "router-keys"}},
        batch={"signal": {"query": "grid_gco2", "threshold": "300",
                          "forecastQuery": "grid_gco2_forecast"}, "maxWindowHours": 48},  # fmt: skip
    )
    settings = OperatorSettings(
        prometheus_url="http://prom:9090", carbon_intensity_query="grid_intensity"
    )
    dep = ch.batch_deployment(ROUTER, spec, settings)
    valid(dep)
    c = container(dep)
    assert dep["metadata"]["name"] == "router-batch" and dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # one SQLite file, one pod
    assert c["command"] == ["terrace-batch"]
    args = dict(zip(c["args"][::2], c["args"][1::2], strict=True))
    assert args["--router"] == "http://router.demo.svc:8080"
    assert args["--store"] == "sqlite:////var/lib/terrace-batch/batches.db"
    assert args["--max-window-seconds"] == str(48 * 3600)
    assert (args["--signal"], args["--threshold"]) == ("grid_gco2", "300")
    assert args["--forecast"] == "grid_gco2_forecast"
    assert args["--prometheus"] == "http://prom:9090"  # the operator's, by default
    assert args["--carbon-query"] == "grid_intensity"  # the operator's, for CO2 per batch
    assert args["--api-keys-file"] == "/etc/terrace-auth/api-keys"  # clients' keys, and its own
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["store"]["persistentVolumeClaim"] == {"claimName": "router-batch"}
    # Not selected by the router's Service (nor the other way round).
    assert dep["spec"]["selector"]["matchLabels"] != ch.router_selector("router")
    pvc = ch.batch_pvc(ROUTER, spec)
    assert pvc is not None
    valid(pvc)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    svc = ch.batch_service(ROUTER)
    valid(svc)
    assert svc["metadata"]["name"] == "router-batch" and svc["spec"]["ports"][0]["port"] == 8090
    table = ch.render_router_config(spec, RESOLVED, None, "demo", ch.batch_url(ROUTER))
    assert table.batch_url == "http://router-batch.demo.svc:8090"
    assert ch.render_router_config(router_spec(), RESOLVED).batch_url is None


def test_a_postgres_store_needs_no_claim_and_may_run_replicas() -> None:
    spec = router_spec(batch={"replicas": 3, "postgresUrlSecretRef": {"name": "db"}})
    assert ch.batch_pvc(ROUTER, spec) is None
    dep = ch.batch_deployment(ROUTER, spec, SETTINGS)
    valid(dep)
    c = container(dep)
    assert dep["spec"]["replicas"] == 3 and "--store" not in c["args"]
    assert c["env"] == [
        {
            "name": "TERRACE_BATCH_STORE",
            "valueFrom": {"secretKeyRef": {"name": "db", "key": "url"}},
        }
    ]
    assert "volumes" not in dep["spec"]["template"]["spec"] or not any(
        "persistentVolumeClaim" in v for v in dep["spec"]["template"]["spec"]["volumes"]
    )
    # spec.batch removed: the operator scales it to zero and deletes nothing.
    assert ch.batch_deployment(ROUTER, router_spec(), SETTINGS, replicas=0)["spec"]["replicas"] == 0
