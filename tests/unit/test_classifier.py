"""Complexity classifier: shipped model, ONNX inference, training, eval, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from terrace_router.classifier import (
    FEATURE_SPEC_VERSION,
    Classifier,
    benchmark_score,
    cli,
    evaluation,
    training,
)
from terrace_router.classifier.features import FEATURE_NAMES, N_FEATURES, extract
from terrace_router.classifier.model import builtin_dir

# The shared routing data (see its README) sits in shared/ beside the clone,
# in development and in CI alike; TERRACE_ROUTING_DATA points elsewhere.
DATA = Path(os.environ.get(
    "TERRACE_ROUTING_DATA",
    Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "mmlu_routing.jsonl"))


@pytest.fixture(scope="module")
def data() -> Path:
    assert DATA.is_file(), (f"routing data not found at {DATA}; set TERRACE_ROUTING_DATA to "
                            "mmlu_routing.jsonl")
    return DATA


@pytest.fixture(scope="module")
def builtin() -> Classifier:
    return Classifier.load("builtin")


@pytest.fixture(scope="module")
def subset(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 4th row: a few seconds of training, all subjects kept."""
    path = tmp_path_factory.mktemp("data") / "subset.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()[::4]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the shipped model ---------------------------------------------------------------


def test_shipped_metadata_matches_the_feature_spec(builtin: Classifier) -> None:
    meta = json.loads((builtin_dir() / "metadata.json").read_text())
    assert meta["feature_spec"]["version"] == FEATURE_SPEC_VERSION
    assert meta["feature_spec"]["names"] == list(FEATURE_NAMES)
    assert builtin.feature_spec_version == FEATURE_SPEC_VERSION
    size = sum(p.stat().st_size for p in builtin_dir().iterdir())
    assert size < 5 * 1024 * 1024


def test_shipped_model_was_built_from_the_shared_data(builtin: Classifier, data: Path) -> None:
    assert builtin.metadata["train"]["data_sha256"] == training.file_sha256(data)
    stored = builtin.metadata["metrics"]["subject_held_out"]["apgr"]
    assert stored["classifier"] > max(stored["random"], stored["length"])


def test_onnx_scores_match_the_numpy_model(builtin: Classifier) -> None:
    w = builtin.metadata["weights"]
    model = training.LinearModel(weights=np.array([w["small_head"], w["large_head"]]).T,
                                 bias=np.array(w["bias"]))
    texts = ["hi", "Which of the following is NOT a prime?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:",
             "Write a function in Rust that reverses a linked list.", "x" * 5000]
    expected = model.score(np.array([extract(t) for t in texts]))
    got = np.array([builtin.score(t) for t in texts])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(builtin.score_many(texts), expected, atol=1e-5)


def test_scores_are_in_unit_interval_for_odd_input(builtin: Classifier) -> None:
    for text in ["", " ", "\n" * 100, "é" * 3000, "\ud800 lone surrogate", "1" * 10000,
                 "A. x\nB. y\nAnswer:"]:
        s = builtin.score(text)
        assert 0.0 <= s <= 1.0, (text[:20], s)


def test_unlike_mmlu_chat_scores_low_and_code_or_proofs_high(builtin: Classifier) -> None:
    easy = ["hi, how are you?", "hello!", "thanks, bye", "What is the capital of France?"]
    hard = [
        "Prove that there are infinitely many primes, step by step.",
        "Write a Python function that parses a CSV file and returns the median of each column.",
        "Implement a thread-safe LRU cache in Go and explain the time complexity of each "
        "operation.",
        "Derive the closed form of the sum of the first n squares and prove it by induction.",
    ]
    t = builtin.default_threshold
    easy_scores = [builtin.score(x) for x in easy]
    hard_scores = [builtin.score(x) for x in hard]
    assert max(easy_scores) < t < min(hard_scores), (easy_scores, t, hard_scores)


