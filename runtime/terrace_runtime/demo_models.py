"""`terrace-runtime build-demo-models`: the models Terrace demos and tests serve.

Built here, never downloaded, deterministically (fixed seeds, deterministic
torch algorithms, a fixed corpus order):

- text-small.onnx   byte-level transformer LM (CPU tier, onnxruntime)
- text-large.pt2    a larger one, torch.export program (GPU tier, torch)
- tensor-mlp.onnx   an MLP classifier with a dynamic batch dim (OIP v2),
  tensor-mlp.pt     and the same weights as TorchScript

The text models are trained for a short while on Python's own standard
library docstrings, which every machine that runs this has. They are small
and write docstring-flavoured text; they exist to exercise real serving
(tokenization, batching, sampling, logprobs), not to be clever.

Text models take `input_ids` and `attention_mask` [batch, time] (left padded,
any time up to the context window) and return the next token's `logits`
[batch, vocab]: no KV cache, so batching decode steps is a plain stack.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .generation import ByteTokenizer
from .models import METADATA_KEY, TORCH_EXTRA_FILE

TOKENIZER = ByteTokenizer()
_SPACES = re.compile(r" {2,}")


@dataclass(frozen=True)
class LMConfig:
    d_model: int
    layers: int
    heads: int
    context: int
    steps: int
    batch: int
    lr: float = 3e-3


@dataclass(frozen=True)
class MLPConfig:
    features: int
    hidden: int
    classes: int
    steps: int


@dataclass(frozen=True)
class Plan:
    small: LMConfig
    large: LMConfig
    mlp: MLPConfig
    corpus_bytes: int


PRESETS = {
    # The real demo models: about a minute on two (shared) cores.
    "demo": Plan(
        small=LMConfig(d_model=64, layers=2, heads=4, context=64, steps=200, batch=24, lr=1e-2),
        large=LMConfig(d_model=128, layers=4, heads=4, context=128, steps=100, batch=12, lr=4e-3),
        mlp=MLPConfig(features=256, hidden=2048, classes=16, steps=40),
        corpus_bytes=400_000,
    ),
    # Same code paths, tiny sizes: what the unit tests build.
    "tiny": Plan(
        small=LMConfig(d_model=32, layers=1, heads=2, context=32, steps=20, batch=8),
        large=LMConfig(d_model=48, layers=2, heads=2, context=48, steps=10, batch=8),
        mlp=MLPConfig(features=32, hidden=64, classes=4, steps=10),
        corpus_bytes=60_000,
    ),
}


# --- corpus -------------------------------------------------------------


def stdlib_corpus(limit_bytes: int) -> bytes:
    """Docstrings of the standard library's top-level modules, in file-name order,
    each wrapped as BOS text EOS (EOS as a NUL byte here, mapped later)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    # Runs of spaces (aligned tables, indented examples) would
                    # teach a tiny model little but to print spaces.
                    data = _SPACES.sub(" ", doc).encode("utf-8")
                    chunks.append(data)
                    total += len(data)
                    if total >= limit_bytes:
                        return b"\x00".join(chunks)
    if not chunks:
        raise RuntimeError(f"no docstrings found under {root}")
    return b"\x00".join(chunks)


def corpus_tokens(corpus: bytes) -> np.ndarray:
    """BOS doc EOS BOS doc EOS ... as token ids."""
    tokens: list[int] = []
    for doc in corpus.split(b"\x00"):
        tokens.append(TOKENIZER.bos_id)
        tokens.extend(doc)
        tokens.append(TOKENIZER.eos_id)
    return np.asarray(tokens, dtype=np.int64)


# --- models (torch is imported lazily: the runtime itself needs it only for .pt) --


