"""Training: a two-head logistic model over sentence embeddings and shape features,
a domain-free prior, and how far each prompt is from the training data.

Label choice. The shared data says, per prompt, whether the small and the
large model answered correctly. Routing quality at a given large-tier share
is maximised by sending the prompts with the largest expected gain
E[large_correct - small_correct] = P(needs large) - P(large hurts), where
"needs large" = small fails and large succeeds (the data README's label).
We fit P(small correct) and P(large correct) as two logistic heads and
score their difference, mapped to [0, 1]:

    model = 0.5 + 0.5 * (P(large correct) - P(small correct))

Each head reads the prompt's all-MiniLM-L6-v2 embedding (encoder.py) and
every shape and cue feature (features.py), standardised.

A model trained on one kind of prompt extrapolates badly on another
(measured: trained on STEM subjects it ranks humanities questions worse
than their length does). So the score leans on a domain-free prior where a
prompt is unlike the training data:

    score = prior + in_domain * (model - prior)

- prior = 0.5 + 0.5 * clip(a + b * log1p(chars) + cue shift, -1, 1): the
  expected gain as a straight line in log length (b >= 0, least squares),
  plus the anchored cues' fixed shifts (features.ANCHORED_PRIOR_SHIFT);
- in_domain = semantic * shape, in [0, 1]:
  - semantic: the mean cosine similarity of the prompt's embedding to its
    `neighbours` nearest training prompts (a seeded sample of
    `support_size` of them ships with the model), mapped linearly from
    `similarity_untrusted` (0) to `similarity_trusted` (1);
  - shape: `shape_decay` ** (number of learned features outside the
    training data's central range), and 0 from `shape_max_out` of them on.
    Exam questions all have answer choices: a chat turn has none, so the
    choice features are out of range and only the prior speaks.

Sources (subjects) whose large-model accuracy is below chance
(`min_source_large_accuracy`, 0.25 for four-way multiple choice) are left out
of training and of evaluation: in the shared data that is
mmlu/high_school_mathematics, where GPT-4 scores 3%, a sign of broken answer
extraction in the source evals rather than of hard questions.

Fitting is Newton's method on the full batch: exact, deterministic, no seed
(the support sample's seed is in the config).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .features import (
    ANCHORED_FEATURES,
    ANCHORED_PRIOR_SHIFT,
    FEATURE_NAMES,
    N_LEARNED,
)

CHANCE_FOUR_WAY = 0.25
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
LOG_CHARS = FEATURE_INDEX["log_chars"]
_PRIOR_SHIFT = np.array([ANCHORED_PRIOR_SHIFT[name] for name in ANCHORED_FEATURES])
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
    # Mean log-loss + l2/2 * |w|^2 on standardised inputs, per head: one
    # strength for the 384 embedding weights, another for the shape and cue features.
    l2_embedding: float = 1.0
    l2_features: float = 0.1
    min_source_large_accuracy: float = CHANCE_FOUR_WAY
    newton_iterations: int = 25
    # Out-of-distribution weight (see the module docstring).
    support_size: int = 768
    neighbours: int = 10
    similarity_untrusted: float = 0.70
    similarity_trusted: float = 0.78
    shape_quantile: float = 0.005
    shape_decay: float = 0.25
    shape_max_out: int = 3
    seed: int = 20240601

    def __post_init__(self) -> None:
        checks = (
            (self.l2_embedding >= 0 and self.l2_features >= 0, "L2 strengths must be >= 0"),
            (0 <= self.min_source_large_accuracy < 1,
             "min_source_large_accuracy must be in [0, 1)"),
            (self.newton_iterations >= 1, "newton_iterations must be >= 1"),
            (self.support_size >= 1 and self.neighbours >= 1,
             "support_size and neighbours must be >= 1"),
            (0 <= self.similarity_untrusted < self.similarity_trusted <= 1,
             "need 0 <= similarity_untrusted < similarity_trusted <= 1"),
            (0 <= self.shape_quantile < 0.5, "shape_quantile must be in [0, 0.5)"),
            (0 < self.shape_decay <= 1, "shape_decay must be in (0, 1]"),
            (self.shape_max_out >= 1, "shape_max_out must be >= 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"training recipe: {message}")


@dataclass
class Inputs:
    """What the scorer reads of N prompts (model.Classifier.inputs builds it)."""

    embeddings: np.ndarray  # float32 [N, D], unit length; rows with shape weight 0 may be 0
    features: np.ndarray  # float64 [N, F], features.extract() in FEATURE_NAMES order

    def take(self, idx: np.ndarray) -> Inputs:
        return Inputs(self.embeddings[idx], self.features[idx])


@dataclass
class Scores:
    """Per prompt: the final score and its parts, each float64 [N]. `model`
    means something only where `in_domain` > 0: elsewhere the encoder was not
    run and it is computed from a zero embedding (with weight 0 in `score`)."""

    score: np.ndarray
    model: np.ndarray
    prior: np.ndarray
    in_domain: np.ndarray


@dataclass
class ScoreModel:
    """The fitted scorer; `scores` is the one formula training and serving share."""

    weights: np.ndarray  # [D + F, 2] on raw inputs (standardisation folded in)
    bias: np.ndarray  # [2]
    prior_intercept: float
    prior_slope: float  # expected gain per unit of log1p(chars), >= 0
    support: np.ndarray  # float16 [S, D] embeddings of training prompts
    feature_lo: np.ndarray  # [N_LEARNED] central range of the training features
    feature_hi: np.ndarray
    config: TrainConfig

    def shape_weight(self, features: np.ndarray) -> np.ndarray:
        """[N] in [0, 1]: 1 when every learned feature is inside the training range."""
        learned = features[:, :N_LEARNED]
        out = ((learned < self.feature_lo) | (learned > self.feature_hi)).sum(axis=1)
        weight = self.config.shape_decay ** out
        return np.where(out >= self.config.shape_max_out, 0.0, weight)

    def prior(self, features: np.ndarray) -> np.ndarray:
        shift = features[:, N_LEARNED:] @ _PRIOR_SHIFT
        gain = self.prior_intercept + self.prior_slope * features[:, LOG_CHARS] + shift
        return 0.5 + 0.5 * np.clip(gain, -1.0, 1.0)

    def scores(self, inputs: Inputs) -> Scores:
        X = inputs.features
        E = inputs.embeddings
        logits = np.hstack([E, X]) @ self.weights + self.bias
        p = 1.0 / (1.0 + np.exp(-logits))
        model = 0.5 + 0.5 * (p[:, 1] - p[:, 0])
        prior = self.prior(X)
        in_domain = self.shape_weight(X)
        rows = np.flatnonzero(in_domain > 0)  # the others need no similarity
        if len(rows):
            k = min(self.config.neighbours, len(self.support))
            sims = E[rows].astype(np.float32) @ self._support32.T
            nearest = np.partition(sims, -k, axis=1)[:, -k:].astype(np.float64).mean(axis=1)
            lo, hi = self.config.similarity_untrusted, self.config.similarity_trusted
            in_domain[rows] *= np.clip((nearest - lo) / (hi - lo), 0.0, 1.0)
        score = prior + in_domain * (model - prior)
        return Scores(score=score, model=model, prior=prior, in_domain=in_domain)

    @functools.cached_property
    def _support32(self) -> np.ndarray:
        return self.support.astype(np.float32)

    def score(self, inputs: Inputs) -> np.ndarray:
        return self.scores(inputs).score


def _json_lines(path: str | Path):
    """(line number, parsed object) of each non-blank line; ValueError naming
    the file and line on anything that is not JSON in UTF-8."""
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _label(obj: dict, key: str, where: str) -> bool:
    value = obj.get(key)
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: {key!r} must be true or false (or 1 or 0), got {value!r}")


def load_rows(path: str | Path) -> list[Row]:
    """Rows of a routing JSONL file; ValueError naming the line on bad input.

    Each line: {"prompt": str, "source": str, "small_correct": bool,
    "large_correct": bool}. `source` groups prompts (a subject, a task type):
    evaluation holds out whole sources."""
    rows: list[Row] = []
    for lineno, obj in _json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: not a routing row (a JSON object)")
        for key in ("prompt", "source"):
            if not isinstance(obj.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string")
        rows.append(Row(prompt=obj["prompt"], source=obj["source"],
                        small_correct=_label(obj, "small_correct", where),
                        large_correct=_label(obj, "large_correct", where)))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def load_prompts(path: str | Path) -> list[str]:
    """Just the prompts of a JSONL file (objects with a string "prompt"), for scoring."""
    prompts = []
    for lineno, obj in _json_lines(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{path}:{lineno}: needs a JSON object with a string 'prompt'")
        prompts.append(obj["prompt"])
    return prompts


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _newton_logistic(Z: np.ndarray, y: np.ndarray, offset: np.ndarray, l2: np.ndarray,
                     iterations: int) -> tuple[np.ndarray, float]:
    """argmin mean logloss(sigmoid(Z w + b + offset), y) + sum(l2/2 * w^2) (b unpenalised);
    `l2` has one strength per column of Z."""
    n, d = Z.shape
    Za = np.hstack([Z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.append(np.broadcast_to(np.asarray(l2, dtype=np.float64), (d,)), 0.0)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(Za @ theta + offset)))
        grad = Za.T @ (p - y) / n + reg * theta
        hess = (Za * (p * (1 - p))[:, None]).T @ Za / n + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def fit(inputs: Inputs, small: np.ndarray, large: np.ndarray,
        config: TrainConfig) -> ScoreModel:
    """Fit the scorer on the rows given (filtering is the caller's job)."""
    X, E = inputs.features, inputs.embeddings.astype(np.float64)
    if len(X) < 10:
        raise ValueError(f"need at least 10 training rows, got {len(X)}")
    # Every feature is learned here, the task cues too: they do occur in
    # exam questions ("the function of the liver" is no code request), and
    # the data says what they mean there. The prior keeps their fixed shifts
    # for prompts unlike the data.
    learned = np.hstack([E, X])
    mean = learned.mean(axis=0)
    std = learned.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)  # a constant input gets weight 0 anyway
    Z = (learned - mean) / std
    weights = np.zeros((learned.shape[1], 2))
    bias = np.zeros(2)
    l2 = np.concatenate([np.full(E.shape[1], config.l2_embedding),
                         np.full(X.shape[1], config.l2_features)])
    no_offset = np.zeros(len(X))
    for head, y in enumerate((small, large)):
        w, b = _newton_logistic(Z, y, no_offset, l2, config.newton_iterations)
        # Fold standardisation in: w.(x - mean)/std + b = (w/std).x + (b - w.mean/std)
        weights[:, head] = w / std
        bias[head] = b - float(np.sum(w * mean / std))
    _impute_choice_features(weights[E.shape[1]:], bias, X)

    # The prior: expected gain as a line in log length, never decreasing.
    A = np.vstack([np.ones(len(X)), X[:, LOG_CHARS]]).T
    intercept, slope = np.linalg.lstsq(A, large - small, rcond=None)[0]
    if slope < 0:
        slope, intercept = 0.0, float(np.mean(large - small))

    rng = np.random.default_rng(config.seed)
    pick = np.sort(rng.permutation(len(E))[: config.support_size])
    q = config.shape_quantile
    return ScoreModel(
        weights=weights, bias=bias,
        prior_intercept=float(intercept), prior_slope=float(slope),
        support=inputs.embeddings[pick].astype(np.float16),
        feature_lo=np.quantile(X[:, :N_LEARNED], q, axis=0),
        feature_hi=np.quantile(X[:, :N_LEARNED], 1.0 - q, axis=0),
        config=config,
    )


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


def fit_rows(rows: list[Row], inputs: Inputs, idx: np.ndarray,
             config: TrainConfig) -> ScoreModel:
    small, large = labels(rows)
    use, _ = training_mask(rows, idx, config)
    return fit(inputs.take(use), small[use], large[use], config)


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
