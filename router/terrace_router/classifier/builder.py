"""`train`: data file in, classifier directory (metadata.json + support.npy) out."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import evaluation, training
from .encoder import MODEL_FILE as ENCODER_MODEL_FILE
from .encoder import SentenceEncoder
from .features import ENCODER_HEAD, ENCODER_TAIL, feature_spec
from .model import (
    BUILTIN,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    SUPPORT_FILE,
    model_to_metadata,
    read_inputs,
)

DEFAULT_TARGET_LARGE_SHARE = 0.3

LABEL_DOC = {
    "needs_large": "small_correct is false and large_correct is true (the data README's label)",
    "score": "prior + in_domain * (model - prior); model = 0.5 + 0.5 * (P(large correct) - "
             "P(small correct)), prior = 0.5 + 0.5 * clip(a + b * log1p(chars) + cue shift, "
             "-1, 1); all in [0, 1]",
    "heads": ["P(small_correct)", "P(large_correct)"],
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "terrace" / "classifier-inputs"


def training_inputs(prompts: list[str], encoder: SentenceEncoder,
                    cache: bool = True) -> training.Inputs:
    """Inputs of every prompt, embeddings included (read_inputs with no shortcut).

    Embedding 11,755 prompts takes ~1-2 minutes on one core, so the result
    is cached under ~/.cache/terrace/classifier-inputs, keyed by the
    encoder's bytes and the prompts' text: a cache hit is the same numbers."""
    key = hashlib.sha256()
    key.update((encoder.directory / ENCODER_MODEL_FILE).read_bytes())
    key.update(f"{encoder.max_tokens}:{ENCODER_HEAD}:{ENCODER_TAIL}".encode())
    for p in prompts:
        key.update(hashlib.sha256(p.encode("utf-8", "surrogatepass")).digest())
    path = _cache_dir() / f"{key.hexdigest()[:32]}.npy"
    if cache and path.is_file():
        embeddings = np.load(path, allow_pickle=False)
        features = read_inputs(prompts, encoder, lambda f: np.zeros(len(f))).features
        return training.Inputs(embeddings, features)
    inputs = read_inputs(prompts, encoder)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, inputs.embeddings, allow_pickle=False)
        os.replace(tmp, path)
    return inputs


def train_to_dir(data: str | Path, out: str | Path, config: training.TrainConfig | None = None,
                 *, with_eval: bool = True, encoder: str = BUILTIN) -> dict:
    """Train on every row of `data`, write the classifier directory, return its metadata.

    `encoder` is "builtin" or an encoder directory (written beside the model
    as `encoder/` when it is not the built-in one)."""
    config = config or training.TrainConfig()
    rows = training.load_rows(data)
    enc = SentenceEncoder.load(encoder)
    inputs = training_inputs([r.prompt for r in rows], enc)
    all_idx = np.arange(len(rows))
    used, excluded = training.training_mask(rows, all_idx, config)
    model = training.fit_rows(rows, inputs, all_idx, config)

    # Quantiles over the whole training file: the traffic the default
    # threshold is calibrated for (excluded subjects are still traffic).
    scores = model.score(inputs)
    quantiles = training.score_quantiles(scores)
    metrics: dict = {}
    if with_eval:
        for result in evaluation.cross_validate(rows, inputs, config):
            metrics[result.name.replace("-", "_")] = result.to_dict()

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder_name = BUILTIN
    if encoder != BUILTIN:
        encoder_name = "encoder"
        if Path(encoder).resolve() != (out_dir / encoder_name).resolve():
            import shutil

            shutil.copytree(encoder, out_dir / encoder_name, dirs_exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoder": encoder_name,
        "encoder_info": enc.info,
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
        "model": model_to_metadata(model),
        "score_quantiles": quantiles,
        "default_target_large_share": DEFAULT_TARGET_LARGE_SHARE,
        "default_threshold": training.threshold_for_share(quantiles, DEFAULT_TARGET_LARGE_SHARE),
        "metrics": metrics,
    }
    with open(out_dir / SUPPORT_FILE, "wb") as fh:
        np.save(fh, model.support, allow_pickle=False)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")
    return metadata
