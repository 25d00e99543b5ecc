"""The gate: turn Locust's statistics into a summary and check it against the thresholds.

Input is what `locust --json-file` writes (one entry per request name, each with its
response-time histogram) and the `_failures.csv`; nothing here needs a running Locust, so the
logic is unit-tested with hand-made entries (tests/unit/test_loadtest_gate.py).
Percentiles use Locust's own definition (see `percentile`) so the numbers match its report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path

    from loadtests.settings import Thresholds

__all__ = [
    "Check",
    "CrossCheck",
    "Failure",
    "RouteSummary",
    "Summary",
    "app_route",
    "evaluate",
    "is_app_routed",
    "load_failures",
    "load_locust_json",
    "percentile",
    "render_table",
    "summarize",
]

# Request names are route templates, optionally tagged: "/api/items/{item_id} [404]".
TAG_SEPARATOR = " ["
# Behind nginx, "/" and "/static/..." are answered by nginx itself and only /api/ reaches
# the app; straight at gunicorn (no nginx) every path does: app_prefixes = ["/"].
DEFAULT_APP_PREFIXES = ("/api/",)
# Locust request types that are no HTTP request (a WebSocket connect, echo or session): the
# app's request counter never sees them, whatever their path.
NOT_HTTP = frozenset({"WS"})


def app_route(name: str) -> str:
    """The route template a request name stands for ("/api/orders [422]" -> "/api/orders")."""
    return name.split(TAG_SEPARATOR, 1)[0]


def is_app_routed(name: str, prefixes: Iterable[str] = DEFAULT_APP_PREFIXES) -> bool:
    """True when the request reaches the app (so the app's counters see it)."""
    return app_route(name).startswith(tuple(prefixes))


def percentile(histogram: Mapping[int, int], fraction: float) -> int:
    """Locust's percentile: the smallest bucket with at most (1 - fraction) of the count above.

    Same as locust.stats.calculate_response_time_percentile, over the rounded response
    times Locust stores (2 significant digits above 100 ms, 3 above 1 s).
    """
    total = sum(histogram.values())
    if total == 0:
        return 0
    within = int(total * fraction)  # requests that must be at or below the answer
    seen_from_top = 0
    for response_time in sorted(histogram, reverse=True):
        seen_from_top += histogram[response_time]
        if total - seen_from_top <= within:
            return response_time
    return 0  # pragma: no cover - the loop always returns for total > 0


@dataclass(frozen=True)
class RouteSummary:
    name: str
    method: str
    requests: int
    failures: int
    rps: float
    avg_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Failure:
    method: str
    name: str
    error: str
    occurrences: int


@dataclass(frozen=True)
class Summary:
    started: float
    duration_s: float
    total: RouteSummary
    latency_basis: RouteSummary  # the aggregate without the latency-excluded names
    routes: tuple[RouteSummary, ...]
    failures: tuple[Failure, ...] = ()
    app_prefixes: tuple[str, ...] = DEFAULT_APP_PREFIXES

    @property
    def app_routed_requests(self) -> int:
        return sum(
            r.requests
            for r in self.routes
            if r.method not in NOT_HTTP and is_app_routed(r.name, self.app_prefixes)
        )

    def to_dict(self) -> dict[str, Any]:
        def route(r: RouteSummary) -> dict[str, Any]:
            return {**asdict(r), "error_ratio": round(r.error_ratio, 6)}

        return {
            "started": self.started,
            "duration_s": round(self.duration_s, 3),
            "total": route(self.total),
            "latency_basis": route(self.latency_basis),
            "routes": [route(r) for r in self.routes],
            "app_prefixes": list(self.app_prefixes),
            "app_routed_requests": self.app_routed_requests,
            "failures": [asdict(f) for f in self.failures],
        }


@dataclass
class _Accumulator:
    requests: int = 0
    failures: int = 0
    total_ms: float = 0.0
    max_ms: float = 0.0
    histogram: dict[int, int] = field(default_factory=dict)

    def add(self, entry: Mapping[str, Any]) -> None:
        self.requests += int(entry.get("num_requests", 0))
        self.failures += int(entry.get("num_failures", 0))
        self.total_ms += float(entry.get("total_response_time", 0) or 0)
        self.max_ms = max(self.max_ms, float(entry.get("max_response_time", 0) or 0))
        for key, count in (entry.get("response_times") or {}).items():
            bucket = int(float(key))
            self.histogram[bucket] = self.histogram.get(bucket, 0) + int(count)

    def summary(self, name: str, method: str, window_s: float) -> RouteSummary:
        timed = sum(self.histogram.values())
        return RouteSummary(
            name=name,
            method=method,
            requests=self.requests,
            failures=self.failures,
            rps=self.requests / window_s if window_s > 0 else 0.0,
            avg_ms=self.total_ms / timed if timed else 0.0,
            p50_ms=float(percentile(self.histogram, 0.50)),
            p95_ms=float(percentile(self.histogram, 0.95)),
            p99_ms=float(percentile(self.histogram, 0.99)),
            max_ms=self.max_ms,
        )


def summarize(
    entries: Sequence[Mapping[str, Any]],
    latency_excludes: Iterable[str] = (),
    failures: Iterable[Failure] = (),
    app_prefixes: Iterable[str] = DEFAULT_APP_PREFIXES,
) -> Summary:
    """Per-name summaries plus the aggregate, rates over the whole test window.

    The window runs from the test start (Locust's stats start time) to the last request,
    the same one Locust's own "Aggregated" req/s uses.
    """
    excludes = set(latency_excludes)
    starts = [float(e["start_time"]) for e in entries if e.get("start_time")]
    ends = [float(e["last_request_timestamp"]) for e in entries if e.get("last_request_timestamp")]
    started = min(starts) if starts else 0.0
    window = (max(ends) - started) if ends and starts else 0.0
    window = max(window, 1.0) if ends else 0.0

    total, basis = _Accumulator(), _Accumulator()
    routes = []
    for entry in sorted(entries, key=lambda e: (str(e["name"]), str(e["method"]))):
        acc = _Accumulator()
        acc.add(entry)
        routes.append(acc.summary(str(entry["name"]), str(entry["method"]), window))
        total.add(entry)
        if app_route(str(entry["name"])) not in excludes and str(entry["name"]) not in excludes:
            basis.add(entry)
    return Summary(
        started=started,
        duration_s=window,
        total=total.summary("Aggregated", "", window),
        latency_basis=basis.summary("Aggregated (latency basis)", "", window),
        routes=tuple(routes),
        failures=tuple(sorted(failures, key=lambda f: -f.occurrences)),
        app_prefixes=tuple(app_prefixes),
    )


def load_locust_json(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of Locust stats entries")
    return data


def load_failures(path: Path) -> list[Failure]:
    """Rows of Locust's <prefix>_failures.csv (Method, Name, Error, Occurrences)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [
            Failure(row["Method"], row["Name"], row["Error"], int(row["Occurrences"]))
            for row in csv.DictReader(handle)
        ]


# --- thresholds --------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One threshold against one measurement. `limit` is a minimum for min_* checks."""

    threshold: str  # e.g. "max_p99_ms"
    subject: str  # "aggregate" or a request name
    actual: float | None
    limit: float
    passed: bool
    setting: str  # where to change the limit

    def describe(self) -> str:
        unit = {"min_rps": " req/s", "max_p95_ms": " ms", "max_p99_ms": " ms"}.get(
            self.threshold, ""
        )
        label = {
            "min_rps": "throughput",
            "max_p95_ms": "p95",
            "max_p99_ms": "p99",
            "max_error_ratio": "error ratio",
            "requests": "requests made",
            "crosscheck": "request count difference",
        }.get(self.threshold, self.threshold)
        relation = (
            ">=" if self.threshold.startswith("min_") or self.threshold == "requests" else "<="
        )
        actual = "n/a" if self.actual is None else f"{self.actual:g}{unit}"
        verdict = "ok" if self.passed else "MISSED"
        return (
            f"{verdict}: {label} of {self.subject} = {actual}, required {relation} "
            f"{self.limit:g}{unit} ({self.threshold}; {self.setting})"
        )


_ENV = {
    "min_rps": "LOADTEST_MIN_RPS",
    "max_p95_ms": "LOADTEST_MAX_P95_MS",
    "max_p99_ms": "LOADTEST_MAX_P99_MS",
    "max_error_ratio": "LOADTEST_MAX_ERROR_RATIO",
}


def evaluate(summary: Summary, thresholds: Thresholds) -> list[Check]:
    """Every applicable threshold as a Check; the run passes when all of them pass."""
    agg, basis = summary.total, summary.latency_basis
    checks = [
        Check(
            "requests", "aggregate", agg.requests, 1, agg.requests >= 1, "is the target answering?"
        ),
        Check(
            "min_rps",
            "aggregate",
            round(agg.rps, 2),
            thresholds.min_rps,
            agg.rps >= thresholds.min_rps,
            _ENV["min_rps"],
        ),
        Check(
            "max_error_ratio",
            "aggregate",
            round(agg.error_ratio, 5),
            thresholds.max_error_ratio,
            agg.requests > 0 and agg.error_ratio <= thresholds.max_error_ratio,
            _ENV["max_error_ratio"],
        ),
    ]
    latency_subject = "aggregate"
    if thresholds.latency_excludes:
        latency_subject = f"aggregate without {', '.join(thresholds.latency_excludes)}"
    for key, actual in (("max_p95_ms", basis.p95_ms), ("max_p99_ms", basis.p99_ms)):
        limit = getattr(thresholds, key)
        checks.append(
            Check(
                key,
                latency_subject,
                actual if basis.requests else None,
                limit,
                basis.requests > 0 and actual <= limit,
                _ENV[key],
            )
        )

    by_name: dict[str, list[RouteSummary]] = {}
    for route in summary.routes:
        by_name.setdefault(route.name, []).append(route)
    for name, limits in thresholds.routes.items():
        setting = f'[thresholds.routes."{name}"] in slo.toml'
        for route in by_name.get(name, []):
            subject = f"{route.method} {name}"
            for key, actual in (
                ("max_p95_ms", route.p95_ms),
                ("max_p99_ms", route.p99_ms),
                ("max_error_ratio", round(route.error_ratio, 5)),
            ):
                limit = getattr(limits, key)
                if limit is not None:
                    checks.append(Check(key, subject, actual, limit, actual <= limit, setting))
    return checks


@dataclass(frozen=True)
class CrossCheck:
    """Locust's app-routed request count against the growth of the app's request counter."""

    source: str
    locust_count: int
    app_count: int | None
    tolerance: int
    detail: str = ""

    @property
    def difference(self) -> int | None:
        return None if self.app_count is None else self.app_count - self.locust_count

    @property
    def passed(self) -> bool:
        return self.difference is not None and abs(self.difference) <= self.tolerance

    def as_check(self) -> Check:
        counted = "n/a" if self.app_count is None else str(self.app_count)
        return Check(
            "crosscheck",
            f"{counted} counted by the app vs {self.locust_count} sent there by Locust "
            f"(read via {self.source})",
            None if self.difference is None else float(abs(self.difference)),
            float(self.tolerance),
            self.passed,
            "LOADTEST_CROSSCHECK_TOLERANCE, LOADTEST_CROSSCHECK_TOLERANCE_ABS",
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference, "passed": self.passed}


# --- presentation -------------------------------------------------------------------------


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def render_table(
    summary: Summary, checks: Sequence[Check], crosscheck: CrossCheck | None = None
) -> str:
    header = ["request", "reqs", "fails", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    rows = []
    for r in [*summary.routes, summary.latency_basis, summary.total]:
        label = f"{r.method} {r.name}".strip()
        rows.append(
            [
                label,
                str(r.requests),
                str(r.failures),
                f"{r.rps:.1f}",
                f"{r.p50_ms:.0f}",
                f"{r.p95_ms:.0f}",
                f"{r.p99_ms:.0f}",
                f"{r.max_ms:.0f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [_row(header, widths), _row(["-" * w for w in widths], widths)]
    lines += [_row(row, widths) for row in rows]
    lines.append("")
    lines.append(
        f"window {summary.duration_s:.1f}s, app-routed requests {summary.app_routed_requests}"
    )
    if summary.failures:
        lines.append("failures (top 5):")
        lines += [
            f"  {f.occurrences:>6}  {f.method} {f.name}: {f.error}" for f in summary.failures[:5]
        ]
    if crosscheck is not None:
        diff = "n/a" if crosscheck.difference is None else f"{crosscheck.difference:+d}"
        lines.append(
            f"cross-check ({crosscheck.source}): locust {crosscheck.locust_count}, "
            f"app {crosscheck.app_count if crosscheck.app_count is not None else 'n/a'}, "
            f"difference {diff}, tolerance ±{crosscheck.tolerance}"
            + (f" — {crosscheck.detail}" if crosscheck.detail else "")
        )
    lines.append("")
    lines += [c.describe() for c in checks]
    missed = [c for c in checks if not c.passed]
    lines.append("")
    lines.append("GATE PASSED" if not missed else f"GATE FAILED: {len(missed)} threshold(s) missed")
    return "\n".join(lines)
