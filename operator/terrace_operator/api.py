"""Typed views of the ModelTier and TierRouter custom resources.

The CRD YAML in `crds/` is the source of truth; these models mirror it field
for field (same camelCase names, same defaults), and
tests/unit/test_crd_models.py walks both schemas so neither drifts. The
apiserver has already validated and defaulted what the operator reads, so the
models only add types; they ignore unknown keys so a newer CRD never crashes
an older operator.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "terrace.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Quantity = int | str


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def dump(self) -> dict:
        """The object as the apiserver would hold it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------- ModelTier


class ModelSource(_Model):
    uri: str | None = None
    format: Literal["onnx", "torch", "external"] = "onnx"
    task: Literal["text-generation", "tensor"] = "text-generation"
    image: str | None = None
    args: list[str] | None = None
    port: int = Field(default=8080, ge=1, le=65535)
    health_path: str | None = None
    served_model_name: str | None = None


class ResourceRequirements(_Model):
    requests: dict[str, Quantity] | None = None
    limits: dict[str, Quantity] | None = None


class EnvVar(_Model):
    name: str
    value: str | None = None


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Replicas(_Model):
    min: int = Field(default=1, ge=0, le=1000)
    max: int = Field(default=8, ge=1, le=1000)
    # Written through the scale subresource (kubectl scale, HPA, KEDA).
    count: int | None = Field(default=None, ge=0)

    def clamp(self, n: int) -> int:
        return max(self.min, min(self.max, n))


class Scaling(_Model):
    metric: Literal["inflight", "rps", "latencyP95", "gpuUtilization", "custom"] = "inflight"
    target: int = Field(default=4, ge=1)
    query: str | None = None
    scale_up_stabilization_seconds: int = Field(default=0, ge=0, le=3600)
    scale_down_stabilization_seconds: int = Field(default=120, ge=0, le=86400)
    metrics_unavailable_replicas: int = Field(default=1, ge=0, le=1000)
    latency_target_milliseconds: int | None = Field(default=None, ge=1)
    tolerance_percent: int = Field(default=10, ge=0, le=100)


class PowerWindow(_Model):
    schedule: str
    duration_minutes: int | None = Field(default=None, ge=1, le=10080)
    max_watts: int = Field(ge=1, le=5000)


class Power(_Model):
    policy: Literal["adaptive", "fixed", "off"] = "adaptive"
    min_watts: int | None = Field(default=None, ge=1, le=5000)
    max_watts: int | None = Field(default=None, ge=1, le=5000)
    windows: list[PowerWindow] | None = None


class ModelTierSpec(_Model):
    model: ModelSource
    device: Literal["cpu", "gpu"] = "cpu"
    gpus: int | None = Field(default=None, ge=1, le=16)
    resources: ResourceRequirements | None = None
    env: list[EnvVar] | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    replicas: Replicas = Replicas()
    scaling: Scaling = Scaling()
    power: Power | None = None


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: str
    reason: str
    message: str


class ScalingEvent(_Model):
    time: str | None = None
    from_: int | None = Field(default=None, alias="from")
    to: int | None = None
    reason: str | None = None


class ModelTierStatus(_Model):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    selector: str | None = None
    endpoint: str | None = None
    power_limit_watts: int | None = None
    desired_power_limit_watts: int | None = None
    energy_per_request_joules: str | None = None
    energy_per_token_joules: str | None = None
    carbon_per_request_grams: str | None = None
    carbon_per_1k_tokens_grams: str | None = Field(default=None, alias="carbonPer1kTokensGrams")
    demand_requests_per_second: str | None = None
    capacity_requests_per_second: str | None = None
    last_scaling: list[ScalingEvent] | None = None
    conditions: list[Condition] | None = None


# --------------------------------------------------------------- TierRouter


class TierRef(_Model):
    name: str = Field(min_length=1, max_length=63)
    upstream_model: str | None = None
    max_inflight_per_endpoint: int = Field(default=64, ge=1, le=100000)
    timeout_seconds: int = Field(default=60, ge=1, le=3600)
    activation_timeout_seconds: int = Field(default=5, ge=0, le=600)


class Classifier(_Model):
    model: str = "builtin"
    config_map_name: str | None = None
    target_large_share_percent: int = Field(default=30, ge=0, le=100)
    calibration_window: int = Field(default=2000, ge=10, le=1000000)
    # Lower the share past the first tier while an upper tier is power-capped
    # or saturated (budget.py); false keeps the target whatever the budget.
    follow_budget: bool = True


class Escalation(_Model):
    on_low_confidence: bool = True
    on_error: bool = True
    on_overload: bool = True
    max_attempts: int = Field(default=3, ge=1, le=10)
    # A decimal as a string: no floats in spec.
    min_mean_logprob: str = Field(default="-2.5", pattern=r"^-[0-9]+(\.[0-9]+)?$")


class Cache(_Model):
    enabled: bool = True
    ttl_seconds: int = Field(default=300, ge=0, le=604800)
    max_entries: int = Field(default=10000, ge=0, le=10000000)


class SecretKeyRef(_Model):
    name: str
    key: str = "keys"


class Auth(_Model):
    api_key_secret_ref: SecretKeyRef


class RouterService(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=8080, ge=1, le=65535)
    node_port: int | None = Field(default=None, ge=30000, le=32767)


class BatchSignal(_Model):
    query: str = Field(min_length=1, max_length=4096)
    threshold: str | None = Field(default=None, pattern=r"^-?[0-9]+(\.[0-9]+)?$")
    forecast_query: str | None = Field(default=None, min_length=1, max_length=4096)
    prometheus_url: str | None = None


class UrlSecretRef(_Model):
    name: str
    key: str = "url"


class Batch(_Model):
    replicas: int = Field(default=1, ge=0, le=20)
    storage: str = "1Gi"
    storage_class_name: str | None = None
    postgres_url_secret_ref: UrlSecretRef | None = None
    slots: int = Field(default=8, ge=1, le=1024)
    max_window_hours: int = Field(default=72, ge=1, le=720)
    signal: BatchSignal | None = None


class TierRouterSpec(_Model):
    tiers: list[TierRef] = Field(min_length=1, max_length=64)
    classifier: Classifier = Classifier()
    escalation: Escalation = Escalation()
    cache: Cache = Cache()
    auth: Auth | None = None
    batch: Batch | None = None
    service: RouterService = RouterService()
    replicas: int = Field(default=1, ge=0, le=100)
    resources: ResourceRequirements | None = None


class RouterTierStatus(_Model):
    name: str | None = None
    endpoint: str | None = None
    found: bool | None = None
    ready: bool | None = None


class TierRouterStatus(_Model):
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    endpoint: str | None = None
    tier_count: int | None = None
    tiers: list[RouterTierStatus] | None = None
    config_hash: str | None = None
    effective_large_share_percent: int | None = None
    conditions: list[Condition] | None = None
