"""Evaluation the way router papers do it: quality against large-tier share.

- quality(s): share of prompts answered correctly when a share s of them,
  the top-scored ones, go to the large tier and the rest to the small one;
- PGR(s) = (quality(s) - quality(0)) / (quality(1) - quality(0)), the
  performance gap recovered; APGR is its average over s in [0, 1] (RouteLLM,
  Ong et al. 2024). Random routing has APGR 0.5 by construction; a perfect
  router approaches 1 (and exceeds it where the large model is worse on some
  prompts).

Every figure is out of sample, beside two baselines at the same shares:
random routing (its expected quality) and prompt length (longest prompts to
the large tier). Two kinds of split:

- leave-subjects-out: 10 folds of whole subjects (the `source` field); each
  fold is scored by a model trained on the other nine and routed at share s
  by its own score quantile (what the live ShareCalibrator does on new
  traffic). Reported per fold, and as the mean and the worst fold.
- leave-category-out: MMLU's own categories; train on the STEM subjects and
  test on the humanities and social sciences, and the reverse: the stand-in
  for a domain the model never saw.

Rows of sources with broken labels (training.excluded_sources) are left out
of the evaluation as they are of training, and the report names them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .training import Inputs, Row, ScoreModel, TrainConfig, excluded_sources, fit_rows, labels

REPORT_SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
GRID = np.linspace(0.0, 1.0, 101)
SUBJECT_FOLDS = 10
SPLIT_SEED = 20240601
CHECK_MARGIN = 0.05
# Below this many rows of difference between the tiers, a part's APGR is a
# ratio of small numbers and swings far outside [0, 1]: flagged in reports.
SMALL_GAP_ROWS = 10

# MMLU's categories (Hendrycks et al. 2021, the benchmark's own subject
# table); "other" subjects (business, health, misc.) are in neither side.
STEM = frozenset((
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry",
    "college_computer_science", "college_mathematics", "college_physics", "computer_security",
    "conceptual_physics", "electrical_engineering", "elementary_mathematics",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics",
    "machine_learning",
))
HUMANITIES_SOCIAL = frozenset((
    "formal_logic", "high_school_european_history", "high_school_us_history",
    "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
    "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
    "world_religions",
    "econometrics", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
    "human_sexuality", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy",
))


def subject_folds(sources: list[str], k: int = SUBJECT_FOLDS,
                  seed: int = SPLIT_SEED) -> np.ndarray:
    """Fold index per row; every source's rows share a fold."""
    names = sorted(set(sources))
    if k < 2:
        raise ValueError(f"a subject split needs at least 2 folds, got {k}")
    if len(names) < k:
        raise ValueError(f"a subject split with {k} folds needs at least {k} sources, "
                         f"got {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    fold_of = {names[j]: i % k for i, j in enumerate(order)}
    return np.array([fold_of[s] for s in sources])


def category_of(source: str) -> str:
    subject = source.rsplit("/", 1)[-1]
    if subject in STEM:
        return "stem"
    if subject in HUMANITIES_SOCIAL:
        return "humanities+social"
    return "other"


def quality_curve(score: np.ndarray, small: np.ndarray, large: np.ndarray,
                  shares: np.ndarray = GRID, seed: int = SPLIT_SEED) -> np.ndarray:
    """Quality at each share when the top-scored share goes to the large tier."""
    n = len(score)
    # Ties (e.g. equal lengths) are broken at random, not by row order.
    tiebreak = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((tiebreak, -score))
    gain = np.concatenate([[0.0], np.cumsum(large[order] - small[order])])
    k = np.rint(shares * n).astype(int)
    return (small.sum() + gain[k]) / n


def random_curve(small: np.ndarray, large: np.ndarray, shares: np.ndarray = GRID) -> np.ndarray:
    """Expected quality of random routing at each share (same rounding)."""
    n = len(small)
    k = np.rint(shares * n)
    return (small.sum() + k / n * (large - small).sum()) / n


def apgr(curve: np.ndarray, shares: np.ndarray = GRID) -> float:
    lo, hi = curve[0], curve[-1]
    if hi == lo:
        raise ValueError("all-small and all-large quality are equal: APGR is undefined")
    pgr = (curve - lo) / (hi - lo)
    return float(np.trapezoid(pgr, shares))


ROUTERS = ("classifier", "length", "random")


@dataclass
class Part:
    """One held-out part of a split (a fold, or a category)."""

    name: str
    rows: int
    all_small: float
    all_large: float
    quality: dict[str, list[float]]  # router -> quality at REPORT_SHARES
    apgr: dict[str, float]  # router -> APGR

    @property
    def gap_rows(self) -> float:
        """How many more rows the large tier gets right than the small one."""
        return abs(self.all_large - self.all_small) * self.rows

    @property
    def defined(self) -> bool:
        return not math.isnan(self.apgr["classifier"])

    def to_dict(self) -> dict:
        return {
            "name": self.name, "rows": self.rows,
            "all_small_quality": round(self.all_small, 5),
            "all_large_quality": round(self.all_large, 5),
            "quality": {k: [round(x, 5) for x in v] for k, v in self.quality.items()},
            "apgr": {k: _number(v) for k, v in self.apgr.items()},
        }


def _number(x: float) -> float | None:
    """Rounded for JSON; None for an undefined (NaN) figure."""
    return None if math.isnan(x) else round(x, 5)


def evaluate_part(name: str, scores: np.ndarray, rows: list[Row]) -> Part:
    """The three routers on one set of rows, `scores` given for those rows."""
    small, large = labels(rows)
    lengths = np.array([len(r.prompt) for r in rows], dtype=np.float64)
    curves = {
        "classifier": quality_curve(scores, small, large),
        "length": quality_curve(lengths, small, large),
        "random": random_curve(small, large),
    }
    at = [int(round(s * 100)) for s in REPORT_SHARES]
    # Where both tiers are equally good on these rows there is no gap to
    # recover: APGR is undefined (NaN), and the part is left out of means.
    defined = curves["random"][-1] != curves["random"][0]
    return Part(name=name, rows=len(rows), all_small=float(small.mean()),
                all_large=float(large.mean()),
                quality={k: [float(c[i]) for i in at] for k, c in curves.items()},
                apgr={k: apgr(c) if defined else math.nan for k, c in curves.items()})


@dataclass
class SplitResult:
    name: str
    parts: list[Part]
    excluded_sources: list[str]

    def _defined(self) -> list[Part]:
        return [p for p in self.parts if p.defined]

    def mean(self, router: str) -> float:
        """Mean APGR over the parts where it is defined (NaN if none is)."""
        values = [p.apgr[router] for p in self._defined()]
        return float(np.mean(values)) if values else math.nan

    def worst_margin(self) -> float:
        """Smallest classifier-minus-length APGR over the parts where it is defined."""
        margins = [p.apgr["classifier"] - p.apgr["length"] for p in self._defined()]
        return min(margins) if margins else math.nan

    def to_dict(self) -> dict:
        return {
            "split": self.name,
            "mean_apgr": {r: _number(self.mean(r)) for r in ROUTERS},
            "worst_margin_over_length": _number(self.worst_margin()),
            "excluded_sources": self.excluded_sources,
            "parts": [p.to_dict() for p in self.parts],
        }


Fitter = Callable[[list[Row], Inputs, np.ndarray, TrainConfig], ScoreModel]


def _held_out(rows: list[Row], inputs: Inputs, train_idx: np.ndarray, test_idx: np.ndarray,
              config: TrainConfig, fitter: Fitter) -> np.ndarray:
    model = fitter(rows, inputs, train_idx, config)
    return model.score(inputs.take(test_idx))


def evaluable(rows: list[Row], config: TrainConfig) -> tuple[np.ndarray, list[str]]:
    """Indices of the rows an evaluation uses, and the sources it leaves out."""
    bad = excluded_sources(rows, np.arange(len(rows)), config.min_source_large_accuracy)
    keep = np.array([r.source not in set(bad) for r in rows], dtype=bool)
    return np.flatnonzero(keep), bad


def leave_subjects_out(rows: list[Row], inputs: Inputs, config: TrainConfig,
                       k: int = SUBJECT_FOLDS, fitter: Fitter = fit_rows) -> SplitResult:
    idx, bad = evaluable(rows, config)
    folds = subject_folds([rows[i].source for i in idx], k)
    parts = []
    for f in range(k):
        test = idx[folds == f]
        scores = _held_out(rows, inputs, idx[folds != f], test, config, fitter)
        subjects = sorted({rows[i].source.rsplit("/", 1)[-1] for i in test})
        parts.append(evaluate_part(f"fold {f}: {', '.join(subjects)}", scores,
                                   [rows[i] for i in test]))
    return SplitResult("leave-subjects-out", parts, bad)


def leave_category_out(rows: list[Row], inputs: Inputs, config: TrainConfig,
                       fitter: Fitter = fit_rows) -> SplitResult | None:
    """STEM -> humanities+social and the reverse; None when the data is not MMLU's."""
    idx, bad = evaluable(rows, config)
    cats = np.array([category_of(rows[i].source) for i in idx])
    parts = []
    for train_cat, test_cat in (("stem", "humanities+social"), ("humanities+social", "stem")):
        train, test = idx[cats == train_cat], idx[cats == test_cat]
        if len(train) < 10 or len(test) < 10:
            return None
        scores = _held_out(rows, inputs, train, test, config, fitter)
        parts.append(evaluate_part(f"train {train_cat}, test {test_cat}", scores,
                                   [rows[i] for i in test]))
    return SplitResult("leave-category-out", parts, bad)


def out_of_fold_scores(rows: list[Row], inputs: Inputs, config: TrainConfig,
                       k: int = SUBJECT_FOLDS) -> np.ndarray:
    """Every row's score from a model that never saw its subject (for simulations
    that must not be in-sample); rows of excluded sources are scored too."""
    folds = subject_folds([r.source for r in rows], k)
    scores = np.zeros(len(rows))
    for f in range(k):
        test = np.flatnonzero(folds == f)
        scores[test] = _held_out(rows, inputs, np.flatnonzero(folds != f), test, config,
                                 fit_rows)
    return scores


def cross_validate(rows: list[Row], inputs: Inputs, config: TrainConfig,
                   k: int = SUBJECT_FOLDS) -> list[SplitResult]:
    results = [leave_subjects_out(rows, inputs, config, k)]
    category = leave_category_out(rows, inputs, config)
    if category is not None:
        results.append(category)
    return results


def check(subjects: SplitResult, margin: float = CHECK_MARGIN) -> tuple[bool, str]:
    """The bar a shipped model must clear: on leave-subjects-out folds the mean APGR
    beats length by `margin`, and no fold falls below length."""
    gain = subjects.mean("classifier") - subjects.mean("length")
    worst = subjects.worst_margin()
    ok = bool(gain >= margin and worst >= 0.0)  # False when undefined (NaN)
    return ok, (f"mean APGR {subjects.mean('classifier'):.4f} vs length "
                f"{subjects.mean('length'):.4f} (margin {gain:+.4f}, needs >= {margin:+.2f}); "
                f"worst fold vs length {worst:+.4f} (needs >= 0)")


def format_result(result: SplitResult) -> str:
    lines = [f"split: {result.name}"
             + (f" (left out, broken labels: {', '.join(result.excluded_sources)})"
                if result.excluded_sources else ""),
             f"{'held-out part':<60} {'rows':>5} {'classifier':>10} {'length':>7} "
             f"{'random':>7} {'margin':>7}"]
    for p in result.parts:
        name = p.name if len(p.name) <= 60 else p.name[:57] + "..."
        if not p.defined:
            lines.append(f"{name:<60} {p.rows:>5} undefined: both tiers equally good here "
                         f"({p.all_small:.4f}); left out of the mean")
            continue
        lines.append(f"{name:<60} {p.rows:>5} {p.apgr['classifier']:>10.4f} "
                     f"{p.apgr['length']:>7.4f} {p.apgr['random']:>7.4f} "
                     f"{p.apgr['classifier'] - p.apgr['length']:>+7.4f}"
                     + (f"  small gap: {p.gap_rows:.0f} rows, APGR unstable"
                        if p.gap_rows < SMALL_GAP_ROWS else ""))
    lines.append(f"{'mean APGR':<60} {'':>5} {result.mean('classifier'):>10.4f} "
                 f"{result.mean('length'):>7.4f} {result.mean('random'):>7.4f} "
                 f"{result.mean('classifier') - result.mean('length'):>+7.4f}")
    lines.append(f"worst part vs length: {result.worst_margin():+.4f}")
    return "\n".join(lines)


def format_quality(part: Part) -> str:
    """Quality at each large-tier share, the three routers side by side."""
    lines = [f"{part.name}: quality all-small {part.all_small:.4f}, all-large "
             f"{part.all_large:.4f}",
             f"{'large share':>12} {'classifier':>11} {'length':>8} {'random':>8}"]
    for i, s in enumerate(REPORT_SHARES):
        lines.append(f"{s:>12.0%} {part.quality['classifier'][i]:>11.4f} "
                     f"{part.quality['length'][i]:>8.4f} {part.quality['random'][i]:>8.4f}")
    return "\n".join(lines)
