from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from server.cpu import cgroup_cpu_limit, effective_cpus, worker_count

if TYPE_CHECKING:
    from pathlib import Path


def _cgroup(tmp_path: Path, files: dict[str, str], self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {"cpu.max": "150000 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert effective_cpus(root, proc, affinity=8) == 1.5
    assert worker_count(None, effective_cpus(root, proc, affinity=8)) == 2


def test_cgroup_v2_nested_group(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        {"system.slice/app.service/cpu.max": "400000 100000\n"},
        "0::/system.slice/app.service\n",
    )
    assert cgroup_cpu_limit(root, proc) == 4.0
    assert worker_count(None, effective_cpus(root, proc, affinity=16)) == 4


def test_cgroup_v2_unlimited_falls_back_to_affinity(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cgroup_cpu_limit(root, proc) is None
    assert effective_cpus(root, proc, affinity=6) == 6
    assert worker_count(None, effective_cpus(root, proc, affinity=6)) == 6


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
        "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
    )
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert worker_count(None, effective_cpus(root, proc, affinity=32)) == 3


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    root, proc = _cgroup(
        tmp_path,
        {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
        "4:cpu,cpuacct:/\n",
    )
    assert cgroup_cpu_limit(root, proc) is None
    assert effective_cpus(root, proc, affinity=3) == 3


def test_no_cgroup_files_uses_affinity(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {}, "")
    assert cgroup_cpu_limit(root, proc) is None
    assert effective_cpus(root, proc, affinity=5) == 5


def test_affinity_smaller_than_quota_wins(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, {"cpu.max": "800000 100000"}, "0::/\n")
    assert effective_cpus(root, proc, affinity=2) == 2


@pytest.mark.parametrize(("cpus", "workers"), [(0.25, 2), (1.0, 2), (2.0, 2), (2.2, 3), (8, 8)])
def test_at_least_two_workers(cpus: float, workers: int) -> None:
    assert worker_count(None, cpus) == workers


def test_web_concurrency_wins() -> None:
    assert worker_count(5, 64.0) == 5
    assert worker_count(1, 64.0) == 1
