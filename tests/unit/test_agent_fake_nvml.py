"""The fake NVML backend's physics and the agent's apply/read-back/restore logic."""

from __future__ import annotations

import json
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, start_http_server
from terrace_operator.agent.backend import BackendError, NeedsReinit
from terrace_operator.agent.core import PowerAgent
from terrace_operator.agent.fake import (
    MODELS,
    FakeNvmlBackend,
    allowed_speed,
    file_load,
    operating_point,
    runtime_metrics_load,
)
from terrace_operator.agent.metrics import AgentCollector
from terrace_runtime.metrics import RuntimeMetrics


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def fake(count=1, model="h100", demand=0.0):
    clock = Clock()
    loads = {"u": demand}
    b = FakeNvmlBackend(count, model, lambda i: loads["u"], clock=clock)
    b.init()
    return b, clock, loads


def test_power_is_min_of_limit_and_demand_at_full_load():
    m = MODELS["h100"]
    for limit in (200, 350, 500, 699, 700):
        p, busy, s, _ = operating_point(m, limit, 1.0)
        assert p == pytest.approx(min(limit, 700))
        assert busy == 1.0
    # not binding: full speed, power is the demand
    p, busy, s, work = operating_point(m, 700, 0.3)
    assert s == 1.0 and work == pytest.approx(0.3)
    assert p == pytest.approx(70 + 0.3 * 630)


def test_calibration_point_and_throughput_falls_as_limit_drops():
    m = MODELS["h100"]
    # 700 -> 600 W costs 5-8 % of throughput (the published anchor)
    assert 0.92 <= allowed_speed(m, 600) <= 0.95
    speeds = [allowed_speed(m, w) for w in range(200, 701, 50)]
    assert speeds == sorted(speeds)
    assert speeds[-1] == 1.0 and speeds[0] < 0.7


@settings(max_examples=300, deadline=None)
@given(model=st.sampled_from(sorted(MODELS)), frac=st.floats(0, 1), u=st.floats(0, 1))
def test_power_never_above_limit_or_below_idle(model, frac, u):
    m = MODELS[model]
    limit = m.min_limit_watts + frac * (m.tdp_watts - m.min_limit_watts)
    p, busy, s, work = operating_point(m, limit, u)
    assert m.idle_watts - 1e-9 <= p <= limit + 1e-6
    assert 0 <= work <= u + 1e-9
    assert 0 <= busy <= 1


def test_energy_counter_only_grows_and_power_is_one_second_average():
    b, clock, loads = fake()
    e0 = b.total_energy_mj(0)
    clock.t += 10
    assert b.total_energy_mj(0) - e0 == pytest.approx(70 * 10 * 1000, rel=1e-6)  # idle
    loads["u"] = 1.0
    b.total_energy_mj(0)  # demand change observed here
    clock.t += 0.5
    # half a second at 700 W, half of the trailing second still at idle
    assert b.power_usage_mw(0) / 1000 == pytest.approx((700 * 0.5 + 70 * 0.5), rel=0.02)
    clock.t += 2
    assert b.power_usage_mw(0) / 1000 == pytest.approx(700, rel=1e-3)
    last = b.total_energy_mj(0)
    for limit in (300_000, 200_000, 700_000):
        b.set_power_limit_mw(0, limit)
        clock.t += 1
        now = b.total_energy_mj(0)
        assert now > last
        last = now
    assert b.power_usage_mw(0) / 1000 == pytest.approx(700, rel=1e-3)


def test_limit_binds_under_load():
    b, clock, loads = fake(demand=1.0)
    b.set_power_limit_mw(0, 300_000)
    clock.t += 3
    assert b.power_usage_mw(0) == pytest.approx(300_000, rel=1e-3)
    assert b.enforced_power_limit_mw(0) == 300_000


def test_set_outside_constraints_is_rejected_like_nvml():
    b, _, _ = fake(model="l4")
    assert b.power_limit_constraints_mw(0) == (40_000, 72_000)
    with pytest.raises(BackendError, match="Invalid Argument"):
        b.set_power_limit_mw(0, 30_000)


def test_driver_reload_resets_limit_and_needs_reinit():
    b, clock, _ = fake()
    b.set_power_limit_mw(0, 300_000)
    b.simulate_driver_reload()
    with pytest.raises(NeedsReinit):
        b.enforced_power_limit_mw(0)
    b.init()
    assert b.enforced_power_limit_mw(0) == 700_000


