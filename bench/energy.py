"""Energy benchmark: a trace-driven SIMULATION of one day of tiered inference.

    python bench/energy.py [--seed 1] [--mean-rps 8] [--large-share 0.3]

What is real and what is modelled:

* REAL (Terrace's own decision code, called as the operator and router call
  it): the router's complexity classifier on real MMLU prompts from
  ../shared/data/routing/mmlu_routing.jsonl, scored out of sample (each
  prompt by a classifier trained with the built-in recipe on the other
  subjects: 10 leave-subjects-out folds, evaluation.out_of_fold_scores), its
  rolling-quantile calibration (`ShareCalibrator.route`) per request, the
  operator's replica decision (`terrace_operator.scaling.decide`) and power
  policy (`terrace_operator.power.decide_power`) every 15 s tick (the
  operator's default), fed with the metrics Prometheus would show.
  Quality: a request answered by the small tier is correct iff the dataset's
  `small_correct`, by the large tier iff `large_correct`.
* MODELLED (hardware and traffic only): GPU power and throughput under a power
  limit (the fake NVML physics, `terrace_operator.agent.fake`), CPU power
  (`terrace_operator.energy.CpuPowerModel`), replica start-up delays, service
  times, and the day's load curve. Constants and their sources are in
  `HARDWARE` / `WORKLOAD` below and in docs/power.md.

Scenarios:
  a  every request on the GPU tier, power at the default (TDP) limit, replicas
     fixed for the day's peak;
  b  tiered routing (classifier + calibration), each tier fixed for its peak;
  c  b + the operator's autoscaling;
  d  c + the operator's adaptive power control.

Energy counts the GPUs and CPU cores the tiers hold (a GPU released by a
scale-down is not charged; a starting replica is charged idle power for its
start-up). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "routing" / "mmlu_routing.jsonl"

from terrace_operator.agent.fake import MODELS, operating_point  # noqa: E402
from terrace_operator.energy import CpuPowerModel  # noqa: E402
from terrace_operator.power import PowerObservation, PowerPolicy, PowerState, decide_power  # noqa: E402
from terrace_operator.scaling import ScalingPolicy, decide  # noqa: E402

DAY = 86_400
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


def route_requests(scores: np.ndarray, idx: np.ndarray, share: float) -> np.ndarray:
    """The router's calibration, request by request, in arrival order."""
    from terrace_router.calibration import ShareCalibrator

    cal = ShareCalibrator(
        target_large_share=share, window=2000, warmup=200, initial_threshold=0.5
    )
    route = cal.route
    out = np.empty(len(idx), dtype=np.int8)
    s = scores[idx]
    for i in range(len(idx)):
        out[i] = route(float(s[i]), 2)
    return out


# --------------------------------------------------------------- tiers


@dataclass
class TierResult:
    energy_j: float
    latency_s: np.ndarray  # per arrival second, before jitter
    replicas: np.ndarray


