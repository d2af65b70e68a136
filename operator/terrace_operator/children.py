"""Desired children of a ModelTier or TierRouter, as plain dicts.

Pure functions from the typed spec (api.py) and the operator settings to the
Deployment, Service, PodDisruptionBudget, ConfigMap and (terrace-batch's)
PersistentVolumeClaim the operator applies with server-side apply. Nothing
here talks to Kubernetes; tiers.py and routers.py compare these with what is
there and converge.

Naming: a tier's Deployment, Service and PodDisruptionBudget are named after
the ModelTier; a router's Deployment and Service after the TierRouter, its
ConfigMap `<name>-routing`. The CRDs restrict both names to DNS-1035 labels
so they are always valid Service names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from urllib.parse import urlparse

from terrace_router.config import (
    AuthConfig,
    CacheConfig,
    CalibrationConfig,
    ClassifierConfig,
    EscalationConfig,
    RouterConfig,
    TierConfig,
)

from .api import API_VERSION, GROUP, ModelTierSpec, TierRef, TierRouterSpec
from .settings import OperatorSettings

MANAGER = "terrace-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_TIER = f"{GROUP}/modeltier"
LABEL_ROUTER = f"{GROUP}/tierrouter"
HASH_ANNOTATION = f"{GROUP}/desired-hash"

# Every tier Service listens here, whatever port the model server uses.
TIER_SERVICE_PORT = 8080
RUNTIME_PORT_NAME = "http"
ROUTER_CONTAINER_PORT = 8080
MODELS_MOUNT = "/mnt/models"
ROUTER_CONFIG_DIR = "/etc/terrace"
ROUTER_CONFIG_FILE = f"{ROUTER_CONFIG_DIR}/router.yaml"
ROUTER_CONFIG_KEY = "router.yaml"
ROUTER_AUTH_DIR = "/etc/terrace-auth"
ROUTER_AUTH_FILE = f"{ROUTER_AUTH_DIR}/api-keys"
ROUTER_CLASSIFIER_DIR = "/etc/terrace-classifier"
BATCH_PORT = 8090
BATCH_DATA_DIR = "/var/lib/terrace-batch"


@dataclass(frozen=True)
class Owner:
    """The custom resource whose children are being built."""

    kind: str  # ModelTier | TierRouter
    name: str
    namespace: str
    uid: str
    generation: int = 0

    @classmethod
    def from_body(cls, body: dict) -> Owner:
        meta = body["metadata"]
        return cls(
            kind=body["kind"],
            name=meta["name"],
            namespace=meta["namespace"],
            uid=meta["uid"],
            generation=int(meta.get("generation") or 0),
        )

    def reference(self) -> dict:
        # controller=true marks the one owner that manages the child;
        # blockOwnerDeletion lets foreground deletion wait for children.
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def is_controlled_by(child: dict, owner_uid: str) -> bool:
    """Whether `child` names the owner with this uid as its controller."""
    return any(
        ref.get("controller") and ref.get("uid") == owner_uid
        for ref in child.get("metadata", {}).get("ownerReferences") or []
    )


def controller_of(child: dict) -> tuple[str, str] | None:
    """(kind, name) of the Terrace resource controlling `child`, if any."""
    for ref in child.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and str(ref.get("apiVersion", "")).startswith(f"{GROUP}/"):
            return ref.get("kind"), ref.get("name")
    return None


def desired_hash(obj: dict) -> str:
    """A stable digest of a desired object, stored on it to spot spec changes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _finish(obj: dict) -> dict:
    """Stamp the digest of everything else onto the object's annotations."""
    digest = desired_hash(obj)
    obj["metadata"].setdefault("annotations", {})[HASH_ANNOTATION] = digest
    return obj


def _quantities(values: dict | None) -> dict[str, str]:
    # Quantities may be integers in the CR (x-kubernetes-int-or-string); pods want strings.
    return {k: str(v) for k, v in (values or {}).items()}


