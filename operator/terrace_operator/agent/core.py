"""The agent's job, without Kubernetes: apply, read back, restore.

`PowerAgent.reconcile(desired_watts)` is one pass: for each GPU, clamp the
desired limit to the device's constraints, set it if the enforced limit
differs (a new value, or drift: someone or a driver reload put it back),
read the enforced limit back, and collect readings for the metrics. A
driver that went away is re-initialised on the next pass, and the limit is
re-applied then. `restore_defaults()` puts every GPU the agent changed back
to its default limit (SIGTERM, or the operator asking for nothing).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from terrace_operator.agent.backend import BackendError, GpuBackend, NeedsReinit
from terrace_operator.agent.protocol import GpuReport

log = logging.getLogger("terrace.agent")


@dataclass
class GpuReading:
    index: int
    name: str = ""
    uuid: str = ""
    min_mw: int = 0
    max_mw: int = 0
    default_mw: int = 0
    enforced_mw: int | None = None
    desired_mw: int | None = None
    power_mw: int | None = None
    utilization: float | None = None  # 0..1
    energy_joules: float = 0.0  # monotonic across driver reloads
    _last_raw_mj: int | None = field(default=None, repr=False)

    def report(self) -> GpuReport:
        return GpuReport(
            self.index,
            (self.enforced_mw or 0) / 1000,
            self.default_mw / 1000,
            self.min_mw / 1000,
            self.max_mw / 1000,
            None if self.power_mw is None else self.power_mw / 1000,
            self.name,
            self.uuid,
        )


class PowerAgent:
    def __init__(self, backend: GpuBackend, node_name: str) -> None:
        self.backend = backend
        self.node_name = node_name
        self.gpus: dict[int, GpuReading] = {}
        self.managed: set[int] = set()  # GPUs whose limit we changed
        self.reapplied_total = 0
        self.reinit_total = 0
        self.errors_total = 0
        self._needs_init = True
        self._lock = threading.Lock()

    # --- lifecycle ---
    def _init(self) -> None:
        self.backend.init()
        count = self.backend.device_count()
        for i in range(count):
            g = self.gpus.setdefault(i, GpuReading(i))
            g.name = self.backend.name(i)
            g.uuid = self.backend.uuid(i)
            g.min_mw, g.max_mw = self.backend.power_limit_constraints_mw(i)
            g.default_mw = self.backend.default_power_limit_mw(i)
        self._needs_init = False

    def start(self) -> None:
        with self._lock:
            self._init()

    def close(self) -> None:
        self.backend.shutdown()

    # --- one pass ---
    def reconcile(self, desired_watts: int | None) -> list[GpuReport]:
        with self._lock:
            if self._needs_init:
                try:
                    self._init()
                    self.reinit_total += 1
                    log.info("NVML (re)initialised: %d GPU(s)", len(self.gpus))
                except BackendError as exc:
                    self.errors_total += 1
                    log.warning("NVML init failed: %s", exc)
                    return [g.report() for g in self.gpus.values()]
            for i in sorted(self.gpus):
                try:
                    self._reconcile_gpu(self.gpus[i], desired_watts)
                except NeedsReinit as exc:
                    log.warning("GPU driver gone (%s); re-initialising next pass", exc)
                    self._needs_init = True
                    self.errors_total += 1
                    break
                except BackendError as exc:
                    log.warning("GPU %d: %s", i, exc)
                    self.errors_total += 1
            return [g.report() for g in self.gpus.values()]

    def _reconcile_gpu(self, g: GpuReading, desired_watts: int | None) -> None:
        b = self.backend
        enforced = b.enforced_power_limit_mw(g.index)
        if desired_watts is None:
            target = g.default_mw if g.index in self.managed else None
        else:
            target = max(g.min_mw, min(g.max_mw, int(desired_watts) * 1000))
        if target is not None and enforced != target:
            if g.index in self.managed and g.desired_mw == target:
                # We set this before and it moved: a driver reload or another
                # tool. Put it back, and count it so drift is visible.
                self.reapplied_total += 1
                log.info("GPU %d limit drifted to %d mW; re-applying %d mW",
                         g.index, enforced, target)
            b.set_power_limit_mw(g.index, target)
            enforced = b.enforced_power_limit_mw(g.index)
        if desired_watts is None and target is not None:
            self.managed.discard(g.index)
            g.desired_mw = None
        elif target is not None:
            self.managed.add(g.index)
            g.desired_mw = target
        g.enforced_mw = enforced
        g.power_mw = b.power_usage_mw(g.index)
        g.utilization = b.utilization_percent(g.index) / 100.0
        raw = b.total_energy_mj(g.index)
        if g._last_raw_mj is None or raw < g._last_raw_mj:
            # first read, or the driver's counter restarted: count from here
            g._last_raw_mj = raw if g._last_raw_mj is None else 0
        g.energy_joules += (raw - g._last_raw_mj) / 1000.0
        g._last_raw_mj = raw

    def restore_defaults(self) -> None:
        """Every GPU we changed goes back to its default limit."""
        with self._lock:
            if self._needs_init:
                try:
                    self._init()
                except BackendError as exc:
                    log.error("cannot restore defaults, NVML unavailable: %s", exc)
                    return
            for i in sorted(self.managed):
                g = self.gpus[i]
                try:
                    self.backend.set_power_limit_mw(i, g.default_mw)
                    g.enforced_mw = self.backend.enforced_power_limit_mw(i)
                    g.desired_mw = None
                    log.info("GPU %d restored to its default %d mW", i, g.default_mw)
                except BackendError as exc:
                    log.error("GPU %d: restoring default failed: %s", i, exc)
            self.managed.clear()

    def reports(self) -> list[GpuReport]:
        with self._lock:
            return [g.report() for g in self.gpus.values()]