def simulate_tier(
    arrivals: np.ndarray,
    *,
    kind: str,
    fixed_replicas: int | None,
    scaling: ScalingPolicy | None,
    power: PowerPolicy | None,
    latency_target_ms: float | None,
    t0: datetime,
) -> TierResult:
    """Fluid simulation at 1 s resolution; the operator's code runs every TICK."""
    w = WORKLOAD
    gpu = MODELS[HARDWARE["gpu_model"]]
    if kind == "gpu":
        work, base, startup = w["gpu_work_s"], w["gpu_latency_s"], HARDWARE["gpu_startup_s"]
        per_replica_capacity = 1.0 / work  # requests/s at full clocks
    else:
        cores = w["cpu_cores_per_replica"]
        work, base, startup = w["cpu_core_s"] / cores, w["cpu_latency_s"], HARDWARE["cpu_startup_s"]
        per_replica_capacity = 1.0 / work
    beta = w["batching_slowdown"]
    cpu_w = HARDWARE["cpu_watts_per_busy_core"]
    n = len(arrivals)
    if fixed_replicas is not None:
        ready = fixed_replicas
    else:
        ready = max(1, scaling.min_replicas) if scaling else 1
    target = ready
    starting: list[int] = []  # seconds at which pending replicas become ready
    limit = gpu.tdp_watts
    pstate = PowerState(int(gpu.tdp_watts))
    history: tuple = ()
    backlog = 0.0
    energy = 0.0
    lat = np.zeros(n)
    reps = np.zeros(n, dtype=np.int32)
    busy_hist = np.zeros(n)
    inflight_hist = np.zeros(n)
    for t in range(n):
        while starting and starting[0] <= t:
            starting.pop(0)
            ready += 1
        a = arrivals[t]
        if kind == "gpu":
            _, _, speed, _ = operating_point(gpu, limit, 0.0)
        else:
            speed = 1.0
        cap = ready * per_replica_capacity * speed
        want = backlog + a
        served = min(want, cap)
        backlog = want - served
        busy = served / cap if cap > 0 else 0.0
        if kind == "gpu":
            if ready:
                u_full = served * work / ready  # busy-at-full-clocks fraction per GPU
                p, _, _, _ = operating_point(gpu, limit, u_full)
                energy += ready * p
            energy += len(starting) * gpu.idle_watts
        else:
            energy += served * w["cpu_core_s"] * cpu_w
        svc = base / speed * (1 + beta * busy)
        wait = backlog / cap if cap > 0 else 60.0
        lat[t] = svc + wait
        reps[t] = ready
        busy_hist[t] = busy
        inflight_hist[t] = a * svc + backlog
        if (t + 1) % TICK or fixed_replicas is not None and power is None:
            continue
        # ---- operator tick: what Prometheus would show ----
        now = t0 + timedelta(seconds=t + 1)
        lo = max(0, t + 1 - 60)
        win = arrivals[lo : t + 1]
        p95 = None
        if win.sum() > 0:
            order = np.argsort(lat[lo : t + 1])
            cum = np.cumsum(win[order])
            p95 = float(lat[lo : t + 1][order][np.searchsorted(cum, 0.95 * cum[-1])]) * 1000
        if scaling is not None and fixed_replicas is None:
            current = target
            observed = float(inflight_hist[t + 1 - TICK : t + 1].mean())
            activation = float(arrivals[t + 1 - TICK : t + 1].mean()) + backlog
            d = decide(scaling, current, observed, now.timestamp(), history, activation)
            history = d.history
            if d.replicas > target:
                for _ in range(d.replicas - target):
                    starting.append(t + 1 + startup)
            elif d.replicas < target:
                drop = target - d.replicas
                while drop and starting:  # cancel pending starts first
                    starting.pop()
                    drop -= 1
                ready = max(0, ready - drop)
            target = d.replicas
        if power is not None and kind == "gpu":
            util = float(busy_hist[t + 1 - TICK : t + 1].mean())
            dec = decide_power(
                power, pstate, PowerObservation(util, p95, latency_target_ms), now
            )
            pstate = dec.state
            limit = float(dec.watts)
    return TierResult(energy, lat, reps)


# --------------------------------------------------------------- scenarios


