"""terrace-batch's own Prometheus metrics, in a private registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class BatchMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter(
            "terrace_batch_passes",
            "Worker passes over the batches in progress (the grid signal read once each).",
            registry=self.registry,
        )
        self.released = Counter(
            "terrace_batch_lines_released",
            "Lines sent to the router, by why the release policy let them go.",
            ["reason"],
            registry=self.registry,
        )
        self.answered = Counter(
            "terrace_batch_lines_answered",
            "Lines whose outcome was recorded, by HTTP status class (2xx, 4xx, 5xx).",
            ["code"],
            registry=self.registry,
        )
        self.shed = Counter(
            "terrace_batch_lines_shed",
            "Lines the router shed (429, 503, no connection), back to pending.",
            registry=self.registry,
        )
        self.signal = Gauge(
            "terrace_batch_grid_signal",
            "The grid signal at the last pass (NaN: unknown).",
            registry=self.registry,
        )
