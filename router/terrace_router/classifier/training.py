"""Training: two L2-regularised logistic heads over the handcrafted features.

Label choice. The shared data says, per prompt, whether the small and the
large model answered correctly. Routing quality at a given large-tier share
is maximised by sending the prompts with the largest expected gain
E[large_correct - small_correct] = P(needs large) - P(large hurts), where
"needs large" = small fails and large succeeds (the data README's label).
We fit P(small correct) and P(large correct) as two logistic heads and
score their difference, mapped to [0, 1]:

    score = 0.5 + 0.5 * (P(large correct) - P(small correct))

Measured on subject-held-out folds this ranks better than a single logistic
on the "needs large" indicator or on "small fails" (see docs/classifier.md),
because each head has a denser, less noisy target than the rare joint event.

Sources (subjects) whose large-model accuracy is below chance
(`min_source_large_accuracy`, 0.25 for four-way multiple choice) are left out
of training: in the shared data that is mmlu/high_school_mathematics, where
GPT-4 scores 3%, a sign of broken answer extraction in the source evals
rather than of hard questions. Evaluation still uses every row.

Fitting is Newton's method on the full batch (a 37-feature problem): exact,
deterministic with no seed at all, and well under a second.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .features import ANCHORED_FEATURES, ANCHORED_WEIGHTS, FEATURE_NAMES, N_LEARNED, extract

CHANCE_FOUR_WAY = 0.25
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
# Features that only mean something when the prompt has answer choices.
CHOICE_FEATURES = ("log_mean_choice_chars", "log_std_choice_chars", "log_max_choice_chars",
                   "numeric_choice_frac")


@dataclass(frozen=True)
class Row:
    prompt: str
    source: str
    small_correct: bool
    large_correct: bool


@dataclass(frozen=True)
class TrainConfig:
    # Mean log-loss + l2/2 * |w|^2 on standardised features, per head.
    l2: float = 0.1
    min_source_large_accuracy: float = CHANCE_FOUR_WAY
    newton_iterations: int = 25


@dataclass
class LinearModel:
    """Both heads on raw features: logits = X @ weights + bias (standardisation folded in)."""

    weights: np.ndarray  # [F, 2] (small head, large head)
    bias: np.ndarray  # [2]
    # Standardisation of the learned features, kept for the record.
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    std: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def p_correct(self, X: np.ndarray) -> np.ndarray:
        z = X @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def score(self, X: np.ndarray) -> np.ndarray:
        p = self.p_correct(X)
        return 0.5 + 0.5 * (p[:, 1] - p[:, 0])


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a routing JSONL file; ValueError naming the line on bad input."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                row = Row(
                    prompt=obj["prompt"],
                    source=str(obj.get("source", "")),
                    small_correct=bool(obj["small_correct"]),
                    large_correct=bool(obj["large_correct"]),
                )
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a routing row ({exc!r})") from None
            if not isinstance(row.prompt, str):
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a string")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_prompts(path: str | Path) -> list[str]:
    """Just the prompts of a JSONL file (labels optional), for scoring."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompts.append(obj["prompt"] if isinstance(obj, dict) else str(obj))
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: no 'prompt' ({exc!r})") from None
    return prompts


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_matrix(prompts: list[str]) -> np.ndarray:
    return np.array([extract(p) for p in prompts], dtype=np.float64)


