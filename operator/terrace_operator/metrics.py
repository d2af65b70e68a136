"""The operator's own Prometheus metrics (syncs, queues, ticks), in a private registry.

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
            "Custom resources waiting to be synced, by kind.",
            ["kind"],
            registry=self.registry,
        )
        # Evidence that the control tick ran, per tier: "held N replicas for
        # three ticks" can be read off the operator instead of a wall clock.
        self.control_ticks = Counter(
            "terrace_operator_control_ticks",
            "Control ticks completed per ModelTier (signals read, replicas and power "
            "decided, status written).",
            ["namespace", "tier"],
            registry=self.registry,
        )
        self.control_tick_seconds = Histogram(
            "terrace_operator_control_tick_duration_seconds",
            "From reading Prometheus to the last tier's tick done, per control tick.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.prometheus_queries = Counter(
            "terrace_operator_prometheus_queries",
            "PromQL queries the control tick sent (one per metric kind, plus one per "
            "tier with a custom query).",
            registry=self.registry,
        )
        self.leader = Gauge(
            "terrace_operator_leader",
            "1 while this replica holds the leader Lease (or runs without election).",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a background thread; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
