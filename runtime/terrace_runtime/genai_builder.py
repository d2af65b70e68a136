"""Runs onnxruntime-genai's model builder (``python -m
terrace_runtime.genai_builder <builder arguments>``) on configs written by
transformers 5.

transformers 5 keeps RoPE settings per attention type
(``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``)
and drops Gemma 3's ``rope_local_base_freq``; the builder (0.18) reads one
flat ``rope_parameters`` and ``rope_local_base_freq``. This wraps
``AutoConfig.from_pretrained`` so the builder sees the flat form, then runs
the builder's own command line unchanged. Configs already flat pass as they are.
"""

from __future__ import annotations

import runpy
from typing import Any


def flatten_rope(config: Any) -> Any:
    """Give `config` (a transformers config) the flat RoPE fields the builder reads."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        local = rope.get("sliding_attention") or rope["full_attention"]
        config.rope_local_base_freq = local.get("rope_theta")
        config.rope_parameters = dict(rope["full_attention"])
        config.rope_theta = rope["full_attention"].get("rope_theta")
    return config


def main() -> None:
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return flatten_rope(original(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