def peak_replicas(arrivals: np.ndarray, capacity: float, target_util: float = 0.7) -> int:
    # Peak of the 5-minute mean, provisioned at target utilization.
    k = 300
    smooth = np.convolve(arrivals, np.ones(k) / k, mode="same")
    return max(1, math.ceil(smooth.max() / (capacity * target_util)))


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    t_start = time.monotonic()
    rate = load_curve(rng, args.mean_rps)
    counts = rng.poisson(rate)
    n_req = int(counts.sum())
    second_of = np.repeat(np.arange(DAY), counts)
    prompts, small_ok, large_ok = load_prompts(args.prompts)
    scores = score_prompts(args.prompts)
    idx = rng.integers(0, len(prompts), n_req)
    tiers = route_requests(scores, idx, args.large_share)
    jitter = rng.lognormal(0.0, WORKLOAD["jitter_sigma"], n_req)
    jitter /= jitter.mean()
    t0 = datetime(2025, 6, 2, tzinfo=UTC)
    w = WORKLOAD
    gpu_cap = 1.0 / w["gpu_work_s"]
    cpu_cap = w["cpu_cores_per_replica"] / w["cpu_core_s"]
    latency_target = 0.6 * w["slo_ms"]

    def per_second(mask: np.ndarray) -> np.ndarray:
        return np.bincount(second_of[mask], minlength=DAY).astype(float)

    all_gpu = per_second(np.ones(n_req, bool))
    small_arr = per_second(tiers == 0)
    large_arr = per_second(tiers == 1)

    def scaling_for(kind: str, arrivals: np.ndarray) -> ScalingPolicy:
        cap = gpu_cap if kind == "gpu" else cpu_cap
        base = w["gpu_latency_s"] if kind == "gpu" else w["cpu_latency_s"]
        # inflight per replica at 60 % busy (Little's law), the tier's target
        target = max(1, round(0.6 * cap * base * (1 + w["batching_slowdown"] * 0.6)))
        return ScalingPolicy(
            min_replicas=1, max_replicas=2 * peak_replicas(arrivals, cap), metric="inflight",
            target=target, scale_up_window_seconds=0, scale_down_window_seconds=300,
            metrics_unavailable_replicas=1,
        )

    gpu_power = PowerPolicy("adaptive", 200, 700)
    out = {}
    for name in "abcd":
        if name == "a":
            parts = [("gpu", all_gpu, np.ones(n_req, bool),
                      dict(fixed_replicas=peak_replicas(all_gpu, gpu_cap), scaling=None,
                           power=None))]
        else:
            auto = name in "cd"
            parts = [
                ("cpu", small_arr, tiers == 0, dict(
                    fixed_replicas=None if auto else peak_replicas(small_arr, cpu_cap),
                    scaling=scaling_for("cpu", small_arr) if auto else None, power=None)),
                ("gpu", large_arr, tiers == 1, dict(
                    fixed_replicas=None if auto else peak_replicas(large_arr, gpu_cap),
                    scaling=scaling_for("gpu", large_arr) if auto else None,
                    power=gpu_power if name == "d" else None)),
            ]
        energy = 0.0
        latency = np.zeros(n_req)
        gpu_reps = None
        for kind, arrivals, mask, kw in parts:
            r = simulate_tier(arrivals, kind=kind, latency_target_ms=latency_target, t0=t0, **kw)
            energy += r.energy_j
            latency[mask] = r.latency_s[second_of[mask]] * jitter[mask]
            if kind == "gpu":
                gpu_reps = r.replicas
        correct = np.where(tiers == 1, large_ok[idx], small_ok[idx]) if name != "a" \
            else large_ok[idx]
        ms = latency * 1000
        out[name] = {
            "energy_kwh": round(energy / 3.6e6, 3),
            "joules_per_request": round(energy / n_req, 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "slo_attainment": round(float((ms <= w["slo_ms"]).mean()), 4),
            "quality": round(float(correct.mean()), 4),
            "gpu_replicas_mean": round(float(gpu_reps.mean()), 2),
        }
    out["energy_saving_d_vs_a"] = round(1 - out["d"]["energy_kwh"] / out["a"]["energy_kwh"], 4)
    out["_meta"] = {
        "requests": n_req,
        "large_share": round(float((tiers == 1).mean()), 4),
        "quality_all_small": round(float(small_ok[idx].mean()), 4),
        "quality_all_large": round(float(large_ok[idx].mean()), 4),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--mean-rps", type=float, default=25.0)
    p.add_argument("--large-share", type=float, default=0.4)
    p.add_argument("--prompts", type=int, default=None, help="use only the first N prompts")
    args = p.parse_args(argv)
    print("SIMULATION, not a measurement: one simulated day; Terrace's classifier, calibration,")
    print("scaling and power policy make every decision; GPU/CPU power, throughput, start-up")
    print("delays and service times are modelled (constants and sources: docs/power.md).")
    print(f"hardware: {HARDWARE}")
    print(f"workload: {WORKLOAD}")
    try:
        res = run(args)
    except ImportError as exc:
        print(f"cannot run: the router's classifier/calibration is not importable ({exc})",
              file=sys.stderr)
        return 1
    meta = res.pop("_meta")
    saving = res.pop("energy_saving_d_vs_a")
    print(f"requests: {meta['requests']}, share to large tier: {meta['large_share']}, "
          f"quality all-small {meta['quality_all_small']} / all-large {meta['quality_all_large']}, "
          f"simulated in {meta['seconds']} s")
    hdr = (f"{'scenario':<34}{'kWh':>8}{'J/req':>9}{'p99 ms':>9}{'SLO %':>8}{'quality':>9}"
           f"{'GPUs':>7}")
    print(hdr)
    labels = {
        "a": "a all on GPU, full power, peak",
        "b": "b tiered routing",
        "c": "c + autoscaling",
        "d": "d + power control",
    }
    for k, v in res.items():
        print(f"{labels[k]:<34}{v['energy_kwh']:>8.3f}{v['joules_per_request']:>9.1f}"
              f"{v['p99_ms']:>9.0f}{100 * v['slo_attainment']:>8.2f}{v['quality']:>9.4f}"
              f"{v['gpu_replicas_mean']:>7.2f}")
    halfway = (meta["quality_all_small"] + meta["quality_all_large"]) / 2
    d = res["d"]
    print(f"energy saving d vs a: {saving:.1%} (target >= 40 %); d within SLO "
          f"{d['slo_attainment']:.2%} (target >= 99 %); d quality {d['quality']:.4f} "
          f"(target >= {halfway:.4f}, halfway from all-small to all-large)")
    final = {k: {f: v[f] for f in ("energy_kwh", "joules_per_request", "p99_ms",
                                    "slo_attainment", "quality")} for k, v in res.items()}
    final["energy_saving_d_vs_a"] = saving
    print(json.dumps(final, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
