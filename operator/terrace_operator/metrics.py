"""The operator's own Prometheus metrics (reconciles, queue), in a private registry.

A private CollectorRegistry keeps importing this module free of side effects
and lets tests build as many operators as they like in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconcile_total = Counter(
            "terrace_operator_reconcile_total",
            "Reconciles by custom resource kind and result (success, conflict, error).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "terrace_operator_reconcile_duration_seconds",
            "Time one reconcile of one custom resource took.",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "terrace_operator_queue_depth",
            "Custom resources waiting to be reconciled.",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