def endpoint(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc:{port}"


# ----------------------------------------------------------------- ModelTier


def tier_labels(name: str) -> dict[str, str]:
    return {
        LABEL_NAME: "terrace-runtime",
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: "model-tier",
        LABEL_PART_OF: "terrace",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_TIER: name,
    }


def tier_selector(name: str) -> dict[str, str]:
    # Immutable once the Deployment exists: never change these keys.
    return {LABEL_NAME: "terrace-runtime", LABEL_TIER: name}


def selector_string(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def tier_endpoint(name: str, namespace: str) -> str:
    return endpoint(name, namespace, TIER_SERVICE_PORT)


def _meta(owner: Owner, name: str, labels: dict[str, str]) -> dict:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(labels),
        "ownerReferences": [owner.reference()],
    }


def model_location(uri: str) -> tuple[str, dict | None]:
    """The URI the runtime reads, and the claim to mount for pvc:// URIs.

    pvc://CLAIM/PATH mounts the claim read-only at /mnt/models (as KServe
    does) and hands the runtime file:///mnt/models/PATH.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "pvc":
        return uri, None
    path = parsed.path.lstrip("/")
    local = f"file://{MODELS_MOUNT}/{path}" if path else f"file://{MODELS_MOUNT}"
    return local, {"claimName": parsed.netloc, "readOnly": True}


def _read_only_root(container: dict, volumes: list[dict]) -> None:
    """Run one of Terrace's own images (router, runtime) as its non-root user
    with a read-only root filesystem and a scratch emptyDir on /tmp (the
    images set HOME=/tmp and write no bytecode). Not for external images,
    whose users and writable paths are theirs to know."""
    volumes.append({"name": "tmp", "emptyDir": {}})
    container.setdefault("volumeMounts", []).append({"name": "tmp", "mountPath": "/tmp"})
    container["securityContext"] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _tolerations(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in t.items() if v is not None} for t in items]


def runtime_deployment(owner: Owner, spec: ModelTierSpec, settings: OperatorSettings) -> dict:
    """The tier's Deployment, without spec.replicas (the caller decides it)."""
    name = owner.name
    model = spec.model
    port = model.port
    volumes: list[dict] = []
    mounts: list[dict] = []
    probe_port: int | str = RUNTIME_PORT_NAME

    if model.format == "external":
        container: dict = {"name": "model", "image": model.image}
        if model.args:
            container["args"] = list(model.args)
        if model.health_path:
            ready_action = live_action = {
                "httpGet": {"path": model.health_path, "port": probe_port}
            }
        else:
            ready_action = live_action = {"tcpSocket": {"port": probe_port}}
    else:
        uri, claim = model_location(model.uri or "")
        if claim is not None:
            volumes.append({"name": "model-store", "persistentVolumeClaim": claim})
            mounts.append({"name": "model-store", "mountPath": MODELS_MOUNT, "readOnly": True})
        container = {
            "name": "model",
            "image": model.image or settings.runtime_image,
            "command": ["terrace-runtime"],
            "args": [
                "serve",
                "--model",
                uri,
                "--format",
                model.format,
                "--device",
                "cuda" if spec.device == "gpu" else "cpu",
                "--port",
                str(port),
                "--name",
                name,
            ],
        }
        ready_action = {"httpGet": {"path": "/v2/health/ready", "port": probe_port}}
        live_action = {"httpGet": {"path": "/v2/health/live", "port": probe_port}}

    container["imagePullPolicy"] = settings.image_pull_policy
    container["ports"] = [{"name": RUNTIME_PORT_NAME, "containerPort": port, "protocol": "TCP"}]
    if spec.env:
        container["env"] = [e.dump() for e in spec.env]
    resources: dict = {}
    if spec.resources and spec.resources.requests:
        resources["requests"] = _quantities(spec.resources.requests)
    limits = _quantities(spec.resources.limits if spec.resources else None)
    if spec.device == "gpu":
        limits[settings.gpu_resource_name] = str(spec.gpus or 1)
    if limits:
        resources["limits"] = limits
    if resources:
        container["resources"] = resources
    container["readinessProbe"] = {
        **ready_action,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    container["livenessProbe"] = {
        **live_action,
        "periodSeconds": 10,
        "timeoutSeconds": 2,
        "failureThreshold": 6,
    }
    # Large models take minutes to load: liveness starts only once this passes.
    container["startupProbe"] = {
        **live_action,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 120,
    }
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    if mounts:
        container["volumeMounts"] = mounts
    if model.format != "external":
        _read_only_root(container, volumes)

    node_selector: dict[str, str] = {}
    tolerations: list[dict] = []
    if spec.device == "gpu":
        node_selector.update(settings.gpu_node_selector)
        tolerations.extend(_tolerations(settings.gpu_tolerations))
    node_selector.update(spec.node_selector or {})
    tolerations.extend(t.dump() for t in spec.tolerations or [])

    pod_spec: dict = {
        "containers": [container],
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
    }
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if volumes:
        pod_spec["volumes"] = volumes

    labels = tier_labels(name)
    return _finish(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(owner, name, labels),
            "spec": {
                "selector": {"matchLabels": tier_selector(name)},
                "revisionHistoryLimit": 3,
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(port),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": pod_spec,
                },
            },
        }
    )


