"""The budget-following cut-off: a tier's measured capacity (budget.measure),
the router's effective share from its tiers' statuses (budget.router_share),
and the router's calibration following it without losing its window."""

from __future__ import annotations

import numpy as np
import pytest
from terrace_operator.budget import (
    HEADROOM,
    Capacity,
    UpperTier,
    effective_share,
    measure,
    router_share,
)
from terrace_router.calibration import ShareCalibrator
from terrace_router.config import RouterConfig
from terrace_router.state import RouterState


def fresh(**kw):
    args = dict(served_rps=8.0, ready_replicas=2, max_replicas=4, observed=8.0, target=4.0)
    args.update(kw)
    return measure(None, **args)


def test_capacity_is_what_max_replicas_serve_at_the_target():
    # 4 req/s per replica at twice the target: 2 req/s per replica at it.
    c = fresh()
    assert c.per_replica_rps == pytest.approx(2.0) and c.rps == pytest.approx(8.0)
    # A p95 over its latency target binds harder than the metric does.
    c = fresh(latency_ms=2000, latency_target_ms=500)
    assert c.per_replica_rps == pytest.approx(1.0)
    # A sum metric (in flight, req/s) is the tier's total: per replica, 16
    # in flight on 2 replicas is the same twice-the-target.
    assert fresh(observed=16.0, observed_is_total=True).per_replica_rps == pytest.approx(2.0)
    # A p95 inside its target does not raise it above the metric's figure.
    assert fresh(latency_ms=100, latency_target_ms=500).per_replica_rps == pytest.approx(2.0)


def test_too_little_load_is_not_measured_and_nothing_is_made_up():
    assert fresh(observed=0.1) is None  # under 10 % of the target: noise
    assert fresh(served_rps=0.0) is None
    assert fresh(ready_replicas=0) is None
    assert fresh(observed=None) is None  # a custom metric says nothing about load
    last = Capacity(3.0, 4, 700)
    kept = measure(last, served_rps=None, ready_replicas=2, max_replicas=6, observed=None,
                   target=4.0, watts=700)  # fmt: skip
    assert kept == Capacity(3.0, 6, 700)  # the new replicas.max counts at once


def test_a_lowered_limit_cuts_capacity_at_once_a_raised_one_waits_for_traffic():
    last = Capacity(4.0, 2, 700)
    idle = dict(served_rps=0.0, ready_replicas=2, max_replicas=2, observed=0.0, target=4.0)
    lowered = measure(last, watts=350, **idle)
    assert lowered == Capacity(2.0, 2, 350)  # proportional: throughput falls slower than watts
    assert measure(lowered, watts=700, **idle) == Capacity(2.0, 2, 350)  # not guessed upwards
    # Traffic under the raised limit measures it (no smoothing across limits).
    busy = measure(lowered, served_rps=6.0, ready_replicas=2, max_replicas=2, observed=3.0,
                   target=4.0, watts=700)  # fmt: skip
    assert busy == Capacity(4.0, 2, 700)
    # At the same limit, measurements are smoothed.
    again = measure(busy, served_rps=4.0, ready_replicas=2, max_replicas=2, observed=4.0,
                    target=4.0, watts=700)  # fmt: skip
    assert again.per_replica_rps == pytest.approx(3.0)


def test_share_keeps_the_target_while_the_upper_tier_can_take_it():
    s = effective_share(0.4, 10.0, [UpperTier("big", 10.0, 700, 700)])
    assert (s.value, s.reason, s.percent) == (0.4, "Target", 40)
    assert effective_share(0.4, 0.0, [UpperTier("big", 1.0)]).reason == "NoDemand"
    assert effective_share(0.4, None, [UpperTier("big", 1.0)]).reason == "NoDemand"
    assert effective_share(0.4, 10.0, [UpperTier("big", None)]).value == 0.4  # not measured
    assert effective_share(0.4, 10.0, []).value == 0.4


def test_a_capped_tier_lowers_the_share_to_what_it_serves_and_says_why():
    s = effective_share(0.4, 20.0, [UpperTier("big", 5.0, 400, 700)])
    assert s.value == pytest.approx(HEADROOM * 5.0 / 20.0) and s.percent == 22
    assert s.reason == "PowerCapped" and "big" in s.message and "400 W of 700 W" in s.message
    # The same capacity without a cap: the tier is saturated.
    assert effective_share(0.4, 20.0, [UpperTier("big", 5.0, 700, 700)]).reason == "Saturated"
    assert effective_share(0.4, 20.0, [UpperTier("big", 5.0)]).reason == "Saturated"


def test_several_upper_tiers_each_get_an_even_part_and_the_weakest_binds():
    # The calibrator gives each of u upper tiers share / u of the demand.
    uppers = [UpperTier("mid", 9.0), UpperTier("big", 2.0, 300, 700)]
    s = effective_share(0.5, 20.0, uppers)
    assert s.value == pytest.approx(2 * HEADROOM * 2.0 / 20.0) and s.reason == "PowerCapped"
    assert "big" in s.message


def test_router_share_reads_the_tiers_statuses_in_order():
    statuses = [
        ("small", {"demandRequestsPerSecond": "12"}, None),
        ("big", {"demandRequestsPerSecond": "8", "capacityRequestsPerSecond": "4.5",
                 "desiredPowerLimitWatts": 350}, 700),  # fmt: skip
    ]
    s = router_share(0.4, statuses)
    assert s.reason == "PowerCapped" and s.value == pytest.approx(HEADROOM * 4.5 / 20)
    # Garbage in a status is unknown, never a number.
    statuses[1][1]["capacityRequestsPerSecond"] = "NaN"
    assert router_share(0.4, statuses).value == 0.4


def test_the_calibrator_follows_a_new_aim_and_keeps_its_window():
    rng = np.random.default_rng(7)
    cal = ShareCalibrator(target_large_share=0.4, window=500, warmup=50)
    for x in rng.random(600):
        cal.route(float(x), 2)
    cal.retarget(0.1)
    assert cal.warm  # no cold start: the window is still there
    routed = [cal.route(float(x), 2) for x in rng.random(2000)]
    assert np.mean(routed) == pytest.approx(0.1, abs=0.03)
    with pytest.raises(ValueError):
        cal.retarget(1.5)


def test_router_state_aims_at_the_lower_of_target_and_effective_share():
    def config(effective):
        return RouterConfig.model_validate(
            {
                "tiers": [
                    {"name": "small", "endpoints": ["http://127.0.0.1:1"]},
                    {"name": "big", "endpoints": ["http://127.0.0.1:2"]},
                ],
                "calibration": {"target_large_share": 0.4, "effective_large_share": effective},
            }
        )

    first = RouterState.build(config(None))
    assert first.calibrator.target_large_share == 0.4
    capped = RouterState.build(config(0.15), previous=first)
    assert capped.calibrator is first.calibrator  # the same window, a new aim
    assert capped.calibrator.target_large_share == 0.15
    assert config(0.9).calibration.aim == 0.4  # never above the target
    back = RouterState.build(config(None), previous=capped)
    assert back.calibrator is first.calibrator and back.calibrator.target_large_share == 0.4
