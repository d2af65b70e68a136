"""ShareCalibrator: the live quantile keeps the realized large-tier share at target."""

from __future__ import annotations

import math

import numpy as np
import pytest
from terrace_router.calibration import ShareCalibrator


def _route_all(cal: ShareCalibrator, scores: np.ndarray, n_tiers: int = 2) -> np.ndarray:
    return np.array([cal.route(float(s), n_tiers) for s in scores])


def test_uses_initial_threshold_until_warm() -> None:
    cal = ShareCalibrator(target_large_share=0.3, window=100, warmup=10, initial_threshold=0.6)
    assert cal.threshold == 0.6 and not cal.warm
    assert cal.route(0.59, 2) == 0
    assert cal.route(0.61, 2) == 1
    for _ in range(8):
        cal.route(0.1, 2)
    assert cal.warm
    assert cal.threshold != 0.6


def test_threshold_is_the_window_quantile() -> None:
    rng = np.random.default_rng(1)
    cal = ShareCalibrator(target_large_share=0.25, window=300, warmup=10, initial_threshold=0.5)
    scores = rng.random(1000)
    _route_all(cal, scores)
    # Only the last `window` scores count: the ring buffer dropped the rest.
    assert cal.threshold == pytest.approx(np.quantile(scores[-300:], 0.75), abs=1e-12)


def test_realized_share_holds_when_traffic_gets_harder() -> None:
    """The RouteLLM failure: a threshold fixed for 30% drifts when the mix shifts."""
    rng = np.random.default_rng(7)
    easy = rng.beta(2, 5, 4000)  # the traffic the static threshold was set on
    hard = np.clip(rng.beta(5, 2, 4000), 0, 1)  # then every prompt gets harder
    static_threshold = float(np.quantile(easy, 0.7))
    cal = ShareCalibrator(target_large_share=0.3, window=2000, warmup=50,
                          initial_threshold=static_threshold)
    _route_all(cal, easy)
    tiers = _route_all(cal, hard)
    # Measure after the window has turned over to the new mix.
    calibrated = float((tiers[2000:] > 0).mean())
    static = float((hard[2000:] >= static_threshold).mean())
    print(f"\nshare past tier 0 after the shift: calibrated {calibrated:.3f}, "
          f"static {static:.3f} (target 0.300)")
    assert abs(calibrated - 0.3) < 0.03
    assert abs(static - 0.3) > 0.4
    assert cal.realized_share() == pytest.approx(calibrated, abs=0.03)


def test_realized_share_holds_when_traffic_gets_easier() -> None:
    rng = np.random.default_rng(8)
    hard = rng.beta(5, 2, 3000)
    easy = rng.beta(2, 5, 3000)
    cal = ShareCalibrator(target_large_share=0.3, window=1000, warmup=50,
                          initial_threshold=float(np.quantile(hard, 0.7)))
    _route_all(cal, hard)
    tiers = _route_all(cal, easy)
    static = float((easy >= np.quantile(hard, 0.7)).mean())
    assert abs(float((tiers[1000:] > 0).mean()) - 0.3) < 0.03
    assert static < 0.05


def test_three_tiers_split_the_upper_mass_evenly() -> None:
    rng = np.random.default_rng(3)
    cal = ShareCalibrator(target_large_share=0.4, window=2000, warmup=50, initial_threshold=0.5)
    tiers = _route_all(cal, rng.random(6000), n_tiers=3)[2000:]
    shares = np.bincount(tiers, minlength=3) / len(tiers)
    assert shares == pytest.approx([0.6, 0.2, 0.2], abs=0.03)
    lo, hi = cal.thresholds(3)
    assert lo < hi and lo == pytest.approx(cal.threshold)


def test_cold_three_tiers_divide_above_initial_threshold() -> None:
    cal = ShareCalibrator(target_large_share=0.3, window=100, warmup=100, initial_threshold=0.6)
    assert cal.thresholds(3) == pytest.approx([0.6, 0.8])
    assert [cal.route(s, 3) for s in (0.5, 0.7, 0.9)] == [0, 1, 2]


def test_extreme_targets_and_bad_scores() -> None:
    never = ShareCalibrator(target_large_share=0.0, window=10, warmup=1, initial_threshold=0.5)
    always = ShareCalibrator(target_large_share=1.0, window=10, warmup=1, initial_threshold=0.5)
    assert {never.route(s, 2) for s in (0.0, 0.5, 1.0)} == {0}
    assert {always.route(s, 2) for s in (0.0, 0.5, 1.0)} == {1}
    assert never.threshold == math.inf
    assert never.route(float("nan"), 2) == 0
    assert always.route(0.3, 1) == 0  # one tier: nothing to choose


@pytest.mark.parametrize("kwargs", [
    {"target_large_share": 1.5}, {"target_large_share": -0.1}, {"window": 0}, {"warmup": -1},
    {"initial_threshold": float("nan")},
])
def test_rejects_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ShareCalibrator(**kwargs)


def test_a_tentative_route_leaves_the_window_alone_until_recorded() -> None:
    """A request that may yet be refused (batch work the router sheds) must
    not move the quantile each time it is retried."""
    cal = ShareCalibrator(target_large_share=0.3, window=100, warmup=10)
    rng = np.random.default_rng(3)
    for x in rng.random(100):
        cal.route(float(x), 2)
    before = cal.threshold
    for _ in range(500):  # the same hard line, shed and retried
        assert cal.route(0.99, 2, record=False) == 1
    assert cal.threshold == before and cal.realized_share() == pytest.approx(0.3, abs=0.05)
    cal.record(0.99, 1)  # taken once: counted once
    assert cal.threshold >= before
