"""How many cores this container may use: the cgroup CPU limit, not the host's.

`os.cpu_count()` reports the node's cores; a pod limited to 1 CPU that sizes
its onnxruntime/torch thread pools from it oversubscribes and gets throttled
by CFS. We read cgroup v2's `cpu.max` or cgroup v1's CFS quota instead, and
take the CPU affinity mask into account (cpusets, `taskset`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("max 100000" or "150000 100000") -> CPUs, None if unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else 100_000
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` -> CPUs; quota -1 is unlimited."""
    quota = int(quota_text.strip())
    period = int(period_text.strip())
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def threads_for(limit: float | None, available: int) -> int:
    """Threads to run: the limit rounded up (a 1.5-CPU pod can keep 2 busy), never
    above the cores we may be scheduled on, never below 1."""
    if limit is None:
        return max(1, available)
    return max(1, min(available, math.ceil(limit)))


def _own_cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """The v2 path and the v1 `cpu` controller path from /proc/self/cgroup."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The CPU limit of this process's cgroup in CPUs, or None when unlimited or unknown.

    Inside a container with a cgroup namespace our cgroup is the root of the
    mount, so we look there first, then under the path /proc/self/cgroup names
    (hosts without cgroup namespaces)."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    v2_path, v1_path = _own_cgroup_paths(proc_cgroup)
    limits: list[float] = []

    for base in _candidates(root, v2_path):
        text = _read(base / "cpu.max")
        if text is not None:
            limit = parse_cpu_max(text)
            if limit is not None:
                limits.append(limit)
    for controller_dir in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for base in _candidates(root / controller_dir, v1_path):
            quota = _read(base / "cpu.cfs_quota_us")
            period = _read(base / "cpu.cfs_period_us")
            if quota is not None and period is not None:
                limit = parse_cfs(quota, period)
                if limit is not None:
                    limits.append(limit)
    # Several levels may set a quota; the tightest one binds.
    return min(limits) if limits else None


def _candidates(base: Path, own: str | None) -> list[Path]:
    paths = [base]
    if own and own not in ("/", ""):
        paths.append(base / own.lstrip("/"))
    return paths


def available_cores() -> int:
    """Cores the scheduler may run us on (the affinity mask), falling back to cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def container_threads(override: int | None = None) -> int:
    """Intra-op threads for the model: an explicit override, else the cgroup limit."""
    if override is not None and override > 0:
        return override
    return threads_for(cgroup_cpu_limit(), available_cores())
