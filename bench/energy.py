"""Energy and carbon benchmark: a trace-driven SIMULATION of a day of tiered inference.

    python bench/energy.py [--seed 1] [--mean-rps 25] [--large-share 0.4]

What is real and what is modelled:

* REAL (Terrace's own decision code, called as the operator, router and
  batch worker call it): the router's complexity classifier on real MMLU
  prompts from ../shared/data/routing/mmlu_routing.jsonl, scored out of
  sample (each prompt by a classifier trained with the built-in recipe on
  the other subjects: 10 leave-subjects-out folds,
  evaluation.out_of_fold_scores), its rolling-quantile calibration
  (`ShareCalibrator.route`, `retarget`) per request, the operator's replica
  decision (`scaling.decide`), power policy with a cron cap window
  (`power.decide_power`, `CapWindow`) and budget-following cut-off
  (`budget.measure`, `budget.effective_share`) every 15 s tick, fed with
  the metrics Prometheus would show, and the batch worker's release policy
  (`batch.policy.release`) with yesterday's grid as its outlook.
  Quality: a request answered by the small tier is correct iff the dataset's
  `small_correct`, by the large tier iff `large_correct`.
* MODELLED (hardware, traffic and grid only): GPU power and throughput under
  a power limit (the fake NVML physics, `terrace_operator.agent.fake`), CPU
  power (`terrace_operator.energy.CpuPowerModel`), replica start-up delays,
  service times, the day's load curve, its deferrable share and the grid's
  carbon intensity. Constants and their sources are in `HARDWARE`,
  `WORKLOAD`, `TRAFFIC` and `GRID` below and in docs/power.md.

Scenarios (the same arrivals in each):
  a   every request on the GPU tier, power at the default (TDP) limit,
      replicas fixed for the day's peak;
  b   tiered routing (classifier + calibration), each tier fixed for its peak;
  c   b + the operator's autoscaling (the GPU tier up to the cluster's GPUs);
  d   c + the operator's adaptive power control;
  d'  d + an evening power window (the GPUs capped while the grid is
      dirtiest), the share past the small tier fixed: what a static cap does;
  d"  d' + the budget-following cut-off (the share follows the capped tier);
  e   d" + deferral: the deferrable requests go through the Batch API in
      hourly batches with a 24 h window, released by the batch policy.

Two days are simulated and the second is measured, so batches submitted
late on a day finish inside it as they would on any day. Energy counts the
GPUs and CPU cores the tiers hold (a GPU released by a scale-down is not
charged; a starting replica is charged idle power for its start-up); grams
of CO2 are each second's energy times the grid's intensity then. SLO
attainment counts interactive requests; quality all of them. The last line
is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "routing" / "mmlu_routing.jsonl"

from terrace_operator.agent.fake import MODELS, allowed_speed, operating_point  # noqa: E402
from terrace_operator.budget import Capacity, UpperTier, effective_share, measure  # noqa: E402
from terrace_operator.energy import CpuPowerModel  # noqa: E402
from terrace_operator.power import (  # noqa: E402
    CapWindow,
    PowerObservation,
    PowerPolicy,
    PowerState,
    decide_power,
)
from terrace_operator.scaling import ScalingPolicy, decide  # noqa: E402
from terrace_router.batch.policy import Grid, Pace, release  # noqa: E402

DAY = 86_400
DAYS = 2  # the first warms up (yesterday's batches, yesterday's grid), the second is measured
TICK = 15  # the operator's default control interval (seconds)

HARDWARE = {
    # GPU: fake NVML model (TDP, min limit, idle, alpha) -- see agent/fake.py MODELS
    "gpu_model": "h100",
    # Replica start-up: pull-cached image + loading weights. ServerlessLLM
    # (Fu et al., OSDI'24) measures tens of seconds to minutes to load LLM
    # checkpoints; 60 s for the large model, 10 s for a small CPU model.
    "gpu_startup_s": 60,
    "cpu_startup_s": 10,
    # CPU power: watts per busy core, Xeon Platinum 8480+ TDP/cores (Intel ARK).
    "cpu_watts_per_busy_core": CpuPowerModel().watts_per_busy_core,
}

WORKLOAD = {
    # Assumptions about the served models (not hardware constants): stated, varied by flags.
    # Large model on one H100: a request costs 0.1 GPU-seconds at full clocks
    # under continuous batching (10 requests/s at 100 % busy), 600 ms latency.
    "gpu_work_s": 0.10,
    "gpu_latency_s": 0.60,
    # Small model on CPU: 0.8 core-seconds per request, 4 cores per replica, 900 ms latency.
    "cpu_core_s": 0.80,
    "cpu_cores_per_replica": 4,
    "cpu_latency_s": 0.90,
    # Latency grows with batch occupancy: x (1 + 0.5 * busy).
    "batching_slowdown": 0.5,
    # Per-request service-time spread (prompt lengths): lognormal sigma.
    "jitter_sigma": 0.25,
    "slo_ms": 2500,
}

TRAFFIC = {
    # Share of requests that may wait (offline summarisation, evaluation,
    # embeddings back-fills, reports). EcoServe (2025) reports offline/batch
    # work at up to half of production serving capacity; 40 % is taken here.
    "deferrable_share": 0.4,
    # Deferrable requests arrive as one Batch API batch per hour, 24 h window.
    "batch_every_s": 3600,
    "batch_window_s": 24 * 3600,
}

GRID = {
    # Hourly average carbon intensity (gCO2/kWh, local time 0-23) of a grid
    # with much solar: the shape of CAISO's spring days as CAISO's "Today's
    # Outlook" emissions data show it and de Chalendar & Benson (Joule 2021,
    # "Turning the spotlight on California's (dirty) nighttime emissions")
    # analyse it: clean solar middays, nights about 2.5x dirtier, the evening
    # ramp dirtiest. The values are rounded from that shape (an assumption
    # within the published range, not a day's measurement); each simulated
    # day varies it by a smooth +-10 %. `--grid-csv` reads 24 values instead.
    "hourly_gco2_per_kwh": (
        250,
        255,
        258,
        260,
        262,
        262,
        250,
        215,
        170,
        130,
        105,
        95,
        90,
        90,
        95,
        105,
        130,
        180,
        240,
        280,
        285,
        280,
        270,
        260,
    ),
    "day_to_day": 0.10,
    # The operator caps the GPUs while the grid is dirtiest (d', d", e).
    # The operator caps the GPUs to 200 W (their floor) from the start of
    # California's utilities' 4-9 p.m. time-of-use peak to the end of the
    # curve's dirtiest hours, 16:00-23:00: power follows price and grid.
    "cap_window": "* 16-22 * * *",
    "cap_watts": 200,
}
CAP_HOURS = (16, 22)  # the window's hours, for the SLO inside it


# --------------------------------------------------------------- trace


def load_curve(rng: np.random.Generator, mean_rps: float) -> np.ndarray:
    """Requests per second over a day: diurnal (trough 4:00, peak 16:00) plus bursts."""
    t = np.arange(DAY)
    diurnal = 1.0 + 0.65 * np.sin(2 * np.pi * (t / DAY - 0.42))
    bursts = np.ones(DAY)
    for _ in range(rng.poisson(10)):
        start = rng.integers(0, DAY - 900)
        length = rng.integers(120, 900)
        bursts[start : start + length] *= 1.0 + rng.uniform(0.3, 0.8)
    rate = mean_rps * diurnal * bursts
    return rate * mean_rps / rate.mean()


def load_prompts(limit: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    prompts, small, large = [], [], []
    with DATA.open() as f:
        for line in f:
            d = json.loads(line)
            prompts.append(d["prompt"])
            small.append(bool(d["small_correct"]))
            large.append(bool(d["large_correct"]))
    if limit:
        prompts, small, large = prompts[:limit], small[:limit], large[:limit]
    return prompts, np.array(small), np.array(large)


def score_prompts(limit: int | None = None) -> np.ndarray:
    """Out-of-fold scores: each prompt scored by a classifier trained, with the
    built-in recipe, on the other subjects only (10 leave-subjects-out folds),
    so the simulated quality is not in-sample."""
    from terrace_router.classifier import Classifier, evaluation, training
    from terrace_router.classifier.builder import training_inputs

    clf = Classifier.load("builtin")
    rows = training.load_rows(DATA)
    if limit:
        rows = rows[:limit]
    inputs = training_inputs([r.prompt for r in rows], clf.encoder)
    config = training.TrainConfig(**clf.metadata["train"]["config"])
    return evaluation.out_of_fold_scores(rows, inputs, config)


def calibrator(share: float):
    """The router's calibrator, as the router builds it."""
    from terrace_router.calibration import ShareCalibrator

    return ShareCalibrator(target_large_share=share, window=2000, warmup=200, initial_threshold=0.5)


