"""The routing table: what `terrace-router serve --config FILE` reads.

The operator renders a `TierRouter` and its `ModelTier`s into this shape and
stores it in a ConfigMap mounted into the router; `terrace-router serve
--tier name=url` builds the same object from flags. It is the one contract
between the control plane and the data plane, so both import this module.

Keys are camelCase (like the custom resources); the file is YAML or JSON.
Unlike a CRD spec, floats are fine here: this file is machine-written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TierConfig(_Model):
    """One tier, in cost order (the first is the cheapest)."""

    name: str = Field(min_length=1, max_length=253)
    endpoints: list[str] = Field(
        min_length=1, description="Base URLs, e.g. http://small.demo.svc:8080"
    )
    protocol: Literal["openai", "v2"] = "openai"
    # The model name sent upstream; None keeps what the client asked for
    # (or the tier name when the client asked for "auto").
    upstream_model: str | None = None
    max_inflight_per_endpoint: int = Field(default=64, ge=1)
    connect_timeout_seconds: float = Field(default=2.0, gt=0)
    read_timeout_seconds: float = Field(default=60.0, gt=0)
    # Passive health: an endpoint that fails this many times in a row is left
    # out for eject_seconds, then given one request to prove itself again.
    eject_after_failures: int = Field(default=3, ge=1)
    eject_seconds: float = Field(default=10.0, gt=0)
    # A tier that can sleep (zero replicas): how long a request waits for it
    # to wake when none of its endpoints answers, before escalating. 0: no wait.
    activation_timeout_seconds: float = Field(default=0.0, ge=0, le=600)
    # Where to ask for the tier to be woken while a request waits for it (the
    # operator's POST /wake/NAMESPACE/TIER); None: the demand metric wakes it.
    wake_url: str | None = None


class ClassifierConfig(_Model):
    # "builtin" is the classifier shipped inside the package; anything else is
    # a directory written by `terrace-classifier train --out DIR`.
    model: str = "builtin"


class CalibrationConfig(_Model):
    target_large_share: float = Field(default=0.3, ge=0.0, le=1.0)
    # The operator's budget-following cut-off (operator budget.py): while an
    # upper tier is power-capped or saturated, the share past the first tier
    # it can take; the calibrator aims at min(target, this). None: the target.
    effective_large_share: float | None = Field(default=None, ge=0.0, le=1.0)
    window: int = Field(default=2000, ge=10, description="Live scores the rolling quantile keeps")
    warmup: int = Field(
        default=50, ge=0, description="Scores before the live quantile replaces the shipped one"
    )
    # Fixed score thresholds, one per boundary between consecutive OpenAI
    # tiers (ascending): a score >= thresholds[i] goes past tier i. Setting
    # them turns the live calibration off (pinned routing, e.g. for tests).
    thresholds: list[float] | None = None

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, thresholds: list[float] | None) -> list[float] | None:
        pairs = zip(thresholds or [], (thresholds or [])[1:], strict=False)
        if any(b < a for a, b in pairs):
            raise ValueError("thresholds must be ascending")
        return thresholds

    @property
    def aim(self) -> float:
        """The share past the first tier the calibrator keeps: the target, or
        the operator's lower effective share while the budget binds."""
        if self.effective_large_share is None:
            return self.target_large_share
        return min(self.target_large_share, self.effective_large_share)


class EscalationConfig(_Model):
    on_low_confidence: bool = True
    on_error: bool = True
    on_overload: bool = True
    # Mean token logprob below which a cheap answer counts as unsure.
    min_mean_logprob: float = -2.5
    max_attempts: int = Field(default=3, ge=1)
    # When the chosen tier and every larger one fail or are saturated, try the
    # smaller tiers too (a weaker answer beats none). Never for low confidence.
    fallback_to_smaller: bool = True


class CacheConfig(_Model):
    enabled: bool = True
    ttl_seconds: int = Field(default=300, ge=0)
    max_entries: int = Field(default=10000, ge=0)
    # Cache answers to temperature > 0 requests too (off: they are meant to vary).
    include_non_deterministic: bool = False
    # Cache streamed answers too (replayed as the same SSE bytes on a hit).
    include_streaming: bool = False


class AuthConfig(_Model):
    # API keys, one a line; the operator mounts the TierRouter's Secret here.
    api_keys_file: str | None = None
    # Or a comma-separated list in this environment variable.
    api_keys_env: str | None = None


class RouterConfig(_Model):
    name: str = "auto"
    tiers: list[TierConfig] = Field(min_length=1)
    classifier: ClassifierConfig = ClassifierConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    escalation: EscalationConfig = EscalationConfig()
    cache: CacheConfig = CacheConfig()
    auth: AuthConfig = AuthConfig()
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # `service_tier: "flex"` requests go to the cheapest tier whose in-flight
    # requests are under this share of its capacity, and get a 429 when none
    # is (policy.decide_flex): they are shed before interactive work is.
    flex_max_load: float = Field(default=0.5, gt=0, le=1)
    # terrace-batch's base URL: /v1/files and /v1/batches are forwarded there
    # (batch/forward.py); None: those paths answer 404.
    batch_url: str | None = None

    @field_validator("tiers")
    @classmethod
    def _unique_tier_names(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        names = [t.name for t in tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique, repeated: {', '.join(dupes)}")
        return tiers

    @model_validator(mode="after")
    def _router_name_is_not_a_tier(self) -> RouterConfig:
        if any(t.name in (self.name, "auto") for t in self.tiers):
            raise ValueError(f"router name {self.name!r} (or 'auto') collides with a tier name")
        return self

    @model_validator(mode="after")
    def _one_threshold_per_boundary(self) -> RouterConfig:
        thresholds = self.calibration.thresholds
        n_openai = sum(1 for t in self.tiers if t.protocol == "openai")
        if thresholds is not None and len(thresholds) != max(n_openai - 1, 0):
            raise ValueError(
                f"calibration.thresholds needs {max(n_openai - 1, 0)} value(s), one per boundary "
                f"between the {n_openai} OpenAI tiers; got {len(thresholds)}"
            )
        return self

    def tier(self, name: str) -> TierConfig | None:
        return next((t for t in self.tiers if t.name == name), None)

    def dump(self) -> str:
        """Serialise as the YAML document the router reads."""
        return yaml.safe_dump(self.model_dump(by_alias=True, mode="json"), sort_keys=False)


def load(path: str | Path) -> RouterConfig:
    """Read a routing table file (YAML or JSON); raises ValueError on bad content."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return RouterConfig.model_validate(data)
