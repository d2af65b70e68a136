"""A fake NVML backend with a physical model of a GPU under a power limit.

It stands in for real GPUs in tests, in the demo, and in `bench/energy.py`.
Every constant is in `MODELS` with its source; docs/power.md explains them.

The model (per GPU), for a demand ``u`` in [0, 1] (the fraction of time the
GPU would be busy at full clocks) and a limit ``L``:

* busy power at full clocks is ``peak`` (the workload's unconstrained draw,
  TDP by default), idle power is ``idle``;
* the power limiter lowers clocks until busy power fits under ``L``; dynamic
  power scales as speed**alpha (DVFS: P ~ f V^2), so the speed a limit allows
  is ``s = ((L - idle) / (peak - idle)) ** (1 / alpha)``, capped at 1:
  throughput falls as a binding limit drops;
* a slower GPU is busy longer: busy fraction ``b = min(1, u / s)``;
* average power ``P = idle + b * (peak - idle) * s**alpha``. At full demand
  this is exactly ``min(L, peak)`` (power = min(limit, demand)); at partial
  demand it is below both, because the limiter acts on power while busy;
* work served per second (relative to one full-speed GPU) is ``b * s``.

``alpha`` = 2.6 is calibrated to one published point (an H100 capped from
700 W to 600 W loses 5-8 % of LLM-inference throughput: s(600) = 0.934 with
idle 70 W) and sits inside the DVFS textbook range 2-3.

NVML behaviour reproduced: limits in milliwatts, clamped to the constraints
(an out-of-range set raises, as NVML's INVALID_ARGUMENT does), a power
reading averaged over the last second, a total-energy counter in millijoules
that only grows (until a simulated driver reload resets it, as the real one
does), and a driver reload that drops limits back to default and makes every
call fail with "uninitialized" until ``init()`` runs again.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from terrace_operator.agent.backend import BackendError, NeedsReinit


@dataclass(frozen=True)
class GpuModel:
    name: str
    tdp_watts: float  # default limit and max constraint
    min_limit_watts: float  # min constraint
    idle_watts: float
    alpha: float = 2.6
    source: str = ""


MODELS: dict[str, GpuModel] = {
    "h100": GpuModel(
        "NVIDIA H100 80GB HBM3", 700, 200, 70,
        source="NVIDIA H100 datasheet: SXM5 max TDP 700 W, configurable down to 200 W; "
        "idle ~70 W as nvidia-smi reports for an idle SXM5 in P0",
    ),
    "a100": GpuModel(
        "NVIDIA A100-SXM4-80GB", 400, 100, 55,
        source="NVIDIA A100 datasheet: SXM4 TDP 400 W; NVML min constraint 100 W; "
        "idle ~55 W as nvidia-smi reports",
    ),
    "l4": GpuModel(
        "NVIDIA L4", 72, 40, 16,
        source="NVIDIA L4 datasheet: 72 W max, configurable 40-72 W; idle ~16 W (P8)",
    ),
}


def allowed_speed(model: GpuModel, limit_watts, peak_watts=None):
    """Clock/throughput factor a limit allows (1.0 when it does not bind).

    Works on floats and numpy arrays alike (the benchmark vectorises it).
    """
    peak = model.tdp_watts if peak_watts is None else peak_watts
    dyn = peak - model.idle_watts
    x = (limit_watts - model.idle_watts) / dyn
    # clip without numpy so this module stays importable without it
    if hasattr(x, "clip"):
        return x.clip(1e-6, 1.0) ** (1.0 / model.alpha)
    return min(1.0, max(1e-6, x)) ** (1.0 / model.alpha)


def operating_point(model: GpuModel, limit_watts, demand, peak_watts=None):
    """(power W, busy fraction, speed, work served) for a limit and a demand in [0, 1]."""
    peak = model.tdp_watts if peak_watts is None else peak_watts
    s = allowed_speed(model, limit_watts, peak)
    if hasattr(demand, "clip"):
        busy = (demand / s).clip(0.0, 1.0)
    else:
        busy = min(1.0, max(0.0, demand / s))
    power = model.idle_watts + busy * (peak - model.idle_watts) * s**model.alpha
    return power, busy, s, busy * s


LoadSource = Callable[[int], float]


class FakeGpu:
    """One simulated GPU; integrates energy exactly between observations."""

    def __init__(self, model: GpuModel, index: int, peak_watts: float | None = None) -> None:
        self.model = model
        self.index = index
        self.peak_watts = model.tdp_watts if peak_watts is None else peak_watts
        self.limit_mw = int(model.tdp_watts * 1000)
        self.demand = 0.0
        self.energy_mj = 0.0
        self._t: float | None = None
        # (time, energy) points for the 1-second power average.
        self._history: deque[tuple[float, float]] = deque()

    def power_now(self) -> float:
        return operating_point(self.model, self.limit_mw / 1000, self.demand, self.peak_watts)[0]

    def advance(self, now: float) -> None:
        if self._t is None:
            self._t = now
            self._history.append((now, self.energy_mj))
            return
        dt = max(0.0, now - self._t)
        self.energy_mj += self.power_now() * dt * 1000.0
        self._t = max(self._t, now)
        self._history.append((self._t, self.energy_mj))
        while len(self._history) > 2 and self._history[1][0] <= self._t - 1.0:
            self._history.popleft()

    def average_power_w(self) -> float:
        """Mean power over the trailing second (NVML's reading is ~1 s averaged).

        Power is constant between observations, so energy is piecewise linear
        in time and its value one second ago interpolates exactly.
        """
        if self._t is None or not self._history:
            return self.power_now()
        start = self._t - 1.0
        t0, e0 = self._history[0]
        if t0 >= start:
            span = self._t - t0
            return self.power_now() if span <= 0 else (self.energy_mj - e0) / 1000.0 / span
        e_start = e0
        for (ta, ea), (tb, eb) in zip(self._history, list(self._history)[1:], strict=False):
            if ta <= start <= tb:
                e_start = ea if tb == ta else ea + (eb - ea) * (start - ta) / (tb - ta)
                break
        return (self.energy_mj - e_start) / 1000.0


class FakeNvmlBackend:
    """NVML-shaped API over `FakeGpu`s. Thread-safe (metrics scrape + loop)."""

    def __init__(
        self,
        count: int,
        model: str | GpuModel = "h100",
        load: LoadSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        peak_watts: float | None = None,
    ) -> None:
        m = MODELS[model] if isinstance(model, str) else model
        self.model = m
        self.gpus = [FakeGpu(m, i, peak_watts) for i in range(count)]
        self._load = load or (lambda i: 0.0)
        self._clock = clock
        self._initialized = False
        self._lock = threading.RLock()
        self.set_calls: list[tuple[int, int]] = []  # what the agent asked, for tests

    # --- simulation controls (not part of NVML) ---
    def simulate_driver_reload(self) -> None:
        with self._lock:
            self._sync()
            self._initialized = False
            for g in self.gpus:
                g.limit_mw = int(self.model.tdp_watts * 1000)
                g.energy_mj = 0.0
                g._history.clear()
                g._t = None

    def _sync(self) -> None:
        now = self._clock()
        for g in self.gpus:
            g.advance(now)
            try:
                u = float(self._load(g.index))
            except Exception:  # a broken load signal reads as idle, never crashes
                u = 0.0
            g.demand = 0.0 if not math.isfinite(u) else min(1.0, max(0.0, u))

    def _gpu(self, index: int) -> FakeGpu:
        if not self._initialized:
            raise NeedsReinit("NVML Uninitialized")
        if not 0 <= index < len(self.gpus):
            raise BackendError(f"invalid GPU index {index}")
        self._sync()
        return self.gpus[index]

    # --- NVML surface ---
    def init(self) -> None:
        with self._lock:
            self._initialized = True
            self._sync()

    def shutdown(self) -> None:
        with self._lock:
            self._initialized = False

    def device_count(self) -> int:
        if not self._initialized:
            raise NeedsReinit("NVML Uninitialized")
        return len(self.gpus)

    def name(self, index: int) -> str:
        with self._lock:
            return self._gpu(index).model.name

    def uuid(self, index: int) -> str:
        with self._lock:
            self._gpu(index)
            return f"GPU-fake-{self.model.name.split()[1].lower()}-{index:04d}"

    def power_limit_constraints_mw(self, index: int) -> tuple[int, int]:
        with self._lock:
            g = self._gpu(index)
            return int(g.model.min_limit_watts * 1000), int(g.model.tdp_watts * 1000)

    def default_power_limit_mw(self, index: int) -> int:
        with self._lock:
            return int(self._gpu(index).model.tdp_watts * 1000)

    def enforced_power_limit_mw(self, index: int) -> int:
        with self._lock:
            return self._gpu(index).limit_mw

    def set_power_limit_mw(self, index: int, milliwatts: int) -> None:
        with self._lock:
            g = self._gpu(index)
            lo, hi = int(g.model.min_limit_watts * 1000), int(g.model.tdp_watts * 1000)
            if not lo <= milliwatts <= hi:
                raise BackendError(f"Invalid Argument: {milliwatts} mW outside [{lo}, {hi}]")
            self.set_calls.append((index, int(milliwatts)))
            g.limit_mw = int(milliwatts)

    def power_usage_mw(self, index: int) -> int:
        with self._lock:
            return int(round(self._gpu(index).average_power_w() * 1000))

    def total_energy_mj(self, index: int) -> int:
        with self._lock:
            return int(self._gpu(index).energy_mj)

    def utilization_percent(self, index: int) -> int:
        with self._lock:
            g = self._gpu(index)
            _, busy, _, _ = operating_point(g.model, g.limit_mw / 1000, g.demand, g.peak_watts)
            return int(round(busy * 100))


def file_load(path: Path) -> LoadSource:
    """Demand from a file the tests or the demo write: ``0.7`` or ``{"0": 0.7}``."""

    def read(index: int) -> float:
        try:
            text = path.read_text().strip()
        except OSError:
            return 0.0
        if not text:
            return 0.0
        data = json.loads(text)
        if isinstance(data, dict):
            value = data.get(str(index), data.get("*", 0.0))
            return float(value if value is not None else 0.0)
        return float(data)

    return read


_BUSY = re.compile(r"^terrace_runtime_busy_seconds_total(?:\{[^}]*\})?\s+([0-9.eE+-]+)", re.M)


def runtime_metrics_load(url: str, clock: Callable[[], float] = time.monotonic) -> LoadSource:
    """Demand from a runtime's /metrics: the rate of its busy-seconds counter.

    A runtime that is busy 0.6 s of every second asks the GPU for 0.6 of its
    time. Polled at most once a second; unreachable reads as idle.
    """
    last_t: float | None = None
    last_busy = 0.0
    u = 0.0
    polled = -math.inf

    def read(index: int) -> float:
        nonlocal last_t, last_busy, u, polled
        now = clock()
        if now - polled < 1.0:
            return u
        polled = now
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        busy = sum(float(m) for m in _BUSY.findall(text))
        if last_t is not None and now > last_t and busy >= last_busy:
            u = min(1.0, (busy - last_busy) / (now - last_t))
        last_t, last_busy = now, busy
        return u

    return read