def route_fixed(scores: np.ndarray, share: float) -> np.ndarray:
    """Tier per request (0 small, 1 large) in arrival order, at a fixed share."""
    route = calibrator(share).route
    return np.fromiter((route(float(x), 2) for x in scores), dtype=np.int8, count=len(scores))


def grid_intensity(rng: np.random.Generator, hourly: tuple[float, ...]) -> np.ndarray:
    """gCO2/kWh per second over DAYS days: the hourly curve, each day varied
    by a smooth +-GRID["day_to_day"] (linear between random hourly factors)."""
    hours = np.arange(DAY) / 3600
    base = np.interp(hours, np.arange(25), [*hourly, hourly[0]])
    days = []
    for _ in range(DAYS):
        wobble = rng.uniform(-1, 1, 25) * GRID["day_to_day"]
        days.append(base * (1 + np.interp(hours, np.arange(25), wobble)))
    return np.concatenate(days)


# --------------------------------------------------------------- tiers


class TierSim:
    """One tier, a fluid model at 1 s resolution; the operator's code runs
    in `tick` (scaling, power, and the capacity the cut-off reads)."""

    def __init__(
        self,
        kind: str,
        *,
        fixed_replicas: int | None,
        scaling: ScalingPolicy | None,
        power: PowerPolicy | None,
        latency_target_ms: float,
        t0: datetime,
    ) -> None:
        w = WORKLOAD
        self.kind, self.fixed, self.scaling, self.power = kind, fixed_replicas, scaling, power
        self.latency_target_ms, self.t0 = latency_target_ms, t0
        self.gpu = MODELS[HARDWARE["gpu_model"]]
        if kind == "gpu":
            self.work, self.base = w["gpu_work_s"], w["gpu_latency_s"]
            self.startup = HARDWARE["gpu_startup_s"]
        else:
            self.work = w["cpu_core_s"] / w["cpu_cores_per_replica"]
            self.base, self.startup = w["cpu_latency_s"], HARDWARE["cpu_startup_s"]
        self.per_replica = 1.0 / self.work  # requests/s at full clocks
        self.max_replicas = fixed_replicas if fixed_replicas is not None else scaling.max_replicas
        self.ready = fixed_replicas if fixed_replicas is not None else max(1, scaling.min_replicas)
        self.target = self.ready
        self.starting: list[int] = []  # seconds at which pending replicas become ready
        self.limit = float(self.gpu.tdp_watts)
        self.pstate = PowerState(int(self.gpu.tdp_watts))
        self.history: tuple = ()
        self.backlog = 0.0
        self.capacity: Capacity | None = None
        n = DAYS * DAY
        self.lat = np.zeros(n)
        self.arr = np.zeros(n)
        self.batch = np.zeros(n)
        self.served = np.zeros(n)
        self.busy = np.zeros(n)
        self.inflight = np.zeros(n)
        self.watts = np.zeros(n)
        self.reps = np.zeros(n, dtype=np.int32)

    def speed(self) -> float:
        return float(allowed_speed(self.gpu, self.limit)) if self.kind == "gpu" else 1.0

    def room(self, t: int, utilization: float = 0.6) -> float:
        """Requests/s of batch work the tier can take: replicas.max at
        `utilization` (the scaling target's busy fraction) at the speed its
        power limit allows now, less all it received in the last minute: the
        gap below the target on the replicas the autoscaler may add."""
        full = self.max_replicas * self.per_replica * self.speed() * utilization
        return max(0.0, full - float(self.arr[max(0, t - 60) : t].mean() if t else 0.0))

    def step(self, t: int, a: float, batch: float = 0.0) -> float:
        """Serve second t's `a` arrivals; their latency (seconds, before jitter)."""
        w = WORKLOAD
        while self.starting and self.starting[0] <= t:
            self.starting.pop(0)
            self.ready += 1
        speed = self.speed()
        cap = self.ready * self.per_replica * speed
        want = self.backlog + a
        served = min(want, cap)
        self.backlog = want - served
        busy = served / cap if cap > 0 else 0.0
        if self.kind == "gpu":
            p = 0.0
            if self.ready:
                u_full = served * self.work / self.ready  # busy-at-full-clocks per GPU
                p = self.ready * operating_point(self.gpu, self.limit, u_full)[0]
            p += len(self.starting) * self.gpu.idle_watts
        else:
            p = served * w["cpu_core_s"] * HARDWARE["cpu_watts_per_busy_core"]
        svc = self.base / speed * (1 + w["batching_slowdown"] * busy)
        lat = svc + (self.backlog / cap if cap > 0 else 60.0)
        self.lat[t], self.arr[t], self.served[t], self.busy[t] = lat, a, served, busy
        self.batch[t] = batch  # of `a`, batch lines
        self.inflight[t] = a * svc + self.backlog
        self.watts[t], self.reps[t] = p, self.ready
        return lat

    def tick(self, t: int) -> None:
        """The operator at the end of second t - 1: what Prometheus would show."""
        if self.fixed is not None and self.power is None:
            return
        now = self.t0 + timedelta(seconds=t)
        lo = max(0, t - 60)
        win = self.arr[lo:t]
        p95 = None
        if win.sum() > 0:
            order = np.argsort(self.lat[lo:t])
            cum = np.cumsum(win[order])
            p95 = float(self.lat[lo:t][order][np.searchsorted(cum, 0.95 * cum[-1])]) * 1000
        observed = float(self.inflight[t - TICK : t].mean())
        if self.scaling is not None and self.fixed is None:
            activation = float(self.arr[t - TICK : t].mean()) + self.backlog
            d = decide(
                self.scaling, self.target, observed, now.timestamp(), self.history, activation
            )
            self.history = d.history
            if d.replicas > self.target:
                self.starting += [t + self.startup] * (d.replicas - self.target)
            elif d.replicas < self.target:
                drop = self.target - d.replicas
                while drop and self.starting:  # cancel pending starts first
                    self.starting.pop()
                    drop -= 1
                self.ready = max(0, self.ready - drop)
            self.target = d.replicas
        if self.power is not None and self.kind == "gpu":
            util = float(self.busy[t - TICK : t].mean())
            dec = decide_power(
                self.power, self.pstate, PowerObservation(util, p95, self.latency_target_ms), now
            )
            self.pstate, self.limit = dec.state, float(dec.watts)
        if self.scaling is not None:
            self.capacity = measure(
                self.capacity,
                served_rps=float(self.served[lo:t].mean()),
                ready_replicas=self.ready,
                max_replicas=self.max_replicas,
                observed=observed,
                target=self.scaling.target,
                latency_ms=p95,
                latency_target_ms=self.latency_target_ms,
                watts=int(self.limit) if self.kind == "gpu" else None,
                observed_is_total=True,
            )


