"""`train`: data file in, model directory (model.onnx + metadata.json) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import evaluation, training
from .features import feature_spec
from .model import FORMAT, FORMAT_VERSION, METADATA_FILE, MODEL_FILE
from .onnx_export import build_model

DEFAULT_TARGET_LARGE_SHARE = 0.3

LABEL_DOC = {
    "needs_large": "small_correct is false and large_correct is true (the data README's label)",
    "score": "0.5 + 0.5 * (P(large correct) - P(small correct)): expected gain of the large "
             "tier, E[needs_large] - E[large fails where small succeeds], mapped to [0, 1]",
    "heads": ["P(small_correct)", "P(large_correct)"],
}


def train_to_dir(data: str | Path, out: str | Path, config: training.TrainConfig | None = None,
                 *, with_eval: bool = True) -> dict:
    """Train on every row of `data`, write the model directory, return its metadata."""
    config = config or training.TrainConfig()
    rows = training.load_rows(data)
    X = training.feature_matrix([r.prompt for r in rows])
    all_idx = np.arange(len(rows))
    used, excluded = training.training_mask(rows, all_idx, config)
    model = training.fit_rows(rows, X, all_idx, config)

    # Quantiles over the whole training file: the traffic the default
    # threshold is calibrated for (excluded subjects are still traffic).
    scores = model.score(X)
    quantiles = training.score_quantiles(scores)
    metrics: dict = {"as_is_in_sample": evaluation.evaluate_model(model, rows, X).to_dict()}
    if with_eval:
        for result in evaluation.cross_validate(rows, X, config):
            metrics[result.name.replace("-", "_")] = result.to_dict()

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "inputs": {"features": "float32 [N, F], features.extract() in feature_spec.names order"},
        "outputs": {"score": "float32 [N, 1]", "p_correct": "float32 [N, 2] (small, large)"},
        "feature_spec": feature_spec(),
        "label": LABEL_DOC,
        "train": {
            "data_file": Path(data).name,
            "data_sha256": training.file_sha256(data),
            "rows": len(rows),
            "rows_used": int(len(used)),
            "excluded_sources": excluded,
            "config": training.config_dict(config),
        },
        "weights": {
            "small_head": [float(w) for w in model.weights[:, 0]],
            "large_head": [float(w) for w in model.weights[:, 1]],
            "bias": [float(b) for b in model.bias],
        },
        "score_quantiles": quantiles,
        "default_target_large_share": DEFAULT_TARGET_LARGE_SHARE,
        "default_threshold": training.threshold_for_share(quantiles, DEFAULT_TARGET_LARGE_SHARE),
        "metrics": metrics,
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_model = build_model(model.weights, model.bias,
                             doc="Terrace complexity classifier; see metadata.json")
    (out_dir / MODEL_FILE).write_bytes(onnx_model.SerializeToString())
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    return metadata