def _torch_modules() -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.norm2 = nn.LayerNorm(d)
            self.ff1 = nn.Linear(d, 4 * d)
            self.ff2 = nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            h = self.heads
            q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
            q = q.reshape(b, t, h, d // h).transpose(1, 2)
            k = k.reshape(b, t, h, d // h).transpose(1, 2)
            v = v.reshape(b, t, h, d // h).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(2, 3)) * (1.0 / float(d // h) ** 0.5) + bias
            att = torch.matmul(torch.softmax(scores, dim=-1), v)
            x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
            return x + self.ff2(torch.nn.functional.gelu(self.ff1(self.norm2(x))))

    class ByteLM(nn.Module):
        def __init__(self, vocab: int, cfg: LMConfig) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, cfg.d_model)
            self.pos = nn.Embedding(cfg.context, cfg.d_model)
            self.blocks = nn.ModuleList([Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers)])
            self.norm = nn.LayerNorm(cfg.d_model)
            self.head = nn.Linear(cfg.d_model, vocab)

        def hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # Positions count real tokens only, so left padding does not shift them.
            positions = (torch.cumsum(mask, dim=1) - 1).clamp(min=0)
            x = self.embed(ids) + self.pos(positions)
            # Masks are built from the inputs (no tensors created on a fixed
            # device), so an exported program runs on whatever device it is moved to.
            index = torch.cumsum(torch.ones_like(mask), dim=1)
            causal = index.unsqueeze(1) <= index.unsqueeze(2)  # [batch, query, key]
            real = mask > 0
            # Real queries see real keys up to themselves; padding queries (whose
            # output is discarded) see anything causal, so no row is all -inf.
            allowed = causal & (real.unsqueeze(1) | ~real.unsqueeze(2))
            bias = ((~allowed).to(x.dtype) * -1e9).unsqueeze(1)
            for block in self.blocks:
                x = block(x, bias)
            return self.norm(x)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.head(self.hidden(input_ids, attention_mask)[:, -1, :])

        def all_logits(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.hidden(ids, torch.ones_like(ids)))

    class MLP(nn.Module):
        def __init__(self, cfg: MLPConfig) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(cfg.features, cfg.hidden),
                nn.ReLU(),
                nn.Linear(cfg.hidden, cfg.hidden),
                nn.ReLU(),
                nn.Linear(cfg.hidden, cfg.classes),
            )

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probabilities = torch.softmax(self.net(x), dim=-1)
            return probabilities, torch.argmax(probabilities, dim=-1)

    return torch, ByteLM, MLP


def _seed(torch: Any, seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_lm(cfg: LMConfig, tokens: np.ndarray, seed: int) -> tuple[Any, float]:
    torch, ByteLM, _ = _torch_modules()
    _seed(torch, seed)
    model = ByteLM(TOKENIZER.vocab_size, cfg)
    data = torch.from_numpy(tokens)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps)
    loss_value = float("nan")
    model.train()
    for _ in range(cfg.steps):
        starts = rng.integers(0, len(tokens) - cfg.context - 1, size=cfg.batch)
        window = torch.stack([data[s : s + cfg.context + 1] for s in starts])
        logits = model.all_logits(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
    model.eval()
    return model, loss_value


def train_mlp(cfg: MLPConfig, seed: int) -> Any:
    """Gaussian blobs, one per class: enough that the outputs mean something."""
    torch, _, MLP = _torch_modules()
    _seed(torch, seed)
    model = MLP(cfg)
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(cfg.classes, cfg.features, generator=gen) * 2
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(cfg.steps):
        labels = torch.randint(0, cfg.classes, (64,), generator=gen)
        x = centers[labels] + torch.randn(64, cfg.features, generator=gen)
        loss = torch.nn.functional.cross_entropy(model.net(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


# --- export -------------------------------------------------------------


def lm_metadata(cfg: LMConfig, vocab: int) -> dict[str, Any]:
    return {
        "task": "text-generation",
        "context_length": cfg.context,
        "vocab_size": vocab,
        "tokenizer": TOKENIZER.to_metadata(),
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, vocab]}],
        "architecture": {"type": "byte-transformer", **asdict(cfg)},
    }


def mlp_metadata(cfg: MLPConfig) -> dict[str, Any]:
    return {
        "task": "tensor",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, cfg.features]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, cfg.classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "architecture": {"type": "mlp", **asdict(cfg)},
    }


def export_onnx(model: Any, example: tuple[Any, ...], path: Path, meta: dict[str, Any]) -> None:
    import onnx
    import torch

    names_in = [s["name"] for s in meta["inputs"]]
    names_out = [s["name"] for s in meta["outputs"]]
    dynamic: dict[str, dict[int, str]] = {}
    for spec in (*meta["inputs"], *meta["outputs"]):
        dynamic[spec["name"]] = {
            i: ("batch" if i == 0 else f"{spec['name']}_d{i}")
            for i, d in enumerate(spec["shape"])
            if d == -1
        }
    for spec in meta["inputs"]:
        if len(spec["shape"]) > 1 and spec["shape"][1] == -1:
            dynamic[spec["name"]][1] = "time"  # input_ids and attention_mask share it
    raw_path = path.with_name(path.name + ".raw")
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example,
            str(raw_path),
            dynamo=False,
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            opset_version=17,
        )
    proto = onnx.load(str(raw_path))
    raw_path.unlink()
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    proto.producer_name = "terrace-runtime build-demo-models"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_torchscript(
    model: Any, example: tuple[Any, ...], path: Path, meta: dict[str, Any]
) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated; still widely deployed
        scripted = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(scripted, str(path), _extra_files={TORCH_EXTRA_FILE: json.dumps(meta)})


