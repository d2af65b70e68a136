"""Prometheus metrics of one runtime process, on a registry owned by the app
(no global registry: two apps in one test process must not collide).

Energy: without a power meter the runtime estimates CPU energy with a linear
model, joules = watts_per_busy_core x CPU-seconds spent while the worker
computes a batch (process CPU time, so every onnxruntime/torch thread counts).
A batch's joules are split over its requests by their share of the batch's
rows (tensor models) or tokens (text generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENERGY_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 50.0, 100.0)


@dataclass(frozen=True)
class CpuPowerModel:
    """Watts drawn per fully busy core above idle. A modern server core under
    load draws roughly 5-15 W; 10 W is a middle guess, set it from your
    hardware's TDP / core count."""

    watts_per_busy_core: float = 10.0

    def joules(self, cpu_seconds: float) -> float:
        return max(0.0, cpu_seconds) * self.watts_per_busy_core


# The `endpoint` label of terrace_runtime_requests_total (http.instrumented).
SERVED_ENDPOINTS = ("completions", "chat_completions", "infer")


class RuntimeMetrics:
    def __init__(self, model: str, energy: CpuPowerModel | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.energy = energy
        r = self.registry
        labels = ["model"]
        self.request_duration = Histogram(
            "terrace_runtime_request_duration_seconds",
            "Time from receiving a request to sending its answer (streams: to the last byte).",
            [*labels, "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "terrace_runtime_queue_wait_seconds",
            "Time a request waited in the batching queue before its batch started.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "terrace_runtime_batch_size",
            "Rows (tensor models) or sequences (text generation) per forward pass.",
            labels,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "terrace_runtime_queue_depth", "Requests waiting for a batch.", labels, registry=r
        )
        self.inflight = Gauge(
            "terrace_runtime_inflight_requests",
            "Requests accepted and not yet answered (queued or computing).",
            labels,
            registry=r,
        )
        self.tokens_generated = Counter(
            "terrace_runtime_tokens_generated_total", "Tokens generated.", labels, registry=r
        )
        self.prompt_tokens = Counter(
            "terrace_runtime_prompt_tokens_total", "Prompt tokens read.", labels, registry=r
        )
        self.errors = Counter(
            "terrace_runtime_errors_total",
            "Failed requests by kind (invalid_request, queue_full, not_ready, not_found, "
            "inference, internal).",
            [*labels, "kind"],
            registry=r,
        )
        self.requests = Counter(
            "terrace_runtime_requests_total",
            "Answered requests by HTTP status code.",
            [*labels, "endpoint", "status"],
            registry=r,
        )
        self.busy = Counter(
            "terrace_runtime_busy_seconds_total",
            "Wall time the inference worker spent computing.",
            labels,
            registry=r,
        )
        self.cpu = Counter(
            "terrace_runtime_cpu_seconds_total",
            "Process CPU time (all threads) while the inference worker computed.",
            labels,
            registry=r,
        )
        self.ready = Gauge(
            "terrace_runtime_ready", "1 once the model is loaded and warmed up.", labels, registry=r
        )
        self.info = Gauge(
            "terrace_runtime_model_info",
            "The model this process serves (always 1; the labels carry the facts).",
            [*labels, "format", "task", "device", "quantization", "threads"],
            registry=r,
        )
        self.energy_joules = self.request_energy = None
        if energy is not None:
            self.energy_joules = Counter(
                "terrace_runtime_energy_joules_total",
                "Estimated energy of inference (CPU power model: watts per busy core x "
                "CPU seconds).",
                labels,
                registry=r,
            )
            self.request_energy = Histogram(
                "terrace_runtime_request_energy_joules",
                "Estimated energy per request (its share of its batches' joules).",
                labels,
                buckets=ENERGY_BUCKETS,
                registry=r,
            )
        self.ready.labels(model).set(0)
        # Label lookups cost a lock and a dict per call; the hot path reuses children.
        self._children: dict[tuple[object, ...], Any] = {}
        # Every counter a rate or an increase() is taken of exists at 0 from the
        # start (Prometheus's advice): a series first scraped at 1 shows no
        # increase, and the first requests after a start would vanish from the
        # operator's energy and demand figures.
        for counter in (self.tokens_generated, self.prompt_tokens, self.busy, self.cpu,
                        self.energy_joules):
            if counter is not None:
                self.child(counter)
        for endpoint in SERVED_ENDPOINTS:
            self.child(self.requests, endpoint, "200")

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(model, *labels)`, cached."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(self.model, *labels)
        return found

    # Small helpers keep the label plumbing out of the serving code.
    def observe_batch(self, size: int, wall_s: float, cpu_s: float) -> float:
        """Record one forward pass; returns its estimated joules (0 without a model)."""
        self.child(self.batch_size).observe(size)
        self.child(self.busy).inc(wall_s)
        self.child(self.cpu).inc(cpu_s)
        if self.energy is None or self.energy_joules is None:
            return 0.0
        joules = self.energy.joules(cpu_s)
        self.child(self.energy_joules).inc(joules)
        return joules

    def observe_request_energy(self, joules: float) -> None:
        if self.request_energy is not None:
            self.child(self.request_energy).observe(joules)

    def error(self, kind: str) -> None:
        self.child(self.errors, kind).inc()
