"""The classifier as the router runs it: feature extraction + one onnxruntime session."""

from __future__ import annotations

import json
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import training
from .features import FEATURE_NAMES, FEATURE_SPEC_VERSION, N_FEATURES, extract

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
FORMAT = "terrace-classifier"
FORMAT_VERSION = 1
BUILTIN = "builtin"


def builtin_dir() -> Path:
    return Path(str(resources.files("terrace_router.classifier") / "builtin"))


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort  # heavy import: only when a model is loaded

    opts = ort.SessionOptions()
    # One thread: the request path scores one prompt at a time, and a thread
    # pool's wake-up costs more than this model's arithmetic.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_bytes, sess_options=opts,
                                providers=["CPUExecutionProvider"])


class _ScoreBuffers:
    """One thread's input and output arrays for Classifier.score, bound once
    to an onnxruntime IOBinding: a call then only writes the features in
    place and runs, instead of building an input dict, a new array, and an
    output list each time (about 3 us of a ~5 us run)."""

    def __init__(self, session: Any, input_name: str, output_name: str) -> None:
        self.features = np.zeros((1, N_FEATURES), dtype=np.float32)
        self.score = np.zeros((1, 1), dtype=np.float32)
        self.binding = session.io_binding()
        # Bound by address: the arrays must live as long as the binding (they do:
        # both are attributes of this object).
        self.binding.bind_input(input_name, "cpu", 0, np.float32, list(self.features.shape),
                                self.features.ctypes.data)
        self.binding.bind_output(output_name, "cpu", 0, np.float32, list(self.score.shape),
                                 self.score.ctypes.data)


class Classifier:
    """Complexity score in [0, 1] per prompt; higher = needs a larger tier."""

    def __init__(self, model_bytes: bytes, metadata: dict, path: Path | None = None) -> None:
        check_metadata(metadata)
        self.metadata = metadata
        self.path = path
        self._session = _session(model_bytes)
        inputs = self._session.get_inputs()
        if len(inputs) != 1 or inputs[0].shape[-1] != N_FEATURES:
            raise ValueError(f"model input must be [N, {N_FEATURES}] features, got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self._input = inputs[0].name
        self._outputs = ["score"]
        self.default_threshold = float(metadata["default_threshold"])
        # Per thread: an IOBinding's buffers must not be shared by concurrent
        # calls (one session runs many bindings at once safely).
        self._buffers = threading.local()

    @classmethod
    def load(cls, model: str | Path = BUILTIN) -> Classifier:
        """`builtin` or a directory written by `terrace-classifier train --out DIR`."""
        directory = builtin_dir() if str(model) == BUILTIN else Path(model)
        onnx_path = directory / MODEL_FILE
        meta_path = directory / METADATA_FILE
        if not onnx_path.is_file() or not meta_path.is_file():
            raise ValueError(f"{directory}: not a classifier directory (needs {MODEL_FILE} "
                             f"and {METADATA_FILE})")
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls(onnx_path.read_bytes(), metadata, directory)

    def score(self, text: str) -> float:
        try:
            buffers = self._buffers.score
        except AttributeError:  # this thread's first call
            buffers = self._buffers.score = _ScoreBuffers(self._session, self._input,
                                                          self._outputs[0])
        # float64 -> float32 exactly as np.array(..., dtype=np.float32) would.
        buffers.features[0] = extract(text)
        self._session.run_with_iobinding(buffers.binding)
        return float(buffers.score[0, 0])

    def score_many(self, texts: list[str]) -> np.ndarray:
        """Scores of many prompts in one onnxruntime call (offline use: eval, CLI)."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        features = np.array([extract(t) for t in texts], dtype=np.float32)
        return self._session.run(self._outputs, {self._input: features})[0][:, 0]

    def score_threshold_for_share(self, share: float) -> float:
        """Threshold that sends `share` of the training distribution past tier 0."""
        return training.threshold_for_share(self.metadata["score_quantiles"], share)

    @property
    def feature_spec_version(self) -> int:
        return int(self.metadata["feature_spec"]["version"])


def check_metadata(metadata: dict) -> None:
    """Refuse a model built for other features: its weights would mean nothing."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} metadata file (format={metadata.get('format')!r})")
    spec = metadata.get("feature_spec") or {}
    if spec.get("version") != FEATURE_SPEC_VERSION or list(spec.get("names", [])) != list(
        FEATURE_NAMES
    ):
        raise ValueError(
            f"model was trained with feature spec version {spec.get('version')!r}; this code "
            f"extracts version {FEATURE_SPEC_VERSION}: retrain it with `terrace-classifier train`"
        )
    for key in ("default_threshold", "score_quantiles"):
        if key not in metadata:
            raise ValueError(f"classifier metadata lacks {key!r}")


def benchmark_score(texts: list[str], classifier: Classifier | None = None,
                    repeat: int = 3) -> dict:
    """Per-call latency of Classifier.score over `texts` (one thread), in microseconds."""
    clf = classifier or Classifier.load(BUILTIN)
    if not texts:
        raise ValueError("benchmark_score needs at least one text")
    for t in texts[:50]:  # warm caches and onnxruntime's first-run allocations
        clf.score(t)
    wall, cpu = [], []
    perf, thread = time.perf_counter_ns, time.thread_time_ns
    for _ in range(repeat):
        for t in texts:
            c0, w0 = thread(), perf()
            clf.score(t)
            w1, c1 = perf(), thread()
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
    w = np.array(wall, dtype=np.float64) / 1000.0
    c = np.array(cpu, dtype=np.float64) / 1000.0
    # Wall time is what a request waits; CPU time is the cost without
    # preemption (they differ on a busy machine).
    return {
        "calls": len(wall),
        "max_chars": max(len(t) for t in texts),
        "p50_us": float(np.percentile(w, 50)),
        "p90_us": float(np.percentile(w, 90)),
        "p99_us": float(np.percentile(w, 99)),
        "mean_us": float(w.mean()),
        "cpu_p50_us": float(np.percentile(c, 50)),
        "cpu_p99_us": float(np.percentile(c, 99)),
    }