# --------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    tiered: bool = True
    autoscale: bool = True
    power: bool = True
    cap: bool = False  # GRID's evening cap window on the GPUs
    cutoff: bool = False  # the budget-following cut-off
    defer: bool = False  # deferrable requests through the Batch API


SCENARIOS = (
    Scenario("a", "a all on GPU, full power, peak", tiered=False, autoscale=False, power=False),
    Scenario("b", "b tiered routing", autoscale=False, power=False),
    Scenario("c", "c + autoscaling", power=False),
    Scenario("d", "d + power control"),
    Scenario("d_cap", "d' + evening cap, fixed share", cap=True),
    Scenario("d_cutoff", "d'' + evening cap, cut-off", cap=True, cutoff=True),
    Scenario("e", "e d'' + deferral (Batch API)", cap=True, cutoff=True, defer=True),
)


@dataclass
class Batch:
    queue: deque[int]  # request indices not sent yet
    expires: int  # second
    size: int = 0
    expired: int = 0
    outlook: tuple[float, ...] = ()
    outlook_at: int = -(10**9)


@dataclass
class Day:
    """The arrivals and the world every scenario shares."""

    second_of: np.ndarray  # arrival second of each request, sorted
    starts: np.ndarray  # first request index of each second (len DAYS*DAY + 1)
    prompt: np.ndarray  # prompt index of each request
    deferrable: np.ndarray  # bool per request
    jitter: np.ndarray
    scores: np.ndarray  # per request (out-of-fold)
    small_ok: np.ndarray  # per request
    large_ok: np.ndarray
    intensity: np.ndarray  # gCO2/kWh per second
    yesterday: np.ndarray  # the outlook's values per second (the day before; day 0: the curve)
    fixed_tiers: np.ndarray  # per request, the calibrator at the target share
    share: float
    t0: datetime
    extra: dict = field(default_factory=dict)


