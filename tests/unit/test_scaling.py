"""Replica math: HPA ratio, tolerance, bounds, windows, zero, outages."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from terrace_operator.scaling import (
    Recommendation,
    ScalingPolicy,
    decide,
    raw_desired,
    stabilize,
)


def policy(**kw):
    base = dict(min_replicas=1, max_replicas=10, metric="inflight", target=4,
                scale_up_window_seconds=0, scale_down_window_seconds=0)
    base.update(kw)
    return ScalingPolicy(**base)


def test_sum_metric_is_total_over_target():
    # 18 requests in flight at 4 per replica -> 5 replicas, whatever runs now.
    assert raw_desired(policy(), 2, 18)[0] == 5
    assert raw_desired(policy(), 0, 18)[0] == 5


def test_average_metric_uses_hpa_ratio():
    p = policy(metric="latencyP95", target=200)
    assert raw_desired(p, 3, 400)[0] == 6
    assert raw_desired(p, 3, 100)[0] == 2  # ceil(1.5)


def test_tolerance_band_keeps_current():
    p = policy(metric="gpuUtilization", target=0.6, tolerance=0.1)
    assert raw_desired(p, 4, 0.65)[0] == 4  # ratio 1.083, inside 10 %
    assert raw_desired(p, 4, 0.70)[0] == 5  # ratio 1.167, outside
    # sum metric: the band applies to the per-replica average
    assert raw_desired(policy(tolerance=0.1), 4, 17)[0] == 4  # 4.25/replica
    assert raw_desired(policy(tolerance=0.1), 4, 19)[0] == 5


def test_bounds_clamp_both_ways():
    assert decide(policy(max_replicas=3), 2, 100, now=0).replicas == 3
    assert decide(policy(min_replicas=2), 5, 1, now=0).replicas == 2
    d = decide(policy(max_replicas=3), 2, 100, now=0)
    assert "bounded to [1, 3]" in d.reason


def test_scale_down_waits_for_window():
    p = policy(scale_down_window_seconds=60)
    d = decide(p, 1, 20, now=0)  # load: 5
    assert d.replicas == 5
    hist = d.history
    for t in (15, 30, 45):  # load gone, but inside the window
        d = decide(p, 5, 0, now=t, history=hist)
        hist = d.history
        assert d.replicas == 5, t
    d = decide(p, 5, 0, now=61, history=hist)
    assert d.replicas == 1
    assert "idle" not in d.reason  # min is 1, not zero


def test_scale_up_window_uses_lowest_recent_recommendation():
    p = policy(scale_up_window_seconds=30)
    d1 = decide(p, 2, 8, now=0)  # recommends 2
    d2 = decide(p, 2, 40, now=10, history=d1.history)  # spike: 10, but window saw 2
    assert d2.replicas == 2
    d3 = decide(p, 2, 40, now=31, history=d2.history)  # the low one aged out
    assert d3.replicas == 10


def test_stabilize_matches_hpa_semantics():
    hist = (Recommendation(0, 7), Recommendation(50, 3))
    # down window 100 s: highest recent is 7, so 9 -> 7 not lower
    assert stabilize(9, 2, hist, 60, 0, 100)[0] == 7
    # history older than both windows is dropped
    _, kept = stabilize(9, 2, hist, 200, 0, 100)
    assert kept == (Recommendation(200, 2),)


def test_scale_to_zero_and_back():
    p = policy(min_replicas=0, scale_down_window_seconds=30)
    hist = decide(p, 1, 4, now=0).history
    d = decide(p, 1, 0, now=10, history=hist, activation=0)
    assert d.replicas == 1  # window still holds it
    d = decide(p, 1, 0, now=40, history=d.history, activation=0)
    assert d.replicas == 0
    assert "idle" in d.reason
    # first request held at the router: back to one immediately, even with
    # a scale-up window, and even for an average-type metric
    slow = policy(min_replicas=0, scale_up_window_seconds=600, metric="latencyP95", target=100)
    hist = decide(slow, 0, 0, now=0, activation=0).history
    d = decide(slow, 0, 0, now=5, history=hist, activation=1)
    assert d.replicas == 1


def test_tier_with_min_one_never_goes_to_zero():
    d = decide(policy(min_replicas=1), 3, 0, now=0, activation=0)
    assert d.replicas == 1


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -1.0])
def test_outage_holds_and_never_scales_to_zero(bad):
    p = policy(min_replicas=0, metrics_unavailable_replicas=2)
    d = decide(p, 0, bad, now=0)
    assert d.replicas == 2 and not d.metrics_available
    d = decide(p, 5, bad, now=0)
    assert d.replicas == 5  # never down during an outage
    d = decide(policy(min_replicas=0), 0, bad, now=0)
    assert d.replicas == 1
    assert "metrics unavailable" in d.reason


def test_outage_then_recovery_still_waits_for_down_window():
    p = policy(scale_down_window_seconds=60)
    d = decide(p, 4, None, now=0)
    d = decide(p, 4, 0, now=30, history=d.history)
    assert d.replicas == 4
    d = decide(p, 4, 0, now=61, history=d.history)
    assert d.replicas == 1


def test_reason_carries_the_observed_value():
    d = decide(policy(), 1, 18, now=0)
    assert "inflight=18" in d.reason


def test_policy_validation():
    with pytest.raises(ValueError):
        ScalingPolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        ScalingPolicy(min_replicas=0, max_replicas=2, target=0)


finite = st.one_of(st.floats(min_value=-10, max_value=1e6), st.sampled_from([math.nan, math.inf]))


@settings(max_examples=400, deadline=None)
@given(
    lo=st.integers(0, 20),
    span=st.integers(0, 30),
    current=st.integers(0, 100),
    observed=st.one_of(st.none(), finite),
    activation=st.one_of(st.none(), finite),
    metric=st.sampled_from(["inflight", "rps", "latencyP95", "gpuUtilization", "custom"]),
    target=st.floats(min_value=0.01, max_value=1e4),
    up=st.integers(0, 600),
    down=st.integers(0, 600),
    unavailable=st.one_of(st.none(), st.integers(0, 50)),
    history=st.lists(st.tuples(st.floats(-1000, 0), st.integers(0, 100)), max_size=8),
)
def test_property_replicas_always_inside_bounds(
    lo, span, current, observed, activation, metric, target, up, down, unavailable, history
):
    p = ScalingPolicy(
        min_replicas=lo, max_replicas=lo + span, metric=metric, target=target,
        scale_up_window_seconds=up, scale_down_window_seconds=down,
        metrics_unavailable_replicas=unavailable,
    )
    hist = tuple(Recommendation(t, r) for t, r in history)
    d = decide(p, current, observed, now=0.0, history=hist, activation=activation)
    assert lo <= d.replicas <= lo + span
    usable = observed is not None and math.isfinite(observed) and observed >= 0
    if not usable:
        # an outage never scales down or to zero (unless max is 0)
        assert d.replicas >= min(lo + span, max(current, 1))
