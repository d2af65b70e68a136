"""Runtime settings: flags of `terrace-runtime serve`, each also settable as a
TERRACE_RUNTIME_* environment variable (flags win)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terrace" / "models"


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TERRACE_RUNTIME_", extra="ignore")

    model: str = Field(description="Model URI: path, file://, pvc://claim/path, http(s)://")
    format: Literal["onnx", "torch"]
    device: Literal["auto", "cpu", "cuda"] = "auto"
    task: Literal["auto", "tensor", "text-generation"] = "auto"
    name: str = ""
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    max_batch_size: int = Field(default=32, ge=1)
    max_wait_ms: float = Field(default=0.0, ge=0)
    max_queue: int = Field(default=256, ge=1)
    quantize: Literal["none", "int8"] = "none"
    threads: int | None = Field(default=None, ge=1)
    # onnxruntime pool threads sleep between ops (off by default here, unlike
    # onnxruntime): spinning shaves wake-ups off latency but burns the CPU
    # quota, and the watts, that an energy-aware tier exists to save.
    spinning: bool = False
    sha256: str | None = None
    cache_dir: Path = Field(default_factory=default_cache_dir)
    pvc_root: Path = Path("/mnt/models")
    energy_model: Literal["cpu", "none"] = "cpu"
    watts_per_core: float = Field(default=10.0, ge=0)
    max_tokens_limit: int = Field(default=4096, ge=1)
    # A Jinja chat template file for language-model folders, replacing the
    # model's own (vLLM's --chat-template); "qa" names the packaged
    # question-and-answer transcript for base models.
    chat_template: str | None = None
    log_level: str = "info"

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.quantize == "int8" and self.format != "onnx":
            raise ValueError("--quantize int8 applies to ONNX models only")
        if not self.name:
            # The model file's stem ("text-small" for .../text-small.onnx).
            tail = self.model.split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
            self.name = tail.split(".", 1)[0] or "model"
        return self

    def resolved_device(self) -> str:
        """ONNX defaults to CPU (the CPU tier); torch to CUDA when it is there."""
        if self.device != "auto":
            return self.device
        return "cpu" if self.format == "onnx" else "auto"