def peak_replicas(arrivals: np.ndarray, capacity: float, target_util: float = 0.7) -> int:
    # Peak of the 5-minute mean, provisioned at target utilization.
    k = 300
    smooth = np.convolve(arrivals, np.ones(k) / k, mode="same")
    return max(1, math.ceil(smooth.max() / (capacity * target_util)))


def scaling_for(kind: str, max_replicas: int) -> ScalingPolicy:
    w = WORKLOAD
    cap = 1.0 / w["gpu_work_s"] if kind == "gpu" else w["cpu_cores_per_replica"] / w["cpu_core_s"]
    base = w["gpu_latency_s"] if kind == "gpu" else w["cpu_latency_s"]
    # inflight per replica at 60 % busy (Little's law), the tier's target
    target = max(1, round(0.6 * cap * base * (1 + w["batching_slowdown"] * 0.6)))
    return ScalingPolicy(
        min_replicas=1,
        max_replicas=max_replicas,
        metric="inflight",
        target=target,
        scale_up_window_seconds=0,
        scale_down_window_seconds=300,
        metrics_unavailable_replicas=1,
    )


def simulate(sc: Scenario, day: Day) -> dict:
    w = WORKLOAD
    n_sec = DAYS * DAY
    gpu_cap = 1.0 / w["gpu_work_s"]
    cpu_cap = w["cpu_cores_per_replica"] / w["cpu_core_s"]
    latency_target = 0.6 * w["slo_ms"]
    per_sec = day.extra["per_second"]
    if not sc.tiered:
        tiers = [
            TierSim(
                "gpu",
                fixed_replicas=peak_replicas(per_sec["all"], gpu_cap),
                scaling=None,
                power=None,
                latency_target_ms=latency_target,
                t0=day.t0,
            )
        ]
    else:
        cluster_gpus = peak_replicas(per_sec["large"], gpu_cap)
        windows = (CapWindow(GRID["cap_window"], GRID["cap_watts"]),) if sc.cap else ()
        gpu_power = PowerPolicy("adaptive", 200, 700, windows) if sc.power else None
        tiers = [
            TierSim(
                "cpu",
                fixed_replicas=None if sc.autoscale else peak_replicas(per_sec["small"], cpu_cap),
                scaling=scaling_for("cpu", 2 * peak_replicas(per_sec["small"], cpu_cap)),
                power=None,
                latency_target_ms=latency_target,
                t0=day.t0,
            ),
            TierSim(
                "gpu",
                fixed_replicas=None if sc.autoscale else cluster_gpus,
                scaling=scaling_for("gpu", cluster_gpus),
                power=gpu_power,
                latency_target_ms=latency_target,
                t0=day.t0,
            ),
        ]
    n_req = len(day.second_of)
    tier_of = np.full(n_req, -1, dtype=np.int8)  # where each request was served
    served_at = np.full(n_req, -1, dtype=np.int64)  # second it was sent to a tier
    lat = np.zeros(n_req)
    cal = calibrator(day.share) if sc.cutoff else None
    route = cal.route if cal is not None else None
    scores = day.scores
    batches: list[Batch] = []
    waiting: list[int] = []  # deferrable requests of the current hour
    batch_rate = np.zeros((2, n_sec))  # batch lines per second sent to each tier
    routed = np.zeros(n_sec)  # requests routed per second (the router's demand)
    shares: list[float] = []
    for t in range(n_sec):
        lo, hi = day.starts[t], day.starts[t + 1]
        now_idx = np.arange(lo, hi)
        if sc.defer:
            late = now_idx[day.deferrable[lo:hi]]
            waiting.extend(late.tolist())
            now_idx = now_idx[~day.deferrable[lo:hi]]
            if (t + 1) % TRAFFIC["batch_every_s"] == 0 and waiting:
                expires = t + 1 + TRAFFIC["batch_window_s"]
                batches.append(Batch(deque(waiting), expires, size=len(waiting)))
                waiting = []
        if not sc.tiered:
            chosen = np.ones(len(now_idx), dtype=np.int8)
        elif route is not None:
            chosen = np.fromiter(
                (route(float(scores[i]), 2) for i in now_idx), dtype=np.int8, count=len(now_idx)
            )
        else:
            chosen = day.fixed_tiers[now_idx]
        tier_of[now_idx] = chosen
        served_at[now_idx] = t
        n_large = int(chosen.sum())
        routed[t] = len(now_idx)  # the router's demand: batch lines are not counted
        if sc.tiered:
            l_small = tiers[0].step(t, len(now_idx) - n_large + batch_rate[0, t], batch_rate[0, t])
            l_large = tiers[1].step(t, n_large + batch_rate[1, t], batch_rate[1, t])
            lat[now_idx] = np.where(chosen == 1, l_large, l_small)
        else:
            lat[now_idx] = tiers[0].step(t, len(now_idx))
        if (t + 1) % TICK:
            continue
        for tier in tiers:
            tier.tick(t + 1)
        if cal is not None:
            gpu = tiers[1]
            demand = float(routed[max(0, t + 1 - 60) : t + 1].mean())
            upper = UpperTier(
                "large", gpu.capacity.rps if gpu.capacity else None, int(gpu.limit), 700
            )
            share = effective_share(day.share, demand, [upper])
            cal.retarget(share.percent / 100)
            shares.append(share.percent / 100)
        if batches:
            _release(batches, tiers, cal, day, t + 1, tier_of, served_at, batch_rate)
    return _measure(sc, day, tiers, tier_of, served_at, lat, batches, shares)


