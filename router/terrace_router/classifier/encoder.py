"""The sentence encoder the classifier reads prompts with: all-MiniLM-L6-v2 on onnxruntime.

    enc = SentenceEncoder.load("builtin")   # or a dir from `terrace-classifier export-encoder`
    enc.embed(["some prompt", ...])            # float32 [N, 384], unit length

A directory holds `model.onnx` (the BERT encoder, for the built-in its
first two of six layers, with mean pooling and L2 normalisation inside the
graph, int8 dynamic-quantised weights), the model's own `tokenizer.json`
(read with Hugging Face `tokenizers`) and `encoder.json` (where it came
from, its layers, dimension and token budget). encoder_export.py writes it;
torch is needed only there, never here.

At most `max_tokens` word pieces of a prompt are read (48 for the built-in,
~1.9 ms for one prompt on one core, see docs/classifier.md), of its head and
tail (features.encoder_text), so a megabyte prompt costs no more than a
short one.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .features import encoder_text

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "encoder.json"
BUILTIN = "builtin"


def builtin_encoder_dir() -> Path:
    return Path(str(resources.files("terrace_router.classifier") / "builtin" / "encoder"))


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort  # heavy import: only when a model is loaded

    opts = ort.SessionOptions()
    # One thread by default: the router runs beside other work on small
    # nodes, and a batch of prompts keeps one core busy on its own.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class SentenceEncoder:
    """Prompt -> unit-length embedding. Thread-safe (one onnxruntime session)."""

    def __init__(self, directory: Path, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        for name in (MODEL_FILE, TOKENIZER_FILE, INFO_FILE):
            if not (directory / name).is_file():
                raise ValueError(f"{directory}: not an encoder directory (needs {MODEL_FILE}, "
                                 f"{TOKENIZER_FILE} and {INFO_FILE})")
        self.directory = directory
        self.info = json.loads((directory / INFO_FILE).read_text(encoding="utf-8"))
        self.dim = int(self.info["dim"])
        self.max_tokens = int(self.info["max_tokens"])
        self._tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.no_padding()
        self._session = _session(directory / MODEL_FILE, threads)

    @classmethod
    def load(cls, name: str | Path = BUILTIN, threads: int = 1) -> SentenceEncoder:
        directory = builtin_encoder_dir() if str(name) == BUILTIN else Path(name)
        return cls(directory, threads)

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """float32 [N, dim] embeddings, each of unit length (cosine = dot product)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = [encoder_text(t) for t in texts[start:start + batch_size]]
            encodings = self._tokenizer.encode_batch(chunk)
            width = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for i, e in enumerate(encodings):
                ids[i, :len(e.ids)] = e.ids
                mask[i, :len(e.ids)] = 1
            out[start:start + len(chunk)] = self._session.run(
                None, {"input_ids": ids, "attention_mask": mask})[0]
        return out
