"""The agent's Prometheus metrics, read from its last readings at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from terrace_operator.agent.core import PowerAgent


class AgentCollector(Collector):
    def __init__(self, agent: PowerAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        labels = ["node", "gpu", "uuid"]
        power = GaugeMetricFamily(
            "terrace_gpu_power_watts", "GPU power draw, 1 s average (NVML)", labels=labels
        )
        limit = GaugeMetricFamily(
            "terrace_gpu_power_limit_watts", "Enforced GPU power limit read back from NVML",
            labels=labels,
        )
        desired = GaugeMetricFamily(
            "terrace_gpu_power_limit_desired_watts",
            "Power limit the agent is applying (after clamping); absent when left at default",
            labels=labels,
        )
        default = GaugeMetricFamily(
            "terrace_gpu_power_limit_default_watts", "The GPU's default power limit", labels=labels
        )
        util = GaugeMetricFamily(
            "terrace_gpu_utilization_ratio", "Fraction of time the GPU was busy", labels=labels
        )
        energy = CounterMetricFamily(
            "terrace_gpu_energy_joules", "GPU energy since the agent started (NVML)", labels=labels
        )
        with a._lock:
            gpus = list(a.gpus.values())
            reapplied, reinit, errors = a.reapplied_total, a.reinit_total, a.errors_total
        for g in gpus:
            lv = [a.node_name, str(g.index), g.uuid]
            if g.power_mw is not None:
                power.add_metric(lv, g.power_mw / 1000)
            if g.enforced_mw is not None:
                limit.add_metric(lv, g.enforced_mw / 1000)
            if g.desired_mw is not None:
                desired.add_metric(lv, g.desired_mw / 1000)
            default.add_metric(lv, g.default_mw / 1000)
            if g.utilization is not None:
                util.add_metric(lv, g.utilization)
            energy.add_metric(lv, g.energy_joules)
        yield from (power, limit, desired, default, util, energy)
        node = [a.node_name]
        for name, doc, value in (
            ("terrace_agent_limit_reapplied", "Limits re-applied after drift", reapplied),
            ("terrace_agent_nvml_reinit", "NVML re-initialisations", reinit),
            ("terrace_agent_errors", "GPU calls that failed", errors),
        ):
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric(node, value)
            yield c
