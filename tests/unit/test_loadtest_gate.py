"""The load test gate: summary from Locust's stats, thresholds, the cross-check verdict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtests.gate import (
    CrossCheck,
    Failure,
    app_route,
    evaluate,
    is_app_routed,
    load_failures,
    load_locust_json,
    percentile,
    render_table,
    summarize,
)
from loadtests.settings import RouteThresholds, Thresholds

T0 = 1_700_000_000.0


def entry(
    name: str,
    method: str = "GET",
    times: dict[int, int] | None = None,
    failures: int = 0,
    start: float = T0,
    end: float = T0 + 10,
) -> dict[str, Any]:
    """A Locust StatsEntry as `--json-file` writes it (histogram keys are JSON strings)."""
    times = times or {10: 100}
    requests = sum(times.values())
    return {
        "name": name,
        "method": method,
        "last_request_timestamp": end,
        "start_time": start,
        "num_requests": requests,
        "num_none_requests": 0,
        "num_failures": failures,
        "total_response_time": sum(t * n for t, n in times.items()),
        "max_response_time": max(times),
        "min_response_time": min(times),
        "total_content_length": 0,
        "response_times": {str(t): n for t, n in times.items()},
        "num_reqs_per_sec": {},
        "num_fail_per_sec": {},
    }


LOOSE = Thresholds(min_rps=10, max_p95_ms=100, max_p99_ms=200, max_error_ratio=0.01)


# --- percentiles and the summary ---------------------------------------------------------


def test_percentile_matches_locusts_own_definition() -> None:
    histograms = [
        {1: 1},
        {5: 90, 50: 9, 900: 1},
        {3: 10, 4: 10, 5: 10, 6: 10, 7: 10, 8: 10, 9: 10, 10: 10, 11: 10, 12: 10},
        {100: 3, 110: 7, 1200: 1, 2: 989},
    ]
    fractions = [0.5, 0.95, 0.99, 1.0]
    script = (
        "import json,sys\n"
        "from locust.stats import calculate_response_time_percentile as p\n"
        "hs=json.loads(sys.argv[1]); fs=json.loads(sys.argv[2])\n"
        "print(json.dumps([[p({int(k):v for k,v in h.items()}, sum(h.values()), f) for f in fs]"
        " for h in hs]))"
    )
    # In a subprocess: importing locust monkey-patches the interpreter (gevent).
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(histograms), json.dumps(fractions)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    expected = json.loads(out)
    ours = [[percentile(h, f) for f in fractions] for h in histograms]
    assert ours == expected


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile({}, 0.99) == 0


def test_summary_aggregates_routes_over_the_test_window() -> None:
    summary = summarize(
        [
            entry("/api/hello", times={5: 600}, end=T0 + 10),
            entry("/api/items/{item_id}", times={8: 300}, failures=3, end=T0 + 9),
            entry("/", times={2: 100}, end=T0 + 8),
        ]
    )
    assert summary.duration_s == pytest.approx(10)
    assert summary.total.requests == 1000
    assert summary.total.failures == 3
    assert summary.total.rps == pytest.approx(100)
    assert summary.total.error_ratio == pytest.approx(0.003)
    hello = next(r for r in summary.routes if r.name == "/api/hello")
    assert hello.rps == pytest.approx(60)
    assert hello.p99_ms == 5
    assert summary.total.avg_ms == pytest.approx((5 * 600 + 8 * 300 + 2 * 100) / 1000)
    assert summary.total.max_ms == 8


def test_latency_basis_leaves_out_the_excluded_routes_but_the_total_keeps_them() -> None:
    summary = summarize(
        [entry("/api/hello", times={5: 980}), entry("/api/slow", times={210: 20})],
        latency_excludes=["/api/slow"],
    )
    assert summary.total.p99_ms == 210
    assert summary.latency_basis.p99_ms == 5
    assert summary.latency_basis.requests == 980
    assert summary.total.requests == 1000


def test_request_names_map_to_routes_and_only_api_reaches_the_app_behind_nginx() -> None:
    assert app_route("/api/orders [422]") == "/api/orders"
    assert app_route("/api/items/{item_id} [404]") == "/api/items/{item_id}"
    assert is_app_routed("/api/items/{item_id} [404]")
    assert not is_app_routed("/static/css/{asset}")
    assert not is_app_routed("/ [discovery]")
    assert is_app_routed("/ [discovery]", prefixes=["/"])

    entries = [
        entry("/api/hello", times={5: 50}),
        entry("/api/orders [422]", "POST", times={5: 5}),
        entry("/", times={5: 7}),
        entry("/static/js/{asset}", times={5: 7}),
    ]
    assert summarize(entries).app_routed_requests == 55
    assert summarize(entries, app_prefixes=["/"]).app_routed_requests == 69


def test_summary_to_dict_is_json_ready() -> None:
    summary = summarize([entry("/api/hello")], failures=[Failure("GET", "/x", "boom", 2)])
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["total"]["requests"] == 100
    assert data["failures"] == [{"method": "GET", "name": "/x", "error": "boom", "occurrences": 2}]
    assert data["app_routed_requests"] == 100


def test_locust_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "locust.json").write_text(json.dumps([entry("/api/hello")]))
    (tmp_path / "locust_failures.csv").write_text(
        'Method,Name,Error,Occurrences\nGET,/api/hello,"expected 200, got 502: bad",4\n'
    )
    assert load_locust_json(tmp_path / "locust.json")[0]["name"] == "/api/hello"
    assert load_failures(tmp_path / "locust_failures.csv") == [
        Failure("GET", "/api/hello", "expected 200, got 502: bad", 4)
    ]
    assert load_failures(tmp_path / "missing.csv") == []


# --- thresholds ------------------------------------------------------------------------------


def missed(checks: list[Any]) -> list[str]:
    return [c.threshold for c in checks if not c.passed]


def test_a_healthy_run_passes_every_threshold() -> None:
    checks = evaluate(summarize([entry("/api/hello", times={20: 1000})]), LOOSE)
    assert missed(checks) == []
    assert "GATE PASSED" in render_table(summarize([entry("/api/hello")]), checks)


@pytest.mark.parametrize(
    ("changes", "threshold", "setting"),
    [
        ({"min_rps": 1000}, "min_rps", "LOADTEST_MIN_RPS"),
        ({"max_p95_ms": 5}, "max_p95_ms", "LOADTEST_MAX_P95_MS"),
        ({"max_p99_ms": 5}, "max_p99_ms", "LOADTEST_MAX_P99_MS"),
        ({"max_error_ratio": 0.0}, "max_error_ratio", "LOADTEST_MAX_ERROR_RATIO"),
    ],
)
def test_each_missed_threshold_is_named_with_its_setting(
    changes: dict[str, float], threshold: str, setting: str
) -> None:
    thresholds = Thresholds(**{**LOOSE.__dict__, **changes})
    summary = summarize([entry("/api/hello", times={20: 995, 40: 5}, failures=1)])
    checks = evaluate(summary, thresholds)
    assert missed(checks) == [threshold]
    failed = next(c for c in checks if not c.passed)
    assert setting in failed.describe()
    assert failed.describe().startswith("MISSED")
    table = render_table(summary, checks)
    assert "GATE FAILED: 1 threshold(s) missed" in table
    assert setting in table


def test_limits_are_inclusive() -> None:
    summary = summarize([entry("/api/hello", times={100: 1000})])  # exactly 100 req/s, 100 ms
    exact = Thresholds(min_rps=100, max_p95_ms=100, max_p99_ms=100, max_error_ratio=0)
    assert missed(evaluate(summary, exact)) == []


def test_no_requests_at_all_fails_loudly() -> None:
    checks = evaluate(summarize([]), LOOSE)
    assert {"requests", "min_rps", "max_error_ratio", "max_p95_ms", "max_p99_ms"} <= set(
        missed(checks)
    )


def test_route_thresholds_apply_to_their_route_only() -> None:
    thresholds = Thresholds(
        **{
            **LOOSE.__dict__,
            "latency_excludes": ("/api/slow",),
            "routes": {"/api/slow": RouteThresholds(max_p99_ms=300, max_error_ratio=0.0)},
        }
    )
    fast = entry("/api/hello", times={5: 990})
    ok = evaluate(summarize([fast, entry("/api/slow", times={210: 10})], ["/api/slow"]), thresholds)
    assert missed(ok) == []
    slow = entry("/api/slow", times={900: 10}, failures=1)
    bad = evaluate(summarize([fast, slow], ["/api/slow"]), thresholds)
    assert sorted(missed(bad)) == ["max_error_ratio", "max_p99_ms"]
    assert all("GET /api/slow" in c.subject for c in bad if not c.passed)
    assert all("slo.toml" in c.setting for c in bad if not c.passed)


def test_route_threshold_without_traffic_is_not_a_failure() -> None:
    thresholds = Thresholds(**{**LOOSE.__dict__, "routes": {"/api/slow": RouteThresholds(1)}})
    assert missed(evaluate(summarize([entry("/api/hello")]), thresholds)) == []


# --- the cross-check verdict ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "locust", "tolerance", "passed"),
    [(1000, 1000, 3, True), (1003, 1000, 3, True), (997, 1000, 3, True), (1004, 1000, 3, False)],
)
def test_crosscheck_tolerance(app: int, locust: int, tolerance: int, passed: bool) -> None:
    cross = CrossCheck("metrics-url", locust, app, tolerance)
    assert cross.passed is passed
    assert cross.difference == app - locust
    check = cross.as_check()
    assert check.passed is passed
    assert check.actual == abs(app - locust)
    assert "LOADTEST_CROSSCHECK_TOLERANCE" in check.describe()


def test_crosscheck_without_a_reading_does_not_pass() -> None:
    cross = CrossCheck("none", 10, None, 3, "no source")
    assert not cross.passed
    assert cross.as_check().actual is None
    assert "n/a" in cross.as_check().describe()
    table = render_table(summarize([entry("/api/hello")]), [], cross)
    assert "no source" in table
