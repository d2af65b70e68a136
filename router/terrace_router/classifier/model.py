"""The classifier as the router runs it: shape features, a sentence encoder, one formula.

A classifier directory holds `metadata.json` (weights, prior, ranges,
quantiles, metrics, provenance), `support.npy` (float16 [S, D] embeddings
of a sample of the training prompts) and names its encoder: "builtin" (the
all-MiniLM-L6-v2 encoder shipped in this package) or a directory beside it.
A directory written by `terrace-classifier train` is under 1 MiB with the
built-in encoder, so it fits in a ConfigMap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from . import training
from .encoder import SentenceEncoder
from .features import FEATURE_NAMES, FEATURE_SPEC_VERSION, N_LEARNED, extract

METADATA_FILE = "metadata.json"
SUPPORT_FILE = "support.npy"
FORMAT = "terrace-classifier"
FORMAT_VERSION = 2
BUILTIN = "builtin"


def builtin_dir() -> Path:
    return Path(str(resources.files("terrace_router.classifier") / "builtin"))


def encoder_for(directory: Path, name: str) -> SentenceEncoder:
    """The encoder a classifier directory names: "builtin" or a path relative to it."""
    if name == BUILTIN:
        return SentenceEncoder.load(BUILTIN)
    return SentenceEncoder.load(directory / name)


class Classifier:
    """Complexity score in [0, 1] per prompt; higher = needs a larger tier."""

    def __init__(self, model: training.ScoreModel, metadata: dict, encoder: SentenceEncoder,
                 path: Path | None = None) -> None:
        check_metadata(metadata)
        if encoder.dim != model.support.shape[1]:
            raise ValueError(f"encoder gives {encoder.dim}-d embeddings, the model was trained "
                             f"on {model.support.shape[1]}-d ones")
        self.model = model
        self.metadata = metadata
        self.encoder = encoder
        self.path = path
        self.default_threshold = float(metadata["default_threshold"])

    @classmethod
    def load(cls, model: str | Path = BUILTIN) -> Classifier:
        """`builtin` or a directory written by `terrace-classifier train --out DIR`."""
        directory = builtin_dir() if str(model) == BUILTIN else Path(model)
        meta_path = directory / METADATA_FILE
        support_path = directory / SUPPORT_FILE
        if not meta_path.is_file() or not support_path.is_file():
            raise ValueError(f"{directory}: not a classifier directory (needs {METADATA_FILE} "
                             f"and {SUPPORT_FILE})")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(metadata, dict):
                raise ValueError("not a JSON object")
            check_metadata(metadata)
            score_model = model_from_metadata(metadata, np.load(support_path,
                                                                allow_pickle=False))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            detail = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ValueError(f"{directory}: not a valid classifier ({detail}); retrain it "
                             f"with `terrace-classifier train`") from None
        return cls(score_model, metadata, encoder_for(directory, metadata["encoder"]), directory)

    def inputs(self, texts: list[str]) -> training.Inputs:
        """Features of every text; embeddings of those the model can use (a prompt
        with shape weight 0 is scored by the prior alone: no encoder run)."""
        return read_inputs(texts, self.encoder, self.model.shape_weight)

    def scores(self, texts: list[str]) -> training.Scores:
        """Score and its parts (model, prior, in_domain) per text."""
        return self.model.scores(self.inputs(texts))

    def score(self, text: str) -> float:
        return self.score_features(text, self.features(text))

    # The router's path, in two steps so that only the encoder run (about
    # 2 ms on one core) leaves the event loop: features (tens of microseconds),
    # then the score, which runs the encoder only when needs_encoder says so.
    def features(self, text: str) -> np.ndarray:
        """float64 [1, F] shape features of one prompt."""
        return np.array([extract(text)], dtype=np.float64)

    def needs_encoder(self, features: np.ndarray) -> bool:
        return bool(self.model.shape_weight(features)[0] > 0)

    def score_features(self, text: str, features: np.ndarray) -> float:
        embedding = (self.encoder.embed([text]) if self.needs_encoder(features)
                     else np.zeros((1, self.encoder.dim), dtype=np.float32))
        return float(self.model.score(training.Inputs(embedding, features))[0])

    def score_many(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.model.score(self.inputs(texts))

    def score_threshold_for_share(self, share: float) -> float:
        """Threshold that sends `share` of the training distribution past tier 0."""
        return training.threshold_for_share(self.metadata["score_quantiles"], share)


def read_inputs(texts: list[str], encoder: SentenceEncoder,
                shape_weight: Callable[[np.ndarray], np.ndarray] | None = None) -> training.Inputs:
    """What the scorer reads of each text: features, and embeddings (all of
    them, or only where `shape_weight` of the features is above 0). The one
    path from text to model inputs, for serving and training alike."""
    features = np.array([extract(t) for t in texts], dtype=np.float64).reshape(
        len(texts), len(FEATURE_NAMES))
    embeddings = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    need = (range(len(texts)) if shape_weight is None
            else np.flatnonzero(shape_weight(features) > 0))
    for i in need:
        # One prompt per run: int8 activations are quantised per batch, so
        # a batch would change each prompt's embedding slightly.
        embeddings[i] = encoder.embed([texts[i]])[0]
    return training.Inputs(embeddings, features)


def model_from_metadata(metadata: dict, support: np.ndarray) -> training.ScoreModel:
    m = metadata["model"]
    if support.ndim != 2 or support.dtype != np.float16:
        raise ValueError(f"{SUPPORT_FILE} must be float16 [S, D], got {support.dtype} "
                         f"{list(support.shape)}")
    return training.ScoreModel(
        weights=np.array([m["small_head"], m["large_head"]], dtype=np.float64).T,
        bias=np.array(m["bias"], dtype=np.float64),
        prior_intercept=float(m["prior_intercept"]),
        prior_slope=float(m["prior_slope"]),
        support=support.astype(np.float16),
        feature_lo=np.array(m["feature_lo"], dtype=np.float64),
        feature_hi=np.array(m["feature_hi"], dtype=np.float64),
        config=training.TrainConfig(**metadata["train"]["config"]),
    )


def model_to_metadata(model: training.ScoreModel) -> dict:
    return {
        "small_head": [float(w) for w in model.weights[:, 0]],
        "large_head": [float(w) for w in model.weights[:, 1]],
        "bias": [float(b) for b in model.bias],
        "prior_intercept": model.prior_intercept,
        "prior_slope": model.prior_slope,
        "feature_lo": [float(v) for v in model.feature_lo],
        "feature_hi": [float(v) for v in model.feature_hi],
    }


def check_metadata(metadata: dict) -> None:
    """Refuse a model built for other features or another format: its weights would mean nothing."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} metadata file (format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"classifier format version {metadata.get('format_version')!r}; this "
                         f"code reads version {FORMAT_VERSION}: retrain it with "
                         f"`terrace-classifier train`")
    spec = metadata.get("feature_spec") or {}
    if spec.get("version") != FEATURE_SPEC_VERSION or list(spec.get("names", [])) != list(
        FEATURE_NAMES
    ):
        raise ValueError(
            f"model was trained with feature spec version {spec.get('version')!r}; this code "
            f"extracts version {FEATURE_SPEC_VERSION}: retrain it with `terrace-classifier train`"
        )
    for key in ("default_threshold", "score_quantiles", "model", "encoder", "train"):
        if key not in metadata:
            raise ValueError(f"classifier metadata lacks {key!r}")
    if len(metadata["model"].get("feature_lo", [])) != N_LEARNED:
        raise ValueError("classifier metadata: model.feature_lo must have one value per "
                         "learned feature")


def benchmark_score(texts: list[str], classifier: Classifier | None = None,
                    repeat: int = 3) -> dict[str, Any]:
    """Per-call latency of Classifier.score over `texts` (one thread), in microseconds."""
    clf = classifier or Classifier.load(BUILTIN)
    if not texts:
        raise ValueError("benchmark_score needs at least one text")
    for t in texts[:20]:  # warm caches and onnxruntime's first-run allocations
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