def tier_service(owner: Owner, spec: ModelTierSpec) -> dict:
    name = owner.name
    return _http_service(
        owner,
        tier_labels(name),
        tier_selector(name),
        "ClusterIP",
        TIER_SERVICE_PORT,
        RUNTIME_PORT_NAME,
    )


def _http_service(
    owner: Owner,
    labels: dict[str, str],
    selector: dict[str, str],
    type_: str,
    port: int,
    target_port: str,
    node_port: int | None = None,
    name: str | None = None,
) -> dict:
    """A Service with one TCP port named `http`, as tiers, routers and
    terrace-batch have; named after the owner unless `name` is given."""
    http = {"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}
    if node_port:
        http["nodePort"] = node_port
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(owner, name or owner.name, labels),
            "spec": {"type": type_, "selector": selector, "ports": [http]},
        }
    )


def tier_pdb(owner: Owner, spec: ModelTierSpec) -> dict:
    # maxUnavailable rather than minAvailable: a one-replica or scaled-to-zero
    # tier never blocks a node drain forever.
    name = owner.name
    return _finish(
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": _meta(owner, name, tier_labels(name)),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": tier_selector(name)}},
        }
    )


# ---------------------------------------------------------------- TierRouter


@dataclass(frozen=True)
class ResolvedTier:
    """A TierRouter's tier entry joined with the ModelTier it names."""

    name: str
    namespace: str
    spec: ModelTierSpec


def router_labels(name: str) -> dict[str, str]:
    return {
        LABEL_NAME: "terrace-router",
        LABEL_INSTANCE: name,
        LABEL_COMPONENT: "router",
        LABEL_PART_OF: "terrace",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_ROUTER: name,
    }


def router_selector(name: str) -> dict[str, str]:
    return {LABEL_NAME: "terrace-router", LABEL_ROUTER: name}


def router_configmap_name(name: str) -> str:
    return f"{name}-routing"


def render_router_config(
    spec: TierRouterSpec,
    tiers: list[ResolvedTier],
    wake_url: str | None = None,
    namespace: str = "",
    batch: str | None = None,
    large_share: float | None = None,
) -> RouterConfig:
    """The routing table for the router, in terrace_router.config's own model.

    `tiers` are the resolved ModelTiers in the TierRouter's order; entries
    whose ModelTier is missing are left out by the caller. With none at all,
    every tier the TierRouter names is listed at the Service address its
    ModelTier will have: requests get the router's 503 until one appears,
    and never reach a tier the router no longer names. `wake_url`: the
    operator's wake endpoint (OperatorSettings.wake_url), given to the tiers
    that scale to zero. `namespace`: the TierRouter's, for those addresses.
    `batch`: its terrace-batch's URL (batch_url), when spec.batch is set.
    `large_share`: the budget-following cut-off's share past the first tier
    when it is below the target (budget.py), else None.
    """
    refs = {t.name: t for t in spec.tiers}
    if not tiers:
        waiting = [_waiting_for(ref, namespace) for ref in spec.tiers]
        return _router_config(spec, waiting, batch, large_share)
    rendered = []
    for tier in tiers:
        ref = refs[tier.name]
        sleeps = tier.spec.replicas.min == 0
        rendered.append(
            TierConfig(
                name=tier.name,
                endpoints=[tier_endpoint(tier.name, tier.namespace)],
                protocol="v2" if tier.spec.model.task == "tensor" else "openai",
                upstream_model=ref.upstream_model or tier.spec.model.served_model_name,
                max_inflight_per_endpoint=ref.max_inflight_per_endpoint,
                read_timeout_seconds=float(ref.timeout_seconds),
                # Only a tier that can sleep is waited for, and woken.
                activation_timeout_seconds=float(ref.activation_timeout_seconds) if sleeps else 0.0,
                wake_url=(
                    f"{wake_url.rstrip('/')}/wake/{tier.namespace}/{tier.name}"
                    if sleeps and wake_url
                    else None
                ),
            )
        )
    return _router_config(spec, rendered, batch, large_share)


def _waiting_for(ref: TierRef, namespace: str) -> TierConfig:
    """A named tier with no ModelTier yet: its future Service, nothing else."""
    return TierConfig(
        name=ref.name,
        endpoints=[tier_endpoint(ref.name, namespace)],
        upstream_model=ref.upstream_model,
        read_timeout_seconds=float(ref.timeout_seconds),
    )