def _release(
    batches: list[Batch],
    tiers: list[TierSim],
    cal,
    day: Day,
    t: int,
    tier_of: np.ndarray,
    served_at: np.ndarray,
    batch_rate: np.ndarray,
) -> None:
    """The batch worker and the router at second t, over the next tick.

    Each tier takes batch lines only into its room below its scaling target
    (what the router's deferrable rule does: a line over it is shed with a
    429 and goes back to its batch's queue), so lines bound for the CPU tier
    flow while the GPU tier's room is used up. Batches go in deadline order;
    `release` decides per batch, with the lines of earlier batches `ahead`.
    A line released for its deadline is not deferrable: its tier takes it
    whatever its room (and scales for it)."""
    room = [tiers[0].room(t) * TICK, tiers[1].room(t) * TICK]  # lines this tick
    slots = max(1, int((room[0] + room[1]) / TICK))  # lines a second, both tiers
    used = 0  # slots taken this tick by batches due earlier
    ahead = 0  # lines of batches due earlier: they go first through the same slots
    sent = [0.0, 0.0]
    for b in sorted((b for b in batches if b.queue), key=lambda b: b.expires):
        pending = len(b.queue)
        if t >= b.expires:
            b.expired = pending
            b.queue.clear()
            continue
        if t - b.outlook_at >= 300:  # the worker re-reads its outlook every 5 minutes
            b.outlook = tuple(day.yesterday[t : min(b.expires, len(day.yesterday)) : 300])
            b.outlook_at = t
        decision = release(
            Pace(now=float(t), expires_at=float(b.expires), pending=pending, in_flight=used,
                 seconds_per_line=1.0, slots=slots, ahead=ahead),
            Grid(float(day.intensity[t - 1]), outlook=b.outlook),
        )  # fmt: skip
        if decision.lines <= 0:
            ahead += pending
            continue
        urgent = decision.reason.startswith("deadline")
        shed = []
        for _ in range(min(pending, decision.lines * TICK)):  # a slot: a line a second
            i = b.queue.popleft()
            score = float(day.scores[i])
            tier = cal.route(score, 2, record=False)  # counted once taken, as the router does
            if not urgent and room[tier] < 1:
                shed.append(i)  # 429: back to the queue
                continue
            cal.record(score, tier)
            room[tier] -= 1
            sent[tier] += 1
            tier_of[i], served_at[i] = tier, t
        b.queue.extend(shed)
        used += decision.lines
        ahead += len(b.queue)
        if used >= slots or (room[0] < 1 and room[1] < 1):
            break
    end = min(t + TICK, batch_rate.shape[1])
    batch_rate[0, t:end] += sent[0] / TICK
    batch_rate[1, t:end] += sent[1] / TICK


