"""Complexity classifier: shipped model, encoder, the score's parts, training, eval, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
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
from terrace_router.classifier.encoder import SentenceEncoder
from terrace_router.classifier.features import (
    CLIP_HEAD,
    CLIP_TAIL,
    FEATURE_NAMES,
    N_FEATURES,
    encoder_text,
    extract,
)
from terrace_router.classifier.model import builtin_dir, read_inputs

# The shared routing data (see its README) sits in shared/ beside the clone,
# in development and in CI alike; TERRACE_ROUTING_DATA points elsewhere.
DATA = Path(
    os.environ.get(
        "TERRACE_ROUTING_DATA",
        Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "mmlu_routing.jsonl",
    )
)

MC = "Which of the following is NOT a prime number?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"
CHAT = [
    "hi, how are you?",
    "What is the capital of France?",
    "Summarise the plot of Hamlet in three sentences.",
]


@pytest.fixture(scope="module")
def data() -> Path:
    assert DATA.is_file(), (
        f"routing data not found at {DATA}; set TERRACE_ROUTING_DATA to mmlu_routing.jsonl"
    )
    return DATA


@pytest.fixture(scope="module")
def builtin() -> Classifier:
    return Classifier.load("builtin")


@pytest.fixture(scope="module")
def subset(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every 6th row: all subjects kept, ~2,000 prompts to embed."""
    path = tmp_path_factory.mktemp("data") / "subset.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()[::6]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the shipped model ---------------------------------------------------------------


def test_shipped_metadata_matches_the_code(builtin: Classifier) -> None:
    meta = json.loads((builtin_dir() / "metadata.json").read_text())
    assert meta["feature_spec"]["version"] == FEATURE_SPEC_VERSION
    assert meta["feature_spec"]["names"] == list(FEATURE_NAMES)
    assert meta["encoder"] == "builtin" and meta["encoder_info"] == builtin.encoder.info
    assert builtin.encoder.dim == 384 and builtin.encoder.max_tokens == 48
    # A classifier trained on the built-in encoder fits in a ConfigMap (1 MiB,
    # base64 for the binary file): everything but the encoder.
    size = sum(p.stat().st_size for p in builtin_dir().iterdir() if p.is_file())
    assert size * 4 / 3 < 1024 * 1024