def _router_config(
    spec: TierRouterSpec,
    rendered: list[TierConfig],
    batch: str | None,
    large_share: float | None = None,
) -> RouterConfig:
    c = spec.classifier
    return RouterConfig(
        tiers=rendered,
        batch_url=batch,
        classifier=ClassifierConfig(model=ROUTER_CLASSIFIER_DIR if c.config_map_name else c.model),
        calibration=CalibrationConfig(
            target_large_share=c.target_large_share_percent / 100,
            effective_large_share=large_share,
            window=c.calibration_window,
        ),
        escalation=EscalationConfig(
            on_low_confidence=spec.escalation.on_low_confidence,
            on_error=spec.escalation.on_error,
            on_overload=spec.escalation.on_overload,
            max_attempts=spec.escalation.max_attempts,
            min_mean_logprob=float(spec.escalation.min_mean_logprob),
        ),
        cache=CacheConfig(
            enabled=spec.cache.enabled,
            ttl_seconds=spec.cache.ttl_seconds,
            max_entries=spec.cache.max_entries,
        ),
        auth=AuthConfig(api_keys_file=ROUTER_AUTH_FILE if spec.auth else None),
    )


def router_configmap(owner: Owner, config: RouterConfig) -> dict:
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(owner, router_configmap_name(owner.name), router_labels(owner.name)),
            "data": {ROUTER_CONFIG_KEY: config.dump()},
        }
    )


def _mount_api_keys(spec: TierRouterSpec, volumes: list[dict], mounts: list[dict]) -> bool:
    """The TierRouter's API-key Secret at ROUTER_AUTH_FILE; False without auth."""
    if not spec.auth:
        return False
    ref = spec.auth.api_key_secret_ref
    volumes.append(
        {
            "name": "api-keys",
            "secret": {"secretName": ref.name, "items": [{"key": ref.key, "path": "api-keys"}]},
        }
    )
    mounts.append({"name": "api-keys", "mountPath": ROUTER_AUTH_DIR, "readOnly": True})
    return True


def _scraped_deployment(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    selector: dict[str, str],
    replicas: int,
    container: dict,
    volumes: list[dict],
    metrics_port: int,
    strategy: dict | None = None,
) -> dict:
    """A Deployment of one container whose pods Prometheus scrapes on
    `metrics_port` (the router's and terrace-batch's)."""
    spec: dict = {
        "replicas": replicas,
        "selector": {"matchLabels": selector},
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels,
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(metrics_port),
                    "prometheus.io/path": "/metrics",
                },
            },
            "spec": {
                "containers": [container],
                "volumes": volumes,
                "enableServiceLinks": False,
                "automountServiceAccountToken": False,
            },
        },
    }
    if strategy is not None:
        spec["strategy"] = strategy
    return _finish(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(owner, name, labels),
            "spec": spec,
        }
    )


def router_deployment(owner: Owner, spec: TierRouterSpec, settings: OperatorSettings) -> dict:
    name = owner.name
    # The whole ConfigMap is mounted as a directory (no subPath) so the
    # kubelet swaps in new routing tables and the router hot-reloads them;
    # the pod template carries no config hash, so a table change restarts nothing.
    volumes: list[dict] = [{"name": "routing", "configMap": {"name": router_configmap_name(name)}}]
    mounts: list[dict] = [{"name": "routing", "mountPath": ROUTER_CONFIG_DIR, "readOnly": True}]
    _mount_api_keys(spec, volumes, mounts)
    if spec.classifier.config_map_name:
        volumes.append(
            {"name": "classifier", "configMap": {"name": spec.classifier.config_map_name}}
        )
        mounts.append({"name": "classifier", "mountPath": ROUTER_CLASSIFIER_DIR, "readOnly": True})

    container: dict = {
        "name": "router",
        "image": settings.router_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["terrace-router"],
        "args": ["serve", "--config", ROUTER_CONFIG_FILE, "--port", str(ROUTER_CONTAINER_PORT)],
        "ports": [{"name": "http", "containerPort": ROUTER_CONTAINER_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 6,
        },
        "volumeMounts": mounts,
    }
    _read_only_root(container, volumes)
    resources: dict = {}
    if spec.resources and spec.resources.requests:
        resources["requests"] = _quantities(spec.resources.requests)
    if spec.resources and spec.resources.limits:
        resources["limits"] = _quantities(spec.resources.limits)
    if resources:
        container["resources"] = resources

    # The router is not autoscaled, so the operator owns its replicas.
    return _scraped_deployment(
        owner, name, router_labels(name), router_selector(name), spec.replicas,
        container, volumes, ROUTER_CONTAINER_PORT,
    )  # fmt: skip


def router_service(owner: Owner, spec: TierRouterSpec) -> dict:
    name = owner.name
    return _http_service(
        owner,
        router_labels(name),
        router_selector(name),
        spec.service.type,
        spec.service.port,
        "http",
        spec.service.node_port,
    )


def router_endpoint(owner: Owner, spec: TierRouterSpec) -> str:
    return endpoint(owner.name, owner.namespace, spec.service.port)


# ------------------------------------------------------ TierRouter: batch


def batch_name(router: str) -> str:
    return f"{router}-batch"


def batch_labels(router: str) -> dict[str, str]:
    return {
        LABEL_NAME: "terrace-batch",
        LABEL_INSTANCE: batch_name(router),
        LABEL_COMPONENT: "batch",
        LABEL_PART_OF: "terrace",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_ROUTER: router,
    }


def batch_selector(router: str) -> dict[str, str]:
    return {LABEL_NAME: "terrace-batch", LABEL_ROUTER: router}


def batch_url(owner: Owner) -> str:
    """Where the router forwards /v1/files and /v1/batches."""
    return endpoint(batch_name(owner.name), owner.namespace, BATCH_PORT)


def batch_pvc(owner: Owner, spec: TierRouterSpec) -> dict | None:
    """The SQLite store's claim; None with a PostgreSQL store."""
    b = spec.batch
    if b is None or b.postgres_url_secret_ref is not None:
        return None
    claim: dict = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": b.storage}},
    }
    if b.storage_class_name:
        claim["storageClassName"] = b.storage_class_name
    return _finish(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(owner, batch_name(owner.name), batch_labels(owner.name)),
            "spec": claim,
        }
    )


