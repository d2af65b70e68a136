"""Evaluation the way router papers do it: quality against large-tier share.

- quality(s): share of prompts answered correctly when a share s of them,
  the top-scored ones, go to the large tier and the rest to the small one;
- PGR(s) = (quality(s) - quality(0)) / (quality(1) - quality(0)), the
  performance gap recovered; APGR is its average over s in [0, 1] (RouteLLM,
  Ong et al. 2024). Random routing has APGR 0.5 by construction; a perfect
  router approaches 1 (and exceeds it where the large model is worse on some
  prompts).

Cross-validated, on two kinds of split: folds of whole subjects (the `source`
field; every subject is held out once, and the model never saw it) and folds
of random rows. Each held-out fold is routed at share s by its own score
quantile (what the live ShareCalibrator does on new traffic), and the folds'
correct answers are summed. Baselines at the same shares: random routing
(its expected quality) and prompt length (longest prompts to the large tier).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .training import LinearModel, Row, TrainConfig, fit_rows, labels

REPORT_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRID = np.linspace(0.0, 1.0, 101)
DEFAULT_FOLDS = 5
SPLIT_SEED = 20240601


def subject_folds(sources: list[str], k: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> np.ndarray:
    """Fold index per row; every source's rows share a fold."""
    names = sorted(set(sources))
    if len(names) < k:
        raise ValueError(f"a subject split with {k} folds needs at least {k} sources, "
                         f"got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[s] for s in sources])


def random_folds(n: int, k: int = DEFAULT_FOLDS, seed: int = SPLIT_SEED) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % k


def quality_curve(score: np.ndarray, small: np.ndarray, large: np.ndarray, folds: np.ndarray,
                  shares: np.ndarray = GRID, seed: int = SPLIT_SEED) -> np.ndarray:
    """Quality at each share, each fold routed by its own score quantile."""
    n = len(score)
    # Ties (e.g. equal lengths) are broken at random, not by row order.
    tiebreak = np.random.default_rng(seed).permutation(n)
    total = np.zeros(len(shares))
    for f in np.unique(folds):
        idx = np.where(folds == f)[0]
        order = idx[np.lexsort((tiebreak[idx], -score[idx]))]
        gain = np.concatenate([[0.0], np.cumsum(large[order] - small[order])])
        k = np.rint(shares * len(idx)).astype(int)
        total += small[idx].sum() + gain[k]
    return total / n


def random_curve(small: np.ndarray, large: np.ndarray, folds: np.ndarray,
                 shares: np.ndarray = GRID) -> np.ndarray:
    """Expected quality of random routing at each share (same rounding per fold)."""
    total = np.zeros(len(shares))
    for f in np.unique(folds):
        idx = np.where(folds == f)[0]
        k = np.rint(shares * len(idx))
        total += small[idx].sum() + k / len(idx) * (large[idx] - small[idx]).sum()
    return total / len(small)


def apgr(curve: np.ndarray, shares: np.ndarray = GRID) -> float:
    lo, hi = curve[0], curve[-1]
    if hi == lo:
        raise ValueError("all-small and all-large quality are equal: APGR is undefined")
    pgr = (curve - lo) / (hi - lo)
    return float(np.trapezoid(pgr, shares))


@dataclass
class SplitResult:
    name: str
    folds: int
    all_small: float
    all_large: float
    shares: tuple[float, ...]
    quality: dict[str, list[float]]  # router -> quality at `shares`
    apgr: dict[str, float]  # router -> APGR

    def beats_baselines(self) -> bool:
        return self.apgr["classifier"] > max(self.apgr["random"], self.apgr["length"])

    def to_dict(self) -> dict:
        return {
            "split": self.name, "folds": self.folds,
            "all_small_quality": round(self.all_small, 5),
            "all_large_quality": round(self.all_large, 5),
            "shares": list(self.shares),
            "quality": {k: [round(x, 5) for x in v] for k, v in self.quality.items()},
            "apgr": {k: round(v, 5) for k, v in self.apgr.items()},
        }


def cross_val_scores(rows: list[Row], X: np.ndarray, folds: np.ndarray,
                     config: TrainConfig) -> np.ndarray:
    """Out-of-fold classifier scores: each fold scored by a model trained on the others."""
    scores = np.zeros(len(rows))
    for f in np.unique(folds):
        train_idx = np.where(folds != f)[0]
        test_idx = np.where(folds == f)[0]
        model = fit_rows(rows, X, train_idx, config)
        scores[test_idx] = model.score(X[test_idx])
    return scores


def evaluate_scores(name: str, scores: np.ndarray, rows: list[Row],
                    folds: np.ndarray) -> SplitResult:
    small, large = labels(rows)
    lengths = np.array([len(r.prompt) for r in rows], dtype=np.float64)
    curves = {
        "classifier": quality_curve(scores, small, large, folds),
        "random": random_curve(small, large, folds),
        "length": quality_curve(lengths, small, large, folds),
    }
    at = [int(round(s * 100)) for s in REPORT_SHARES]
    return SplitResult(
        name=name,
        folds=len(np.unique(folds)),
        all_small=float(small.mean()),
        all_large=float(large.mean()),
        shares=REPORT_SHARES,
        quality={k: [float(c[i]) for i in at] for k, c in curves.items()},
        apgr={k: apgr(c) for k, c in curves.items()},
    )


def cross_validate(rows: list[Row], X: np.ndarray, config: TrainConfig,
                   k: int = DEFAULT_FOLDS) -> list[SplitResult]:
    """Subject-held-out and random-split evaluation of the training recipe."""
    sources = [r.source for r in rows]
    results = []
    by_subject = subject_folds(sources, k)
    subject_scores = cross_val_scores(rows, X, by_subject, config)
    results.append(evaluate_scores("subject-held-out", subject_scores, rows, by_subject))
    by_row = random_folds(len(rows), k)
    results.append(evaluate_scores("random", cross_val_scores(rows, X, by_row, config),
                                   rows, by_row))
    return results


def evaluate_model(model: LinearModel, rows: list[Row], X: np.ndarray) -> SplitResult:
    """A trained model as it is, on all rows (in-sample if it was trained on them)."""
    return evaluate_scores("as-is", model.score(X), rows, np.zeros(len(rows), dtype=int))


def format_result(result: SplitResult) -> str:
    lines = [
        f"split: {result.name} ({result.folds} fold{'s' if result.folds != 1 else ''}); "
        f"quality all-small {result.all_small:.4f}, all-large {result.all_large:.4f}",
        f"{'large share':>12} {'classifier':>11} {'random':>8} {'length':>8}",
    ]
    for i, s in enumerate(result.shares):
        lines.append(f"{s:>12.0%} {result.quality['classifier'][i]:>11.4f} "
                     f"{result.quality['random'][i]:>8.4f} {result.quality['length'][i]:>8.4f}")
    lines.append(f"{'APGR':>12} {result.apgr['classifier']:>11.4f} "
                 f"{result.apgr['random']:>8.4f} {result.apgr['length']:>8.4f}")
    verdict = "beats" if result.beats_baselines() else "does NOT beat"
    lines.append(f"classifier {verdict} both baselines on the {result.name} split "
                 f"(APGR {result.apgr['classifier']:.4f} vs random {result.apgr['random']:.4f}, "
                 f"length {result.apgr['length']:.4f})")
    return "\n".join(lines)
