"""Power policy: bounds, device constraints, windows, hysteresis, property tests."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from terrace_operator.power import (
    CapWindow,
    DeviceConstraints,
    PowerObservation,
    PowerPolicy,
    PowerState,
    decide_power,
    effective_bounds,
)

NOON = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
H100 = DeviceConstraints(200, 700, 700)


def adaptive(**kw):
    return PowerPolicy(**{"policy": "adaptive", "min_watts": 200, "max_watts": 700, **kw})


def obs(util=None, p95=None, target=500.0):
    return PowerObservation(util, p95, target)


def test_off_leaves_gpu_alone():
    d = decide_power(PowerPolicy(policy="off"), PowerState(400), obs(0.1), NOON, H100)
    assert d.watts is None


def test_fixed_applies_max_watts_capped_by_device():
    d = decide_power(PowerPolicy("fixed", 100, 900), PowerState(), obs(), NOON, H100)
    assert d.watts == 700
    d = decide_power(PowerPolicy("fixed", 200, 450), PowerState(), obs(), NOON, H100)
    assert d.watts == 450


def test_starts_at_max_when_unknown_then_lowers_when_idle_with_headroom():
    p = adaptive()
    d = decide_power(p, PowerState(), obs(0.05, 50), NOON, H100)
    assert d.watts == 675  # one 5 % step (25 W) below max
    assert "lower" in d.reason


def test_lowering_walks_down_to_minimum_and_stops():
    p = adaptive()
    state = PowerState(700)
    t = NOON
    for _ in range(40):
        d = decide_power(p, state, obs(0.0, None), t, H100)
        state = d.state
        t += timedelta(seconds=15)
    assert state.watts == 200
    assert "minimum" in d.reason


def test_raise_as_latency_nears_target_and_jump_when_past():
    p = adaptive()
    d = decide_power(p, PowerState(300), obs(0.6, 420, 500), NOON, H100)  # 84 % of target
    assert d.watts == 300 + 125
    d = decide_power(p, PowerState(300), obs(0.6, 510, 500), NOON, H100)
    assert d.watts == 700
    d = decide_power(p, PowerState(300), obs(0.99, None, None), NOON, H100)
    assert d.watts == 700


def test_hysteresis_band_holds():
    p = adaptive()
    # latency between lowerAt (60 %) and raiseAt (80 %): hold
    d = decide_power(p, PowerState(400), obs(0.3, 350, 500), NOON, H100)
    assert d.watts == 400 and d.reason.startswith("hold")
    # low latency but utilization between low and high: hold
    d = decide_power(p, PowerState(400), obs(0.7, 100, 500), NOON, H100)
    assert d.watts == 400


def test_cooldown_after_raise_prevents_flapping():
    p = adaptive(cooldown_seconds=60)
    up = decide_power(p, PowerState(300), obs(0.9, None), NOON, H100)
    assert up.watts > 300
    d = decide_power(p, up.state, obs(0.1, 10), NOON + timedelta(seconds=30), H100)
    assert d.watts == up.watts and "cooldown" in d.reason
    d = decide_power(p, up.state, obs(0.1, 10), NOON + timedelta(seconds=61), H100)
    assert d.watts < up.watts


def test_no_flapping_under_steady_signal():
    # A steady mid signal must converge and then stay put.
    p = adaptive()
    state = PowerState(700)
    seen = []
    for i in range(50):
        d = decide_power(p, state, obs(0.6, 330, 500), NOON + timedelta(seconds=15 * i), H100)
        state = d.state
        seen.append(d.watts)
    assert len(set(seen)) == 1


def test_window_caps_and_wins_over_min_watts():
    w = CapWindow("0 17-21 * * *", 400, duration_seconds=3600)
    p = adaptive(windows=(w,))
    evening = datetime(2025, 6, 2, 18, 30, tzinfo=UTC)
    d = decide_power(p, PowerState(700), obs(0.99, 900), evening, H100)
    assert d.watts == 400 and "window" in d.reason
    assert decide_power(p, PowerState(700), obs(0.99, 900), NOON, H100).watts == 700
    # open exactly at the firing instant, closed after the duration (22:00)
    assert w.active(datetime(2025, 6, 2, 17, 0, tzinfo=UTC))
    assert w.active(datetime(2025, 6, 2, 21, 59, tzinfo=UTC))
    assert not w.active(datetime(2025, 6, 2, 22, 0, tzinfo=UTC))
    # without a duration: open during every minute the expression matches
    minutes = CapWindow("* 17-21 * * *", 400)
    assert minutes.active(datetime(2025, 6, 2, 21, 59, 59, tzinfo=UTC))
    assert not minutes.active(datetime(2025, 6, 2, 22, 0, tzinfo=UTC))
    assert not CapWindow("0 17-21 * * *", 400).active(datetime(2025, 6, 2, 17, 1, tzinfo=UTC))
    # two windows: the lowest active one wins
    two = adaptive(windows=(CapWindow("* * * * *", 500), CapWindow("* 12 * * *", 300)))
    assert effective_bounds(two, H100, NOON)[1] == 300
    # a window below minWatts wins over minWatts but not over the device
    low = adaptive(min_watts=300, windows=(CapWindow("* * * * *", 250),))
    assert effective_bounds(low, H100, NOON)[:2] == (250, 250)
    lower = adaptive(windows=(CapWindow("* * * * *", 50),))
    assert effective_bounds(lower, H100, NOON)[:2] == (200, 200)


def test_window_time_zone():
    w = CapWindow("0 17 * * *", 300, duration_seconds=3600, time_zone="Europe/Berlin")
    assert w.active(datetime(2025, 6, 2, 15, 30, tzinfo=UTC))  # 17:30 CEST
    assert not w.active(datetime(2025, 6, 2, 17, 30, tzinfo=UTC))


def test_invalid_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="cron"):
        CapWindow("not a cron", 300)
    with pytest.raises(ValueError, match="minWatts"):
        PowerPolicy("adaptive", 500, 400)
    with pytest.raises(ValueError, match="bounds unknown"):
        decide_power(PowerPolicy("adaptive"), PowerState(), obs(), NOON, None)


def test_device_constraints_from_milliwatts_round_inwards():
    c = DeviceConstraints.from_milliwatts(100_500, 399_700, 400_000)
    assert (c.min_watts, c.max_watts, c.default_watts) == (101, 399, 400)


def test_limit_outside_new_bounds_is_pulled_in_at_once():
    d = decide_power(adaptive(max_watts=500), PowerState(700), obs(0.5, 300), NOON, H100)
    assert d.watts == 500


maybe = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)
)


@settings(max_examples=500, deadline=None)
@given(
    policy=st.sampled_from(["adaptive", "fixed"]),
    spec_lo=st.one_of(st.none(), st.integers(0, 1500)),
    spec_span=st.integers(0, 1500),
    dev_lo=st.integers(1, 600),
    dev_span=st.integers(0, 800),
    last=st.one_of(st.none(), st.integers(-100, 3000)),
    util=maybe,
    p95=maybe,
    target=maybe,
    window_watts=st.one_of(st.none(), st.integers(0, 2000)),
    minute=st.integers(0, 60 * 24 * 7),
)
def test_property_limit_always_inside_device_constraints(
    policy, spec_lo, spec_span, dev_lo, dev_span, last, util, p95, target, window_watts, minute
):
    device = DeviceConstraints(dev_lo, dev_lo + dev_span)
    windows = (CapWindow("* 17-21 * * *", window_watts),) if window_watts is not None else ()
    spec_hi = None if spec_lo is None else spec_lo + spec_span
    p = PowerPolicy(policy, spec_lo, spec_hi, windows)
    now = NOON + timedelta(minutes=minute)
    d = decide_power(p, PowerState(last), PowerObservation(util, p95, target), now, device)
    assert isinstance(d.watts, int)
    assert device.min_watts <= d.watts <= device.max_watts
    if spec_hi is not None and spec_hi >= device.min_watts:
        assert d.watts <= spec_hi
    if d.active_windows and window_watts is not None and window_watts >= device.min_watts:
        assert d.watts <= window_watts
    if spec_lo is not None and not d.active_windows and spec_lo <= device.max_watts:
        assert d.watts >= spec_lo