def labels(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    small = np.array([r.small_correct for r in rows], dtype=np.float64)
    large = np.array([r.large_correct for r in rows], dtype=np.float64)
    return small, large


def excluded_sources(rows: list[Row], idx: np.ndarray, min_large_accuracy: float) -> list[str]:
    """Sources among rows[idx] whose large-model accuracy is below `min_large_accuracy`."""
    totals: dict[str, list[int]] = {}
    for i in idx:
        r = rows[i]
        t = totals.setdefault(r.source, [0, 0])
        t[0] += r.large_correct
        t[1] += 1
    return sorted(s for s, (ok, n) in totals.items() if ok / n < min_large_accuracy)


def _anchored_offset(X: np.ndarray) -> np.ndarray:
    """Fixed logit offsets [N, 2] from the anchored features."""
    A = X[:, N_LEARNED:]
    W = np.array([ANCHORED_WEIGHTS[name] for name in ANCHORED_FEATURES], dtype=np.float64)
    return A @ W


def _newton_logistic(Z: np.ndarray, y: np.ndarray, offset: np.ndarray, l2: float,
                     iterations: int) -> tuple[np.ndarray, float]:
    """argmin mean logloss(sigmoid(Z w + b + offset), y) + l2/2 |w|^2 (b unpenalised)."""
    n, d = Z.shape
    Za = np.hstack([Z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(Za @ theta + offset)))
        grad = Za.T @ (p - y) / n + reg * theta
        hess = (Za * (p * (1 - p))[:, None]).T @ Za / n + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def fit(X: np.ndarray, small: np.ndarray, large: np.ndarray, config: TrainConfig) -> LinearModel:
    """Fit both heads on the rows given (filtering is the caller's job)."""
    if len(X) < 10:
        raise ValueError(f"need at least 10 training rows, got {len(X)}")
    learned = X[:, :N_LEARNED]
    mean = learned.mean(axis=0)
    std = learned.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant feature gets weight 0 anyway
    Z = (learned - mean) / std
    offset = _anchored_offset(X)
    n_features = X.shape[1]
    weights = np.zeros((n_features, 2))
    bias = np.zeros(2)
    anchored = np.array([ANCHORED_WEIGHTS[name] for name in ANCHORED_FEATURES])
    for head, y in enumerate((small, large)):
        w, b = _newton_logistic(Z, y, offset[:, head], config.l2, config.newton_iterations)
        # Fold standardisation in: w.(x - mean)/std + b = (w/std).x + (b - w.mean/std)
        weights[:N_LEARNED, head] = w / std
        weights[N_LEARNED:, head] = anchored[:, head]
        bias[head] = b - float(np.sum(w * mean / std))
    _impute_choice_features(weights, bias, X)
    return LinearModel(weights=weights, bias=bias, mean=mean, std=std)


def _impute_choice_features(weights: np.ndarray, bias: np.ndarray, X: np.ndarray) -> None:
    """Give prompts without answer choices the average multiple-choice contribution.

    The choice features are 0 on a prompt that is not multiple choice, far
    outside anything the (all multiple-choice) training data showed; taken
    literally, the weights would extrapolate. Imputing the training mean is
    linear, so it folds into the model: the constant is added to the bias
    and taken back through the is_multiple_choice feature, which is 1 on
    every row that has real choice features (and whose learned weight is 0
    when, as in MMLU, every training row is multiple choice).
    """
    mc = FEATURE_INDEX["is_multiple_choice"]
    rows = X[:, mc] > 0.5
    if not rows.any():
        return
    cols = [FEATURE_INDEX[name] for name in CHOICE_FEATURES]
    means = X[rows][:, cols].mean(axis=0)
    for head in range(2):
        c = float(weights[cols, head] @ means)
        weights[mc, head] -= c
        bias[head] += c


def training_mask(rows: list[Row], idx: np.ndarray,
                  config: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """Of rows[idx], the ones training uses, and the sources it leaves out."""
    bad = excluded_sources(rows, idx, config.min_source_large_accuracy)
    bad_set = set(bad)
    keep = np.array([rows[i].source not in bad_set for i in idx], dtype=bool)
    return idx[keep], bad


def fit_rows(rows: list[Row], X: np.ndarray, idx: np.ndarray, config: TrainConfig) -> LinearModel:
    small, large = labels(rows)
    use, _ = training_mask(rows, idx, config)
    return fit(X[use], small[use], large[use], config)


QUANTILE_PROBS = np.linspace(0.0, 1.0, 201)


def score_quantiles(scores: np.ndarray) -> dict:
    return {
        "probs": [round(float(p), 6) for p in QUANTILE_PROBS],
        "values": [float(v) for v in np.quantile(scores, QUANTILE_PROBS)],
    }


def threshold_for_share(quantiles: dict, share: float) -> float:
    """Score above which `share` of the distribution described by `quantiles` lies."""
    if not 0.0 <= share <= 1.0 or math.isnan(share):
        raise ValueError(f"share must be in [0, 1], got {share}")
    probs = np.asarray(quantiles["probs"], dtype=np.float64)
    values = np.asarray(quantiles["values"], dtype=np.float64)
    if share <= 0.0:
        return math.nextafter(float(values[-1]), math.inf)
    return float(np.interp(1.0 - share, probs, values))


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
