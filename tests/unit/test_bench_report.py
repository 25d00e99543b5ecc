"""`make bench`'s settings and report: ratios to the ceiling, medians, the notes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from bench.configs import H2LOAD, WRK, Config
from bench.load import (
    OutputError,
    Run,
    combine_h2load,
    parse_h2load,
    per_connection_requests,
    percentile,
)
from bench.report import render
from bench.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from pathlib import Path

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


def config(name: str, role: str, *runs: Run, client: str = WRK) -> Config:
    return Config(name, role, client, runs=list(runs))


def table_row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_ratios_are_to_the_references_medians() -> None:
    configs = [
        # medians: 4,000 req/s at 100 % CPU -> 4,000 per CPU-second, p99 10 ms, 50 MiB
        config("uvicorn", "ceiling", run(3_000, 1.0), run(4_000, 1.0), run(9_000, 1.0)),
        # 2,000 req/s at 100 % -> 50 %, p99 20 ms -> 2.00 x
        config("peer", "peer", run(2_000, 1.0, p99=20)),
        # half the core: 1,000 req/s is 2,000 per CPU-second... and ours does 3,000
        config("ours", "ours", run(1_500, 0.5, p99=5, rss_mib=125)),
        config("ours off", "ours-off", run(2_000, 0.5)),
    ]
    report = render(configs, ["a note"], "", SETTINGS)
    uvicorn, peer, ours = (table_row(report, n) for n in ("uvicorn", "peer", "ours"))
    assert uvicorn[1:5] == ["4,000", "100%", "4,000", "100%"]
    assert peer[1:6] == ["2,000", "50%", "2,000", "50%", "500"]  # µs per request
    assert peer[7:9] == ["20.00", "2.00"]
    assert ours[1:5] == ["1,500", "38%", "3,000", "75%"]
    assert ours[9:11] == ["125", "2.50"]  # peak RSS MiB, x the reference's
    assert "ours vs peer: per server CPU-second 3,000 vs 2,000 (**1.50 x**, ahead)" in report
    assert "p99 5.00 vs 20.00 ms (no worse)" in report
    assert "access logs + HTTP metrics cost +83 µs" in report  # 333 - 250
    assert "**75%** per server CPU-second (target ≥ 60 %)" in report
    assert "OTLP" not in report  # not measured: no line
    assert "- a note" in report


def test_each_client_has_its_own_reference() -> None:
    configs = [
        config("uvicorn", "ceiling", run(4_000, 1.0)),
        config("uvicorn", "ceiling", run(2_000, 1.0), client=H2LOAD),
        config("ours", "ours", run(1_000, 1.0), client=H2LOAD),
    ]
    report = render(configs, [], "", SETTINGS)
    h2 = report.split("## HTTP/2", 1)[1]
    assert "| ours | 1,000 | 50% |" in h2


def test_a_client_without_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="no bare-uvicorn row measured with h2load"):
        render([config("ours", "ours", run(1_000, 1.0), client=H2LOAD)], [], "", SETTINGS)


H2LOAD_OUT = """finished in 10.00s, 2334.50 req/s, 1.23MB/s
requests: 23345 total, 23345 started, 23340 done, 23338 succeeded, 2 failed, 0 errored, 1 timeout
status codes: 23338 2xx, 0 3xx, 2 4xx, 0 5xx
"""


def test_h2load_summary_and_log_are_read() -> None:
    log = "".join(
        f"1700000000{i:06d}\t200\t{us}\n" for i, us in enumerate(range(1000, 101000, 1000))
    )
    rps, p50, p99, requests, errors = parse_h2load(H2LOAD_OUT, log)
    assert rps == pytest.approx(2334.50)
    assert (p50, p99) == (pytest.approx(50.0), pytest.approx(99.0))
    assert requests == 23340
    assert errors == 3


def test_h2load_batches_add_up() -> None:
    # Two batches of 8 connections x 1000 requests; the second had 3 streams refused.
    first = "finished in 4.00s, 2000.00 req/s, 1MB/s\nrequests: 8000 total, 8000 started, "
    first += "8000 done, 8000 succeeded, 0 failed, 0 errored, 0 timeout\n"
    second = first.replace("8000 succeeded, 0 failed", "7997 succeeded, 3 failed")
    log = "".join(f"1\t200\t{us}\n" for us in range(1, 201))
    _, p50, p99, requests, errors = combine_h2load([first, second], log)
    assert (requests, errors) == (16000, 3)
    assert (p50, p99) == (pytest.approx(0.1), pytest.approx(0.198))  # over the whole log
    with pytest.raises(OutputError, match="no h2load batch"):
        combine_h2load([], log)


def test_h2load_batches_follow_nginx_keepalive_requests(tmp_path: Path) -> None:
    # The shipped value, from its one home; and a config without it is an error.
    assert per_connection_requests() >= 100
    conf = tmp_path / "connection.conf"
    conf.write_text("keepalive_timeout 30s;\nkeepalive_requests 250;\n")
    assert per_connection_requests(conf) == 250
    conf.write_text("# keepalive_requests 250;\n")
    with pytest.raises(OutputError, match="no keepalive_requests"):
        per_connection_requests(conf)


def test_h2load_without_requests_is_an_error() -> None:
    with pytest.raises(OutputError, match="no request"):
        parse_h2load(H2LOAD_OUT, "")
    with pytest.raises(OutputError, match="req/s"):
        parse_h2load("connect: Connection refused", "1\t200\t5\n")


def test_nearest_rank_percentile() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2
    assert percentile([1, 2, 3, 4], 99) == 4
    assert percentile([7], 1) == 7


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="BENCH_SECONDS='ten'"):
        load_settings({"BENCH_SECONDS": "ten"})
    with pytest.raises(SettingsError, match="BENCH_ROUNDS=0 is out of range"):
        load_settings({"BENCH_ROUNDS": "0"})


def test_server_and_client_need_different_cores() -> None:
    with pytest.raises(SettingsError, match="different cores"):
        load_settings({"BENCH_SERVER_CPU": "1", "BENCH_CLIENT_CPU": "1"})


def test_otlp_price_is_ours_with_export_minus_without() -> None:
    configs = [
        config("uvicorn", "ceiling", run(4_000, 1.0)),
        config("ours", "ours", run(2_000, 1.0, p99=10)),  # 500 µs per request
        config("ours otlp", "ours-otlp", run(1_600, 1.0, p99=12)),  # 625 µs
    ]
    report = render(configs, [], "", SETTINGS)
    assert (
        "[wrk] OTLP span export (OTEL_EXPORTER_OTLP_ENDPOINT set vs unset) costs +125 µs of "
        "server CPU per request (500 -> 625), req/s x0.80, p99 10.00 -> 12.00 ms"
    ) in report


def test_the_full_path_is_split_into_edge_and_app_side() -> None:
    ours = run(2_000, 1.0)  # 500 µs per request: nginx 100 + gunicorn 400
    ours.parts_cpu = {"nginx": 0.2, "gunicorn": 0.8}
    configs = [config("uvicorn", "ceiling", run(5_000, 1.0)), config("ours", "ours", ours)]
    report = render(configs, [], "", SETTINGS)
    assert (
        "where the full path's 500 µs per request go (wrk): nginx (TLS, proxy, access log) "
        "100 µs, the app side (gunicorn + serving layer + app) 400 µs vs bare uvicorn's 200 µs"
    ) in report
    # 200 / (200 + 100) = 67 %; 60 %: 333 µs in all, 33 over bare uvicorn for the app side
    assert "this nginx alone would allow 67%; 60 % leaves the app side +33 µs" in report
    assert "(it takes +200)" in report