def test_agent_clamps_to_device_constraints_and_reads_back():
    b, clock, _ = fake(count=2)
    agent = PowerAgent(b, "gpu-node")
    agent.start()
    reports = agent.reconcile(50)  # below the 200 W floor
    assert [r.enforced_watts for r in reports] == [200, 200]
    reports = agent.reconcile(5000)
    assert [r.enforced_watts for r in reports] == [700, 700]
    reports = agent.reconcile(420)
    assert {r.enforced_watts for r in reports} == {420}
    assert reports[0].min_watts == 200 and reports[0].default_watts == 700
    # nothing changes on a second pass with the same value
    calls = len(b.set_calls)
    agent.reconcile(420)
    assert len(b.set_calls) == calls


def test_agent_reapplies_after_driver_reload_and_energy_stays_monotonic():
    b, clock, loads = fake()
    loads["u"] = 0.5
    agent = PowerAgent(b, "gpu-node")
    agent.start()
    agent.reconcile(300)
    clock.t += 5
    agent.reconcile(300)
    before = agent.gpus[0].energy_joules
    assert before > 0
    b.simulate_driver_reload()
    clock.t += 1
    agent.reconcile(300)  # notices the driver is gone
    clock.t += 1
    reports = agent.reconcile(300)  # re-inits and re-applies
    assert reports[0].enforced_watts == 300
    assert agent.reinit_total == 1 and agent.reapplied_total == 1
    clock.t += 5
    agent.reconcile(300)
    assert agent.gpus[0].energy_joules > before


def test_agent_restores_defaults_and_leaves_unmanaged_gpus_alone():
    b, clock, _ = fake(count=2)
    agent = PowerAgent(b, "gpu-node")
    agent.start()
    agent.reconcile(None)
    assert b.set_calls == []  # policy off: the GPU is left alone
    agent.reconcile(250)
    agent.restore_defaults()
    assert [b.enforced_power_limit_mw(i) for i in (0, 1)] == [700_000, 700_000]
    # desired removed (operator asked for nothing): back to default once
    agent.reconcile(300)
    agent.reconcile(None)
    assert b.enforced_power_limit_mw(0) == 700_000
    n = len(b.set_calls)
    agent.reconcile(None)
    assert len(b.set_calls) == n


def test_agent_metrics_over_real_http():
    b, clock, loads = fake()
    loads["u"] = 1.0
    agent = PowerAgent(b, "gpu-node")
    agent.start()
    agent.reconcile(400)
    clock.t += 2
    agent.reconcile(400)
    reg = CollectorRegistry()
    reg.register(AgentCollector(agent))
    server, _ = start_http_server(0, "127.0.0.1", reg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics") as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'terrace_gpu_power_limit_watts{gpu="0",node="gpu-node"' in text
    line = next(x for x in text.splitlines() if x.startswith("terrace_gpu_power_limit_watts{"))
    assert float(line.split()[-1]) == 400.0
    assert "terrace_gpu_energy_joules_total{" in text
    power = next(x for x in text.splitlines() if x.startswith("terrace_gpu_power_watts{"))
    assert float(power.split()[-1]) == pytest.approx(400, rel=0.01)
    util = next(x for x in text.splitlines() if x.startswith("terrace_gpu_utilization_ratio{"))
    assert float(util.split()[-1]) == 1.0


def test_file_load(tmp_path):
    f = tmp_path / "load"
    read = file_load(f)
    assert read(0) == 0.0  # missing file: idle
    f.write_text("0.7")
    assert read(3) == 0.7
    f.write_text(json.dumps({"1": 0.2, "*": 0.9}))
    assert read(1) == 0.2 and read(0) == 0.9


def test_runtime_metrics_load_over_real_http():
    # The runtime's own metrics (its registry, as its /metrics serves them).
    metrics = RuntimeMetrics("m", energy=None)
    server, thread = start_http_server(0, "127.0.0.1", metrics.registry)
    clock = Clock()
    try:
        read = runtime_metrics_load(f"http://127.0.0.1:{server.server_port}/metrics", clock)
        assert read(0) == 0.0
        clock.t += 2
        metrics.observe_batch(1, wall_s=1.2, cpu_s=0.0)  # busy 1.2 s of the last 2
        assert read(0) == pytest.approx(0.6)
        clock.t += 0.5  # polled at most once a second
        metrics.observe_batch(1, wall_s=98.8, cpu_s=0.0)
        assert read(0) == pytest.approx(0.6)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