def export_program(model: Any, example: tuple[Any, ...], path: Path, meta: dict[str, Any]) -> None:
    """torch.export with a dynamic batch and time dimension (time up to the context)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    steps = torch.export.Dim("time", min=1, max=meta["context_length"])
    dims = {"input_ids": {0: batch, 1: steps}, "attention_mask": {0: batch, 1: steps}}
    program = torch.export.export(model, example, dynamic_shapes=dims)
    torch.export.save(program, str(path), extra_files={TORCH_EXTRA_FILE: json.dumps(meta)})


def _lm_examples(torch: Any, context: int) -> tuple[Any, Any]:
    """A left-padded batch with two lengths, so the export sees padding."""
    ids = torch.full((2, context), TOKENIZER.pad_id, dtype=torch.int64)
    mask = torch.zeros((2, context), dtype=torch.int64)
    ids[0, :] = torch.arange(context) % 200 + 32
    mask[0, :] = 1
    ids[1, context // 2 :] = torch.arange(context - context // 2) % 90 + 32
    mask[1, context // 2 :] = 1
    return ids, mask


def _check_same(a: np.ndarray, b: np.ndarray, what: str) -> float:
    diff = float(np.max(np.abs(a - b)))
    if diff > 1e-3:
        raise RuntimeError(f"{what}: exported model differs from torch by {diff}")
    return diff


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_demo_models(
    out: Path, preset: str = "demo", seed: int = 0, log: Any = print
) -> dict[str, Any]:
    """Train and export every demo model into `out`; returns the manifest."""
    import onnxruntime as ort

    plan = PRESETS[preset]
    torch, _, _ = _torch_modules()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "preset": preset,
        "seed": seed,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "models": {},
    }

    t0 = time.perf_counter()
    corpus = stdlib_corpus(plan.corpus_bytes)
    tokens = corpus_tokens(corpus)
    log(
        f"corpus: {len(corpus)} bytes of standard-library docstrings "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    (out / "tokenizer.json").write_text(json.dumps(TOKENIZER.to_metadata(), indent=2) + "\n")

    def record(name: str, path: Path, seconds: float, **extra: Any) -> None:
        size = path.stat().st_size
        manifest["models"][name] = {
            "file": path.name,
            "bytes": size,
            "sha256": sha256_of(path),
            "seconds": round(seconds, 2),
            **extra,
        }
        log(
            f"{name:12s} {path.name:18s} {size / 1e6:8.2f} MB  {seconds:6.1f}s  "
            + "  ".join(f"{k}={v}" for k, v in extra.items())
        )

    # Small LM -> ONNX (CPU tier).
    t0 = time.perf_counter()
    small, small_loss = train_lm(plan.small, tokens, seed)
    path = out / "text-small.onnx"
    meta = lm_metadata(plan.small, TOKENIZER.vocab_size)
    example = _lm_examples(torch, plan.small.context)
    export_onnx(small, example, path, meta)
    with torch.no_grad():
        expected = small(*example).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(
        ["logits"], {"input_ids": example[0].numpy(), "attention_mask": example[1].numpy()}
    )[0]
    diff = _check_same(expected, got, "text-small.onnx")
    record(
        "text-small",
        path,
        time.perf_counter() - t0,
        params=_params(small),
        loss=round(small_loss, 3),
        max_abs_diff=f"{diff:.1e}",
    )

    # Large LM -> TorchScript (GPU tier).
    t0 = time.perf_counter()
    large, large_loss = train_lm(plan.large, tokens, seed + 1)
    path = out / "text-large.pt2"
    example = _lm_examples(torch, plan.large.context)
    export_program(large, example, path, lm_metadata(plan.large, TOKENIZER.vocab_size))
    reloaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        short = (example[0][:, -5:], example[1][:, -5:])  # a different length than traced
        diff = _check_same(large(*short).numpy(), reloaded(*short).numpy(), "text-large.pt2")
    record(
        "text-large",
        path,
        time.perf_counter() - t0,
        params=_params(large),
        loss=round(large_loss, 3),
        max_abs_diff=f"{diff:.1e}",
    )

    # Tensor model -> ONNX and TorchScript (OIP v2).
    t0 = time.perf_counter()
    mlp = train_mlp(plan.mlp, seed + 2)
    meta = mlp_metadata(plan.mlp)
    example_x = (torch.randn(3, plan.mlp.features, generator=torch.Generator().manual_seed(seed)),)
    export_onnx(mlp, example_x, out / "tensor-mlp.onnx", meta)
    export_torchscript(mlp, example_x, out / "tensor-mlp.pt", meta)
    record("tensor-mlp", out / "tensor-mlp.onnx", time.perf_counter() - t0, params=_params(mlp))
    record("tensor-mlp-ts", out / "tensor-mlp.pt", 0.0, params=_params(mlp))

    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"built in {manifest['seconds']}s -> {out}")
    return manifest


def _params(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))