def batch_deployment(
    owner: Owner, spec: TierRouterSpec, settings: OperatorSettings, replicas: int | None = None
) -> dict:
    """terrace-batch for a TierRouter with spec.batch: the Batch API on
    BATCH_PORT, lines sent to the router's Service with one of the router's
    own API keys (its keys file). `replicas` overrides spec.batch.replicas
    (0: spec.batch was removed; the store's claim stays)."""
    b = spec.batch
    name = batch_name(owner.name)
    router = f"http://{owner.name}.{owner.namespace}.svc:{spec.service.port}"
    args = ["--router", router, "--host", "0.0.0.0", "--port", str(BATCH_PORT)]
    env: list[dict] = []
    volumes: list[dict] = []
    mounts: list[dict] = []
    if b is not None:
        args += ["--slots", str(b.slots), "--max-window-seconds", str(b.max_window_hours * 3600)]
        prometheus = (b.signal.prometheus_url if b.signal else None) or settings.prometheus_url
        if prometheus:
            # Without spec.batch.signal, terrace-batch releases lines in the
            # cluster's low-demand hours (its demand as the signal).
            args += ["--prometheus", prometheus]
        if b.signal is not None:
            args += ["--signal", b.signal.query]
            if b.signal.threshold is not None:
                args += ["--threshold", b.signal.threshold]
            if b.signal.forecast_query is not None:
                args += ["--forecast", b.signal.forecast_query]
        if prometheus and settings.carbon_intensity_query:
            # Grams of CO2 per batch, with the operator's own intensity series.
            args += ["--carbon-query", settings.carbon_intensity_query]
        if b.postgres_url_secret_ref is not None:
            ref = b.postgres_url_secret_ref
            env.append(
                {
                    "name": "TERRACE_BATCH_STORE",
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
                }
            )
        else:
            args += ["--store", f"sqlite:///{BATCH_DATA_DIR}/batches.db"]
            volumes.append({"name": "store", "persistentVolumeClaim": {"claimName": name}})
            mounts.append({"name": "store", "mountPath": BATCH_DATA_DIR})
    if _mount_api_keys(spec, volumes, mounts):
        args += ["--api-keys-file", ROUTER_AUTH_FILE]
    container: dict = {
        "name": "batch",
        "image": settings.router_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["terrace-batch"],
        "args": args,
        "ports": [{"name": "http", "containerPort": BATCH_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if env:
        container["env"] = env
    sqlite = b is None or b.postgres_url_secret_ref is None
    return _scraped_deployment(
        owner,
        name,
        batch_labels(owner.name),
        batch_selector(owner.name),
        replicas if replicas is not None else (b.replicas if b else 0),
        container,
        volumes,
        BATCH_PORT,
        # One SQLite file on a ReadWriteOnce claim: never two pods at once.
        {"type": "Recreate"} if sqlite else {"type": "RollingUpdate"},
    )


def batch_service(owner: Owner) -> dict:
    return _http_service(
        owner,
        batch_labels(owner.name),
        batch_selector(owner.name),
        "ClusterIP",
        BATCH_PORT,
        "http",
        name=batch_name(owner.name),
    )