def _measure(
    sc: Scenario,
    day: Day,
    tiers: list[TierSim],
    tier_of: np.ndarray,
    served_at: np.ndarray,
    lat: np.ndarray,
    batches: list[Batch],
    shares: list[float],
) -> dict:
    """Day two's figures."""
    w = WORKLOAD
    watts = sum(t.watts for t in tiers)[DAY:]
    energy = float(watts.sum())
    co2 = float((watts * day.intensity[DAY:]).sum() / 3.6e6)
    on_day = day.second_of >= DAY
    interactive = on_day & ~day.deferrable if sc.defer else on_day
    ms = lat[interactive] * day.jitter[interactive] * 1000
    hour = (day.second_of[interactive] % DAY) // 3600
    capped = (hour >= CAP_HOURS[0]) & (hour <= CAP_HOURS[1])
    answered = (served_at >= DAY) & (tier_of >= 0)
    correct = np.where(tier_of[answered] == 1, day.large_ok[answered], day.small_ok[answered])
    out = {
        "energy_kwh": round(energy / 3.6e6, 3),
        "co2_kg": round(co2 / 1000, 3),
        "joules_per_request": round(energy / max(1, int(on_day.sum())), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "slo_attainment": round(float((ms <= w["slo_ms"]).mean()), 4),
        "slo_in_cap_hours": round(float((ms[capped] <= w["slo_ms"]).mean()), 4),
        "quality": round(float(correct.mean()), 4),
        "gpu_replicas_mean": round(float(tiers[-1].reps[DAY:].mean()), 2),
    }
    if sc.defer:
        due = [b for b in batches if b.expires <= DAYS * DAY]
        total = sum(b.size for b in due)
        late = sum(b.expired for b in due)
        out["batch_in_window"] = round(1 - late / total, 4) if total else None
        out["batches"] = len(due)
    if shares:
        share = np.array(shares[len(shares) // DAYS :])
        out["share_min"] = round(float(share.min()), 2)
        out["share_mean"] = round(float(share.mean()), 3)
    return out


def prepare(args: argparse.Namespace) -> Day:
    rng = np.random.default_rng(args.seed)
    rate = load_curve(rng, args.mean_rps)
    counts = np.concatenate([rng.poisson(rate) for _ in range(DAYS)])
    n_req = int(counts.sum())
    second_of = np.repeat(np.arange(DAYS * DAY), counts)
    starts = np.concatenate([[0], np.cumsum(counts)])
    _, small_ok, large_ok = load_prompts()
    scores = score_prompts()
    prompt = rng.integers(0, len(scores), n_req)
    deferrable = rng.random(n_req) < args.deferrable_share
    jitter = rng.lognormal(0.0, WORKLOAD["jitter_sigma"], n_req)
    jitter /= jitter.mean()
    hourly = GRID["hourly_gco2_per_kwh"]
    if args.grid_csv:
        hourly = tuple(float(x) for x in Path(args.grid_csv).read_text().replace(",", " ").split())
        if len(hourly) != 24:
            raise SystemExit(f"--grid-csv: 24 hourly values wanted, got {len(hourly)}")
    intensity = grid_intensity(rng, hourly)
    curve = np.interp(np.arange(DAY) / 3600, np.arange(25), [*hourly, hourly[0]])
    yesterday = np.concatenate([curve, intensity[:-DAY]])
    fixed = route_fixed(scores[prompt], args.large_share)
    day = Day(
        second_of,
        starts,
        prompt,
        deferrable,
        jitter,
        scores[prompt],
        small_ok[prompt],
        large_ok[prompt],
        intensity,
        yesterday,
        fixed,
        args.large_share,
        datetime(2025, 6, 2, tzinfo=UTC) - timedelta(days=1),
    )

    def per_second(mask: np.ndarray) -> np.ndarray:
        return np.bincount(second_of[mask], minlength=DAYS * DAY).astype(float)

    day.extra["per_second"] = {
        "all": per_second(np.ones(n_req, bool)),
        "small": per_second(fixed == 0),
        "large": per_second(fixed == 1),
    }
    day.extra["quality_all_small"] = round(float(small_ok[prompt].mean()), 4)
    day.extra["quality_all_large"] = round(float(large_ok[prompt].mean()), 4)
    return day


def run(args: argparse.Namespace) -> dict:
    t_start = time.monotonic()
    day = prepare(args)
    out = {sc.key: simulate(sc, day) for sc in SCENARIOS}
    out["_meta"] = {
        "requests_per_day": int((day.second_of >= DAY).sum()),
        "large_share": round(float((day.fixed_tiers == 1).mean()), 4),
        "quality_all_small": day.extra["quality_all_small"],
        "quality_all_large": day.extra["quality_all_large"],
        "grid_mean": round(float(day.intensity[DAY:].mean()), 1),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mean-rps", type=float, default=25.0)
    p.add_argument("--large-share", type=float, default=0.4)
    p.add_argument(
        "--deferrable-share",
        type=float,
        default=TRAFFIC["deferrable_share"],
        help="share of requests that may wait (TRAFFIC)",
    )
    p.add_argument(
        "--grid-csv",
        default=None,
        help="24 hourly gCO2/kWh values (local hours 0-23) instead of GRID's",
    )
    args = p.parse_args(argv)
    print("SIMULATION, not a measurement: two simulated days, the second measured; Terrace's")
    print("classifier, calibration, scaling, power policy, budget cut-off and batch release make")
    print("every decision; GPU/CPU power, throughput, start-up delays, service times, traffic")
    print("and the grid are modelled (constants and sources: docs/power.md, docs/batch.md).")
    print(f"hardware: {HARDWARE}")
    print(f"workload: {WORKLOAD}")
    print(f"traffic: {TRAFFIC}")
    print(f"grid: {GRID}")
    try:
        res = run(args)
    except ImportError as exc:
        print(
            f"cannot run: the router's classifier/calibration is not importable ({exc})",
            file=sys.stderr,
        )
        return 1
    meta = res.pop("_meta")
    print(
        f"requests/day: {meta['requests_per_day']}, share to large tier: {meta['large_share']}, "
        f"quality all-small {meta['quality_all_small']} / all-large "
        f"{meta['quality_all_large']}, grid mean {meta['grid_mean']} gCO2/kWh, "
        f"simulated in {meta['seconds']} s"
    )
    hdr = (
        f"{'scenario':<38}{'kWh':>8}{'kgCO2':>8}{'J/req':>8}{'p99 ms':>9}{'SLO %':>8}"
        f"{'quality':>9}{'GPUs':>7}{'batch %':>9}"
    )
    print(hdr)
    labels = {sc.key: sc.label for sc in SCENARIOS}
    for k, v in res.items():
        batch = f"{100 * v['batch_in_window']:>9.2f}" if v.get("batch_in_window") else f"{'-':>9}"
        print(
            f"{labels[k]:<38}{v['energy_kwh']:>8.2f}{v['co2_kg']:>8.2f}"
            f"{v['joules_per_request']:>8.1f}{v['p99_ms']:>9.0f}{100 * v['slo_attainment']:>8.2f}"
            f"{v['quality']:>9.4f}{v['gpu_replicas_mean']:>7.2f}{batch}"
        )
    a, d, e = res["a"], res["d"], res["e"]
    halfway = (meta["quality_all_small"] + meta["quality_all_large"]) / 2
    saving = round(1 - d["energy_kwh"] / a["energy_kwh"], 4)
    co2_e_d = round(1 - e["co2_kg"] / d["co2_kg"], 4)
    co2_e_a = round(1 - e["co2_kg"] / a["co2_kg"], 4)
    print(
        f"energy saving d vs a: {saving:.1%} (target >= 40 %); d within SLO "
        f"{d['slo_attainment']:.2%} (target >= 99 %); d quality {d['quality']:.4f} "
        f"(target >= {halfway:.4f}, halfway from all-small to all-large)"
    )
    fixed, cut = res["d_cap"], res["d_cutoff"]
    print(
        f"evening cap (16:00-23:00, 200 W): SLO inside it with a fixed share "
        f"{fixed['slo_in_cap_hours']:.2%}, with the cut-off {cut['slo_in_cap_hours']:.2%} "
        f"(share down to {cut.get('share_min')}); over the day {fixed['slo_attainment']:.2%} "
        f"and {cut['slo_attainment']:.2%}"
    )
    print(
        f"CO2 e vs d: {co2_e_d:.1%} less (target >= 25 %); e vs a: {co2_e_a:.1%} less; e within "
        f"SLO {e['slo_attainment']:.2%} (target >= 99 %); batch lines inside their window "
        f"{e['batch_in_window']:.2%} (target >= 99 %); e quality {e['quality']:.4f}"
    )
    fields = ("energy_kwh", "co2_kg", "joules_per_request", "p99_ms", "slo_attainment", "quality")
    final = {k: {f: v[f] for f in fields} for k, v in res.items()}
    final |= {
        "energy_saving_d_vs_a": saving,
        "co2_saving_e_vs_d": co2_e_d,
        "co2_saving_e_vs_a": co2_e_a,
        "slo_attainment_e": e["slo_attainment"],
        "batch_in_window_e": e["batch_in_window"],
        "slo_in_cap_hours_fixed_share": fixed["slo_in_cap_hours"],
        "slo_in_cap_hours_cutoff": cut["slo_in_cap_hours"],
    }
    print(json.dumps(final, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
