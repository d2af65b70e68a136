"""`terrace-runtime convert`: a GGUF file or a Hugging Face folder into the
forms the runtime serves.

- ``torch``: a Hugging Face folder (``config.json``, fp32 ``model.safetensors``,
  ``tokenizer.json``, ``tokenizer_config.json``) that ``transformers`` loads.
  From a GGUF file, ``transformers`` dequantises the weights to fp32 and
  converts the GGUF vocabulary into a ``tokenizers`` tokenizer.
- ``onnx-int4`` / ``onnx-fp32``: an onnxruntime-genai model folder
  (``model.onnx``, ``genai_config.json``, the tokenizer files), made by
  onnxruntime-genai's model builder from the ``torch`` form.

Every output is written to a temporary folder and renamed into place, with a
``terrace-convert.json`` manifest (source SHA-256, form, library versions).
An output whose manifest matches the request is reused: converting twice
costs nothing. Costs measured on 2 cores for Gemma 3 270M (Q4_K_M GGUF,
253 MB): GGUF -> torch about 2 min and 3 GB RSS (1.1 GB on disk); torch ->
onnx-int4 about 2 min and 2.5 GB RSS (257 MB on disk).

Errors: `ConversionError` with a message naming the input and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from .uris import file_sha256

Form = Literal["torch", "onnx-int4", "onnx-fp32"]
FORMS: tuple[Form, ...] = ("torch", "onnx-int4", "onnx-fp32")
MANIFEST = "terrace-convert.json"
# The files of a tokenizer that the runtime reads from a served folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


class ConversionError(RuntimeError):
    """The input cannot be converted; the message says why."""


def source_digest(source: Path) -> str:
    """SHA-256 of a GGUF file, or of a folder's files (names and bytes, sorted)."""
    if source.is_file():
        return file_sha256(source)
    if not source.is_dir():
        raise ConversionError(f"{source}: no such file or folder")
    digest = hashlib.sha256()
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(str(path.relative_to(source)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("transformers", "torch", "onnxruntime-genai", "onnxruntime", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


# onnxruntime-genai model builder options for every ONNX form: prune_lm_head
# computes the vocabulary projection for the last prompt position only (the
# only one sampled), which halves prefill time for Gemma 3's 262k vocabulary.
BUILDER_OPTIONS = {"prune_lm_head": "true"}


def _manifest(source_sha: str, form: Form) -> dict[str, Any]:
    out: dict[str, Any] = {"source_sha256": source_sha, "form": form, "versions": _versions()}
    if form != "torch":
        out["builder_options"] = BUILDER_OPTIONS
    return out


def read_manifest(folder: Path) -> Mapping[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def convert(source: Path, form: Form, out: Path, *, work_dir: Path | None = None) -> Path:
    """Convert `source` (a ``.gguf`` file or a Hugging Face folder) into `form` at `out`.

    Returns `out`. Reuses `out` when its manifest names the same source
    SHA-256, form and library versions. Raises ConversionError.
    """
    if form not in FORMS:
        raise ConversionError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
    source = source.resolve()
    sha = source_digest(source)
    wanted = _manifest(sha, form)
    if read_manifest(out) == wanted:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; pods read it as another user
    try:
        if form == "torch":
            _to_torch(source, tmp)
        else:
            with tempfile.TemporaryDirectory(dir=work_dir or out.parent) as scratch:
                hf = source
                if source.is_file():
                    hf = Path(scratch) / "hf"
                    _to_torch(source, hf)
                _to_onnx(hf, tmp, precision=form.removeprefix("onnx-"), scratch=Path(scratch))
        (tmp / MANIFEST).write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _to_torch(source: Path, out: Path) -> None:
    """GGUF -> Hugging Face folder (fp32), or a Hugging Face folder re-saved."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConversionError(
            "converting needs transformers and torch (pip install 'terrace[llm]')"
        ) from exc
    if source.is_file():
        if source.suffix != ".gguf":
            raise ConversionError(f"{source}: expected a .gguf file or a Hugging Face folder")
        where, kwargs = source.parent, {"gguf_file": source.name}
    else:
        _check_hf_folder(source)
        where, kwargs = source, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(f"transformers cannot load {source}: {exc}") from exc
    # transformers dequantises GGUF weights on load but keeps the GGUF
    # "quantizer", which refuses to save: the weights are plain fp32 now.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _check_hf_folder(folder: Path) -> None:
    """A Hugging Face model folder has config.json and a tokenizer; say which is missing."""
    if not (folder / "config.json").exists():
        raise ConversionError(
            f"{folder} is not a Hugging Face model folder (no config.json); "
            "give a .gguf file or a folder written by save_pretrained"
        )
    if not (folder / "tokenizer.json").exists():
        raise ConversionError(f"{folder} has no tokenizer.json (save the tokenizer with it)")


def _to_onnx(hf: Path, out: Path, *, precision: str, scratch: Path) -> None:
    """Hugging Face folder -> onnxruntime-genai folder, by its model builder (a
    subprocess: the builder holds the whole fp32 model and more in memory)."""
    _check_hf_folder(hf)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise ConversionError(
            "converting to ONNX needs onnxruntime-genai (pip install 'terrace[llm]')"
        ) from exc
    command = [
        sys.executable,
        "-m",
        "terrace_runtime.genai_builder",
        "--input",
        str(hf),
        "--output",
        str(out),
        "--precision",
        precision,
        "--execution_provider",
        "cpu",
        "--cache_dir",
        str(scratch / "builder-cache"),
        "--extra_options",
        *(f"{k}={v}" for k, v in BUILDER_OPTIONS.items()),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0 or not (out / "genai_config.json").exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ConversionError(f"onnxruntime-genai's model builder failed on {hf}:\n{tail}")
    for name in TOKENIZER_FILES:
        if (hf / name).exists() and not (out / name).exists():
            shutil.copy2(hf / name, out / name)
