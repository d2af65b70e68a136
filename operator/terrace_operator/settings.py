"""Operator settings: environment variables with the TERRACE_ prefix, then flags.

Every setting can come from the environment (what the Helm chart sets) and
most from a `terrace-operator` flag (what a developer types); flags win.
Lists and maps are JSON in the environment, except TERRACE_NAMESPACES which
is comma-separated.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .agent.protocol import DEFAULT_TTL_SECONDS

DEFAULT_IMAGE = "ghcr.io/terrace-dev/terrace:0.1.0"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TERRACE_", extra="ignore")

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch; empty watches all (cluster-wide).",
    )
    liveness_endpoint: str | None = Field(
        default="http://0.0.0.0:8081/healthz",
        description="kopf liveness probe URL to serve; empty disables it.",
    )
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = Field(
        default=8080, ge=0, le=65535, description="Prometheus /metrics port; unset disables it."
    )

    # High availability: replicas elect one leader through a Lease
    # (coordination.k8s.io) in `lease_namespace`; only the leader acts.
    leader_election: bool = Field(
        default=False, description="Elect a leader through a Lease before acting."
    )
    lease_name: str = "terrace-operator"
    lease_namespace: str | None = Field(
        default=None, description="Where the Lease lives; default: $POD_NAMESPACE or default."
    )
    lease_duration_seconds: float = Field(default=15.0, gt=0)
    renew_deadline_seconds: float = Field(default=10.0, gt=0)
    retry_period_seconds: float = Field(default=2.0, gt=0)

    # The control tick (tiers.py): Prometheus in, replicas and watts out.
    prometheus_url: str | None = Field(
        default=None, description="No URL: the tick only reports MetricsAvailable=False."
    )
    control_interval_seconds: float = Field(default=15.0, gt=0)
    prometheus_timeout_seconds: float = Field(default=5.0, gt=0)
    metrics_window: str = Field(default="1m", pattern=r"^[0-9]+(ms|s|m|h)$")
    gpu_metrics_source: Literal["agent", "dcgm"] = "agent"
    cpu_watts_per_busy_core: float = Field(default=350.0 / 56, gt=0)
    power_desired_ttl_seconds: float = Field(default=DEFAULT_TTL_SECONDS, gt=0)
    # The grid's carbon intensity now, in gCO2/kWh: PromQL with one value (an
    # exporter's gauge). Unset or no data: carbon figures are absent, never 0.
    carbon_intensity_query: str | None = None

    # The wake endpoint (wake.py), where routers wake a tier at zero
    # (POST /wake/NAMESPACE/TIER); no port: off.
    wake_host: str = "0.0.0.0"
    wake_port: int | None = Field(default=None, ge=0, le=65535)
    # How routers reach it, e.g. http://terrace-operator.NS.svc:8082; None:
    # routers do not wake sleeping tiers, they wait for the next tick.
    wake_url: str | None = None

    runtime_image: str = DEFAULT_IMAGE
    router_image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    # Where GPU tiers go: the label and taint GPU nodes carry.
    gpu_resource_name: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"terrace.dev/accelerator": "nvidia"}
    )
    gpu_tolerations: list[dict] = Field(
        default_factory=lambda: [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    )

    workers: int = Field(default=4, ge=1, le=64, description="Reconciles in parallel.")
    resync_seconds: float = Field(
        default=300.0, gt=0, description="Every object is reconciled at least this often."
    )
    request_timeout_seconds: float = Field(default=30.0, gt=0)
    log_level: str = "INFO"

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator(
        "liveness_endpoint",
        "prometheus_url",
        "lease_namespace",
        "carbon_intensity_query",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
