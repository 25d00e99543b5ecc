"""How many CPUs this process may really use, and the worker count that follows.

`os.cpu_count()` reports the host's cores, not the container's share: a container limited
to 2 CPUs on a 64-core host would start 64 workers and thrash. The quota comes from cgroup
v2 (`cpu.max`), cgroup v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) and CPU affinity;
the smallest wins. https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["MIN_WORKERS", "cgroup_cpu_limit", "effective_cpus", "worker_count"]

# One dead or stuck worker must never take the whole capacity with it.
MIN_WORKERS = 2


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_dirs(root: Path, proc_self_cgroup: Path) -> list[Path]:
    """Candidate cgroup directories of this process, most specific first."""
    dirs: list[Path] = []
    text = _read(proc_self_cgroup) or ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], parts[2].lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            dirs.append(root / rel)
        elif "cpu" in controllers.split(","):
            for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                dirs.append(root / mount / rel)
    # Inside a container the own cgroup is usually mounted at the root itself.
    dirs += [root, root / "cpu,cpuacct", root / "cpu", root / "cpuacct,cpu"]
    return dirs


def cgroup_cpu_limit(
    root: Path = Path("/sys/fs/cgroup"), proc_self_cgroup: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs allowed by the cgroup quota, or None when there is no quota."""
    for directory in _own_cgroup_dirs(root, proc_self_cgroup):
        v2 = _read(directory / "cpu.max")
        if v2 is not None:
            quota, _, period = v2.partition(" ")
            if quota == "max":
                return None
            try:
                return int(quota) / int(period or "100000")
            except ValueError:
                return None
        quota_v1 = _read(directory / "cpu.cfs_quota_us")
        period_v1 = _read(directory / "cpu.cfs_period_us")
        if quota_v1 is not None and period_v1 is not None:
            try:
                quota_us, period_us = int(quota_v1), int(period_v1)
            except ValueError:
                return None
            if quota_us <= 0 or period_us <= 0:  # -1 means unlimited
                return None
            return quota_us / period_us
    return None


def _affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def effective_cpus(
    root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: Path = Path("/proc/self/cgroup"),
    affinity: int | None = None,
) -> float:
    """The CPUs this process can use: min(cgroup quota, CPU affinity)."""
    cpus = float(affinity if affinity is not None else _affinity_cpus())
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    return cpus


def worker_count(configured: int | None, cpus: float | None = None) -> int:
    """WEB_CONCURRENCY when set; else one async worker per usable CPU, at least 2."""
    if configured is not None:
        return configured
    usable = effective_cpus() if cpus is None else cpus
    return max(MIN_WORKERS, math.ceil(usable))
