"""`make bench`'s settings and report: ratios to the ceiling, medians, the notes."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.configs import Config
from bench.load import Run
from bench.processes import Server
from bench.report import render
from bench.settings import SettingsError, load_settings

SETTINGS = load_settings({"BENCH_SERVER_CPU": "0", "BENCH_CLIENT_CPU": "1"})


def run(rps: float, cpu: float, p99: float = 10.0, rss_mib: int = 50) -> Run:
    return Run(
        rps=rps,
        p50_ms=p99 / 2,
        p99_ms=p99,
        requests=int(rps * 10),
        errors=0,
        server_cpu=cpu,
        client_cpu=0.3,
        capped=False,
        parts_cpu={"server": cpu},
        peak_rss=rss_mib * 2**20,
    )


def config(name: str, role: str, *runs: Run) -> Config:
    return Config(
        name, "http://127.0.0.1:1/api/hello", Server(name, Path("/dev/null")), list(runs), role=role
    )


def table_row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_ratios_are_to_the_ceilings_medians() -> None:
    configs = [
        # medians: 4,000 req/s at 100 % CPU -> 4,000 per CPU-second, p99 10 ms
        config("ceiling", "ceiling", run(3_000, 1.0), run(4_000, 1.0), run(9_000, 1.0)),
        # 2,000 req/s at 100 % -> 50 %, p99 20 ms -> 2.00 x
        config("gunicorn", "gunicorn", run(2_000, 1.0, p99=20)),
        config("no log", "no-log", run(2_500, 1.0)),
        # half the core: 1,000 req/s is 2,000 per CPU-second
        config("nginx", "nginx", run(1_000, 0.5, p99=5, rss_mib=120)),
    ]
    report = render(configs, ["a note"], "", SETTINGS)
    ceiling, gunicorn, nginx = (table_row(report, n) for n in ("ceiling", "gunicorn", "nginx"))
    assert ceiling[1:5] == ["4,000", "100%", "4,000", "100%"]
    assert gunicorn[1:6] == ["2,000", "50%", "2,000", "50%", "500"]  # µs per request
    assert gunicorn[8:10] == ["20.00", "2.00"]
    assert nginx[1:5] == ["1,000", "25%", "2,000", "50%"]
    assert nginx[10] == "120"  # peak RSS MiB
    assert "req/s **25%** (per server CPU-second **50%**), p99 **0.50 x**" in report
    assert "Access line (gunicorn with vs without): **20%**" in report
    assert "- a note" in report


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="BENCH_SECONDS='ten'"):
        load_settings({"BENCH_SECONDS": "ten"})
    with pytest.raises(SettingsError, match="BENCH_ROUNDS=0 is out of range"):
        load_settings({"BENCH_ROUNDS": "0"})


def test_server_and_client_need_different_cores() -> None:
    with pytest.raises(SettingsError, match="different cores"):
        load_settings({"BENCH_SERVER_CPU": "1", "BENCH_CLIENT_CPU": "1"})