def test_shipped_model_was_built_from_the_shared_data(builtin: Classifier, data: Path) -> None:
    # hashlib directly, not the trainer's own helper that wrote the field
    assert builtin.metadata["train"]["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    subjects = builtin.metadata["metrics"]["leave_subjects_out"]
    assert len(subjects["parts"]) == 10
    mean = subjects["mean_apgr"]
    assert mean["classifier"] > mean["length"] > mean["random"] - 0.01
    assert "leave_category_out" in builtin.metadata["metrics"]


def test_scores_are_in_unit_interval_for_odd_input(builtin: Classifier) -> None:
    odd = [
        "",
        " ",
        "\n" * 100,
        "é" * 3000,
        "\ud800 lone surrogate",
        "1" * 10000,
        "A. x\nB. y\nAnswer:",
        MC * 300,
        "\x00" * 50,
    ]
    parts = builtin.scores(odd)
    for name in ("score", "model", "prior", "in_domain"):
        values = getattr(parts, name)
        assert np.all((values >= 0.0) & (values <= 1.0)), (name, values)
    for text in odd:
        assert builtin.score(text) == pytest.approx(float(builtin.score_many([text])[0]))


def test_prompts_unlike_the_training_data_are_scored_by_the_prior(
    builtin: Classifier, data: Path
) -> None:
    """Out of distribution, the score is the domain-free prior (no encoder run);
    in distribution, the learned model speaks."""
    parts = builtin.scores(CHAT + ["Write a Python function that merges two sorted lists."])
    assert np.all(parts.in_domain == 0.0)
    np.testing.assert_allclose(parts.score, parts.prior)
    assert not any(builtin.needs_encoder(builtin.features(t)) for t in CHAT)

    seen = training.load_prompts(data)[:200:10]
    parts = builtin.scores(seen)
    assert np.median(parts.in_domain) > 0.5 and parts.in_domain.max() == 1.0, parts.in_domain
    assert all(builtin.needs_encoder(builtin.features(t)) for t in seen)


def test_in_domain_falls_with_distance_from_the_training_prompts(builtin: Classifier) -> None:
    near = "Which of these is a noble gas?\nA. Oxygen\nB. Neon\nC. Iron\nD. Sodium\nAnswer:"
    far = "ggg hhh jjj kkk zzz\nA. qqq\nB. www\nC. eee\nD. rrr\nAnswer:"
    parts = builtin.scores([near, far])
    assert parts.in_domain[0] > parts.in_domain[1]
    # The learned model's vote counts for less on the far prompt.
    assert abs(parts.score[1] - parts.prior[1]) <= abs(parts.model[1] - parts.prior[1]) + 1e-12


def test_prior_rises_with_length_and_follows_the_task_cues(builtin: Classifier) -> None:
    short, longer = "Tell me about rivers.", "Tell me about rivers. " * 40
    code = "Write a Python function that merges two sorted lists."
    hello = "hello there!"
    p = builtin.scores([short, longer, code, hello]).prior
    assert builtin.model.prior_slope > 0
    assert p[1] > p[0]
    assert p[2] > p[0] > p[3]


def test_easy_chat_scores_below_code_and_proofs(builtin: Classifier) -> None:
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


def test_one_owner_for_clipping(builtin: Classifier) -> None:
    """A long prompt is read whole for its length, clipped for the rest, and the
    encoder reads its head and tail: serving and training call the same code."""
    long = MC * 2000  # ~110,000 characters
    x = extract(long)
    assert x[FEATURE_NAMES.index("log_chars")] == pytest.approx(math.log1p(len(long)))
    clipped = long[:CLIP_HEAD] + "\n" + long[-CLIP_TAIL:]
    assert x[1:] == extract(clipped)[1:]
    inputs = read_inputs([long], builtin.encoder)
    np.testing.assert_array_equal(
        inputs.embeddings[0], builtin.encoder.embed([encoder_text(long)])[0]
    )
    assert builtin.score(long) == pytest.approx(float(builtin.model.score(inputs)[0]))


def test_thresholds_follow_the_training_quantiles(builtin: Classifier, data: Path) -> None:
    assert builtin.default_threshold == pytest.approx(builtin.score_threshold_for_share(0.3))
    shares = [0.05, 0.1, 0.3, 0.5, 0.9]
    ts = [builtin.score_threshold_for_share(s) for s in shares]
    assert ts == sorted(ts, reverse=True)
    prompts = training.load_prompts(data)[::12]
    scores = builtin.score_many(prompts)
    for share, t in zip(shares, ts, strict=True):
        assert float((scores >= t).mean()) == pytest.approx(share, abs=0.04)
    with pytest.raises(ValueError):
        builtin.score_threshold_for_share(1.5)


def _copy_builtin(dst: Path) -> None:
    for name in ("metadata.json", "support.npy"):
        shutil.copyfile(builtin_dir() / name, dst / name)


def test_refuses_a_model_for_other_features_or_format(tmp_path: Path) -> None:
    _copy_builtin(tmp_path)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    Classifier.load(tmp_path)  # as copied: fine
    for key, value, message in (
        (
            "feature_spec",
            {**meta["feature_spec"], "version": FEATURE_SPEC_VERSION + 1},
            "feature spec version",
        ),
        ("format_version", 1, "format version 1"),
    ):
        (tmp_path / "metadata.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=message):
            Classifier.load(tmp_path)
    with pytest.raises(ValueError, match="not a classifier directory"):
        Classifier.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="not an encoder directory"):
        SentenceEncoder.load(tmp_path)


def test_features_have_the_declared_length() -> None:
    assert len(extract("anything at all")) == N_FEATURES
    assert len(extract("x" * 100_000)) == N_FEATURES


def test_encoder_embeddings_are_unit_length_and_batch_free(builtin: Classifier) -> None:
    texts = [MC, "hello", "The mitochondria is the powerhouse of the cell." * 20]
    one = np.vstack([builtin.encoder.embed([t]) for t in texts])
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    # Similar meaning, similar embedding: the encoder is a real one.
    a, b, c = builtin.encoder.embed(
        [
            "The cat sat on the mat.",
            "A cat is sitting on a rug.",
            "Quarterly revenue rose by four percent.",
        ]
    )
    assert a @ b > a @ c + 0.2


def test_benchmark_score_reports_percentiles(builtin: Classifier) -> None:
    out = benchmark_score(["hello", MC], builtin, repeat=2)
    assert out["calls"] == 4 and out["p50_us"] > 0 and out["p99_us"] >= out["p50_us"]


# -- evaluation ---------------------------------------------------------------------


def test_apgr_of_oracle_random_and_inverse_routers() -> None:
    rng = np.random.default_rng(0)
    small = (rng.random(2000) < 0.6).astype(float)
    large = np.maximum(small, (rng.random(2000) < 0.5).astype(float))
    gain = large - small
    oracle = evaluation.apgr(evaluation.quality_curve(gain, small, large))
    inverse = evaluation.apgr(evaluation.quality_curve(-gain, small, large))
    rand = evaluation.apgr(evaluation.random_curve(small, large))
    assert rand == pytest.approx(0.5, abs=1e-3)
    assert oracle > 0.8 and inverse < 0.2


def test_check_needs_the_mean_margin_and_no_fold_below_length() -> None:
    def part(clf: float, length: float) -> evaluation.Part:
        return evaluation.Part(
            "p", 10, 0.5, 0.7, {}, {"classifier": clf, "length": length, "random": 0.5}
        )

    good = evaluation.SplitResult("s", [part(0.62, 0.55), part(0.60, 0.56)], [])
    assert evaluation.check(good)[0]
    one_fold_below = evaluation.SplitResult("s", [part(0.70, 0.55), part(0.55, 0.56)], [])
    assert not evaluation.check(one_fold_below)[0]
    small_margin = evaluation.SplitResult("s", [part(0.58, 0.55), part(0.59, 0.56)], [])
    ok, verdict = evaluation.check(small_margin)
    assert not ok and "margin +0.0300" in verdict


def test_splits_hold_out_whole_subjects_and_categories(subset: Path) -> None:
    rows = training.load_rows(subset)
    config = training.TrainConfig()
    idx, bad = evaluation.evaluable(rows, config)
    assert bad == ["mmlu/high_school_mathematics"] and len(idx) < len(rows)
    folds = evaluation.subject_folds([rows[i].source for i in idx])
    fold_of: dict[str, set[int]] = {}
    for i, f in zip(idx, folds, strict=True):
        fold_of.setdefault(rows[i].source, set()).add(int(f))
    assert all(len(v) == 1 for v in fold_of.values()) and len(set(folds)) == 10
    assert evaluation.category_of("mmlu/college_physics") == "stem"
    assert evaluation.category_of("mmlu/professional_law") == "humanities+social"
    assert evaluation.category_of("mmlu/nutrition") == "other"


def test_held_out_subjects_beat_length_and_random(builtin: Classifier, data: Path) -> None:
    """The recipe, recomputed out of sample on all the shared data (its embeddings
    are cached after the first run), gives the figures the shipped model records."""
    from terrace_router.classifier.builder import training_inputs

    rows = training.load_rows(data)
    inputs = training_inputs([r.prompt for r in rows], builtin.encoder)
    config = training.TrainConfig(**builtin.metadata["train"]["config"])
    result = evaluation.leave_subjects_out(rows, inputs, config)
    print("\n" + evaluation.format_result(result))
    assert result.mean("classifier") > result.mean("length") + 0.03
    assert result.mean("classifier") > result.mean("random") + 0.05
    stored = builtin.metadata["metrics"]["leave_subjects_out"]["mean_apgr"]
    assert result.mean("classifier") == pytest.approx(stored["classifier"], abs=1e-5)


# -- training and the CLI -------------------------------------------------------------


def test_training_is_deterministic(subset: Path, tmp_path: Path) -> None:
    for out in ("a", "b"):
        assert (
            cli.main(["train", "--data", str(subset), "--out", str(tmp_path / out), "--no-eval"])
            == 0
        )
    for name in ("metadata.json", "support.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["train"]["excluded_sources"] == ["mmlu/high_school_mathematics"]
    clf = Classifier.load(tmp_path / "a")
    assert 0.0 <= clf.score("hello") <= 1.0


def test_cli_eval_prints_the_table_and_verdict(
    subset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["eval", "--data", str(subset), "--check"])
    out = capsys.readouterr().out
    assert "split: leave-subjects-out" in out and "split: leave-category-out" in out
    assert "worst part vs length" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(("PASS", "FAIL")) and (code == 0) == last.startswith("PASS")


def test_cli_score_text_file_and_explain(subset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["score", "hello there"]) == 0
    assert 0.0 <= float(capsys.readouterr().out.strip()) <= 1.0
    assert cli.main(["score", "--data", str(subset)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(subset.read_text().strip().splitlines())
    exam = (
        "Which organelle is the site of aerobic respiration in eukaryotic cells?\n"
        "A. Ribosome\nB. Mitochondrion\nC. Golgi apparatus\nD. Lysosome\nAnswer:"
    )
    assert cli.main(["score", "--explain", exam]) == 0
    parts = json.loads(capsys.readouterr().out)
    assert set(parts) == {"score", "model", "prior", "in_domain"}
    assert parts["in_domain"] > 0 and isinstance(parts["model"], float)
    assert cli.main(["score", "--explain", "hi, how are you?"]) == 0
    parts = json.loads(capsys.readouterr().out)
    assert parts["model"] is None and parts["in_domain"] == 0  # the encoder was not run


ROW = {"prompt": "x", "source": "s", "small_correct": True, "large_correct": False}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"prompt": "x"}, "bad.jsonl:1: 'source' must be a string"),
        ({**ROW, "small_correct": "false"}, "'small_correct' must be true or false"),
        ({**ROW, "large_correct": None}, "'large_correct' must be true or false"),
        ({**ROW, "prompt": 42}, "'prompt' must be a string"),
        ([1, 2], "not a routing row"),
    ],
)
def test_train_refuses_bad_rows_naming_the_line(
    tmp_path: Path, line: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(line) + "\n")
    assert cli.main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_reports_bad_input_without_a_traceback(
    tmp_path: Path, subset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["score"]) == 2
    for content, message in (
        (b'{"prompt": 42}\n', "string 'prompt'"),
        (b"\xff\xfe junk\n", "not UTF-8 text"),
        (b"not json\n", "prompts.jsonl:1: not JSON"),
    ):
        (tmp_path / "prompts.jsonl").write_bytes(content)
        assert cli.main(["score", "--data", str(tmp_path / "prompts.jsonl")]) == 2
        assert message in capsys.readouterr().err
    for argv, message in (
        (["eval", "--data", str(subset), "--folds", "1"], "at least 2 folds"),
        (["eval", "--data", str(subset), "--folds", "500"], "at least 500"),
        (
            [
                "train",
                "--data",
                str(subset),
                "--out",
                str(tmp_path / "o"),
                "--similarity-untrusted",
                "0.5",
                "--similarity-trusted",
                "0.4",
            ],
            "similarity_untrusted < similarity_trusted",
        ),
        (
            ["train", "--data", str(subset), "--out", str(tmp_path / "o"), "--l2-embedding", "-1"],
            "L2 strengths must be >= 0",
        ),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_corrupt_classifier_directory_is_named_not_a_traceback(tmp_path: Path) -> None:
    _copy_builtin(tmp_path)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    del meta["model"]["bias"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a valid classifier .*bias"):
        Classifier.load(tmp_path)
    (tmp_path / "metadata.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a valid classifier"):
        Classifier.load(tmp_path)
    _copy_builtin(tmp_path)
    np.save(tmp_path / "support.npy", np.zeros((3, 3), dtype=np.float64))
    with pytest.raises(ValueError, match="support.npy must be float16"):
        Classifier.load(tmp_path)


def test_a_fold_where_both_tiers_are_equal_is_reported_not_fatal(subset: Path) -> None:
    # A held-out part where the small and the large tier are equally good has
    # no gap to recover: its APGR is undefined, reported and left out of means.
    real = training.load_rows(subset)[:300]
    tie = [training.Row(f"Tie question {i}?", "tie", True, True) for i in range(40)]
    part = evaluation.evaluate_part("tie", np.arange(40.0), tie)
    assert not part.defined and part.to_dict()["apgr"]["classifier"] is None
    other = evaluation.evaluate_part("real", np.arange(300.0), real)
    split = evaluation.SplitResult("s", [part, other], [])
    assert split.mean("classifier") == pytest.approx(other.apgr["classifier"])
    assert split.worst_margin() == pytest.approx(other.apgr["classifier"] - other.apgr["length"])
    assert "undefined" in evaluation.format_result(split)
    assert split.to_dict()["parts"][0]["apgr"]["length"] is None
    # A part where the tiers differ on a few rows only is flagged: its APGR is unstable.
    few = [training.Row(f"q{i}", "s", i % 2 == 0, i % 3 != 0) for i in range(25)]
    tiny = evaluation.evaluate_part("tiny", np.arange(25.0), few)
    assert tiny.gap_rows == pytest.approx(3.0)
    assert "small gap: 3 rows" in evaluation.format_result(evaluation.SplitResult("s", [tiny], []))
    assert "small gap" not in evaluation.format_result(split)


def test_exam_words_that_look_like_code_cues_do_not_pin_the_score(builtin: Classifier) -> None:
    """The model learns the task cues' weights: "function" in a biology question
    is not a code request (fixed weights sent all such questions to the large tier)."""
    q = (
        "Which of the following is the primary {} of mitochondria in eukaryotic cells?\n"
        "A. Protein synthesis\nB. ATP production\nC. Lipid storage\nD. DNA replication\n"
        "Answer:"
    )
    with_cue, without = builtin.scores([q.format("function"), q.format("role")]).score
    assert abs(with_cue - without) < 0.1, (with_cue, without)


def test_a_lone_surrogate_is_scored_not_an_error(builtin: Classifier) -> None:
    exam = (
        "Which organelle is the site of aerobic respiration in eukaryotic cells, the "
        "mito\ud800chondrion or another?\nA. Ribosome\nB. Mitochondrion\nC. Golgi "
        "apparatus\nD. Lysosome\nAnswer:"
    )
    assert builtin.needs_encoder(builtin.features(exam))  # the encoder reads it
    assert 0.0 <= builtin.score(exam) <= 1.0
    assert encoder_text(exam).encode("utf-8")
