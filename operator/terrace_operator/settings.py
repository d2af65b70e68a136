"""Operator settings: environment variables with the TERRACE_ prefix, then flags.

Every setting can come from the environment (what the Helm chart sets) and
most from a `terrace-operator` flag (what a developer types); flags win.
Lists and maps are JSON in the environment, except TERRACE_NAMESPACES which
is comma-separated.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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

    # kopf peering. With one operator replica and `strategy: Recreate` (the
    # chart's Deployment) two operators never overlap, so kopf's docs advise
    # --standalone: no peering objects, no extra RBAC. Name a peering object
    # to run several replicas with priorities instead.
    peering_name: str | None = None
    priority: int = 0

    # How routers reach this operator's wake endpoint (control.ControlSettings
    # serves it on TERRACE_WAKE_PORT), e.g. http://terrace-operator.NS.svc:8082;
    # None: routers do not wake sleeping tiers, they wait for the next tick.
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

    @field_validator("liveness_endpoint", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