def test_thresholds_follow_the_training_quantiles(builtin: Classifier, data: Path) -> None:
    assert builtin.default_threshold == pytest.approx(builtin.score_threshold_for_share(0.3))
    shares = [0.05, 0.1, 0.3, 0.5, 0.9]
    ts = [builtin.score_threshold_for_share(s) for s in shares]
    assert ts == sorted(ts, reverse=True)
    prompts = training.load_prompts(data)[::5]
    scores = builtin.score_many(prompts)
    for share, t in zip(shares, ts, strict=True):
        assert float((scores >= t).mean()) == pytest.approx(share, abs=0.03)
    with pytest.raises(ValueError):
        builtin.score_threshold_for_share(1.5)


def test_refuses_a_model_for_another_feature_spec(tmp_path: Path) -> None:
    for name in ("model.onnx", "metadata.json"):
        (tmp_path / name).write_bytes((builtin_dir() / name).read_bytes())
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["feature_spec"]["version"] = FEATURE_SPEC_VERSION + 1
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="feature spec version"):
        Classifier.load(tmp_path)
    with pytest.raises(ValueError, match="not a classifier directory"):
        Classifier.load(tmp_path / "nope")


def test_features_have_the_declared_length() -> None:
    assert len(extract("anything at all")) == N_FEATURES
    assert len(extract("x" * 100_000)) == N_FEATURES


def test_benchmark_score_reports_percentiles(builtin: Classifier) -> None:
    out = benchmark_score(["hello", "Prove it. " * 100], builtin, repeat=2)
    assert out["calls"] == 4 and out["p50_us"] > 0 and out["p99_us"] >= out["p50_us"]


# -- evaluation ---------------------------------------------------------------------


def test_apgr_of_oracle_random_and_inverse_routers() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(2000) < 0.6).astype(float)
    large = np.maximum(small, (rng.random(2000) < 0.5).astype(float))
    folds = np.zeros(2000, dtype=int)
    gain = large - small
    oracle = evaluation.apgr(evaluation.quality_curve(gain, small, large, folds))
    inverse = evaluation.apgr(evaluation.quality_curve(-gain, small, large, folds))
    rand = evaluation.apgr(evaluation.random_curve(small, large, folds))
    assert rand == pytest.approx(0.5, abs=1e-3)
    assert oracle > 0.8 and inverse < 0.2


def test_subject_held_out_apgr_beats_random_and_length(subset: Path) -> None:
    """The acceptance criterion, recomputed: held-out subjects, out-of-fold scores."""
    rows = training.load_rows(subset)
    X = training.feature_matrix([r.prompt for r in rows])
    by_subject = evaluation.subject_folds([r.source for r in rows])
    # No subject is in two folds.
    fold_of: dict[str, set[int]] = {}
    for r, f in zip(rows, by_subject, strict=True):
        fold_of.setdefault(r.source, set()).add(int(f))
    assert all(len(v) == 1 for v in fold_of.values())
    scores = evaluation.cross_val_scores(rows, X, by_subject, training.TrainConfig())
    result = evaluation.evaluate_scores("subject-held-out", scores, rows, by_subject)
    print("\n" + evaluation.format_result(result))
    assert result.apgr["classifier"] > result.apgr["length"] + 0.01
    assert result.apgr["classifier"] > result.apgr["random"] + 0.05


# -- training and the CLI -------------------------------------------------------------


def test_training_is_deterministic(subset: Path, tmp_path: Path) -> None:
    for out in ("a", "b"):
        assert cli.main(["train", "--data", str(subset), "--out", str(tmp_path / out),
                         "--no-eval"]) == 0
    for name in ("model.onnx", "metadata.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["train"]["excluded_sources"] == ["mmlu/high_school_mathematics"]
    clf = Classifier.load(tmp_path / "a")
    assert 0.0 <= clf.score("hello") <= 1.0


def test_cli_eval_prints_the_table_and_verdict(subset: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["eval", "--data", str(subset), "--check"]) == 0
    out = capsys.readouterr().out
    assert "split: subject-held-out" in out and "split: random" in out
    assert "APGR" in out and out.strip().splitlines()[-1].startswith("PASS")


def test_cli_score_text_and_file(subset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["score", "hello there"]) == 0
    assert 0.0 <= float(capsys.readouterr().out.strip()) <= 1.0
    assert cli.main(["score", "--data", str(subset)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(subset.read_text().strip().splitlines())


def test_cli_reports_bad_input_without_a_traceback(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert cli.main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "Traceback" not in err
    assert cli.main(["score"]) == 2
