"""Cross-check: did the app see as many requests as Locust says it sent?

Locust counts what it sent through nginx; the app counts what it served
(`http_requests_total`, summed over every worker by prometheus_client's multiprocess mode).
Only requests under /api/ reach the app: nginx answers `/` and `/static/...` itself, so those
are left out of Locust's side. A gap means requests lost or invented between the two: nginx
answering for the app (429 rate limit, 502/504), retries, or counters lost with a dying worker.

The app's metrics port is internal to the compose network, so the counter is read from
(first that is configured and answers, in this order for `source = "auto"`):
  metrics-url  METRICS_URL, e.g. http://127.0.0.1:9000/metrics for a gunicorn on the host;
  prometheus   PROMETHEUS_URL's query API (waits for a scrape newer than the reading time);
  docker       `docker exec` into each running `app` container of the compose project
               (LOADTEST_COMPOSE_PROJECT / COMPOSE_PROJECT_NAME) and fetch 127.0.0.1:9000.
Standard library only (the Locust image has nothing else).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from loadtests.compose import ComposeLookupError, running_containers

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from loadtests.settings import CrossCheckSettings

__all__ = [
    "CounterReading",
    "CrossCheckUnavailable",
    "DockerExecSource",
    "MetricsUrlSource",
    "PrometheusSource",
    "choose_source",
    "parse_samples",
    "route_deltas",
]

METRIC = "http_requests_total"
HTTP_TIMEOUT_S = 5.0


class CrossCheckUnavailable(Exception):
    """The counter could not be read; the message says from where and why."""


@dataclass(frozen=True)
class CounterReading:
    total: float
    by_route: Mapping[str, float]


class CounterSource(Protocol):
    name: str

    def read(self, not_before: float) -> CounterReading:
        """The counter as it stands at a moment later than `not_before` (a unix time)."""
        ...


# --- Prometheus text exposition format ---------------------------------------------------


def _labels(text: str) -> Iterator[tuple[str, str]]:
    """Parse `a="x",b="y\\"z"` (label values may hold `}` and escaped quotes)."""
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i >= n:
            return
        eq = text.index("=", i)
        key = text[i:eq].strip()
        if text[eq + 1] != '"':
            raise ValueError(f"label {key} has an unquoted value")
        j, value = eq + 2, []
        while text[j] != '"':
            if text[j] == "\\":
                j += 1
                value.append({"n": "\n"}.get(text[j], text[j]))
            else:
                value.append(text[j])
            j += 1
        yield key, "".join(value)
        i = j + 1


def parse_samples(text: str, metric: str = METRIC) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric in the text format: [(labels, value), ...]."""
    samples = []
    for line in text.splitlines():
        if not line.startswith(metric) or line.startswith("#"):
            continue
        rest = line[len(metric) :]
        if rest[:1] == "{":
            # the closing brace is the last `}` before the value (values may contain `}`)
            close = rest.rindex("}")
            labels = dict(_labels(rest[1:close]))
            value_part = rest[close + 1 :]
        elif rest[:1] in (" ", "\t"):
            labels, value_part = {}, rest
        else:
            continue  # another metric sharing the prefix, e.g. http_requests_total_created
        samples.append((labels, float(value_part.split()[0])))
    return samples


def reading_from_text(text: str) -> CounterReading:
    by_route: dict[str, float] = {}
    for labels, value in parse_samples(text):
        route = labels.get("route", "")
        by_route[route] = by_route.get(route, 0.0) + value
    return CounterReading(total=sum(by_route.values()), by_route=by_route)


def route_deltas(before: CounterReading, after: CounterReading) -> dict[str, int]:
    routes = set(before.by_route) | set(after.by_route)
    deltas = {r: round(after.by_route.get(r, 0.0) - before.by_route.get(r, 0.0)) for r in routes}
    return {r: d for r, d in sorted(deltas.items()) if d}


# --- sources ------------------------------------------------------------------------------


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310 - http(s) only
        body: bytes = response.read()
        return body


class MetricsUrlSource:
    """The app's /metrics fetched directly (gunicorn on the host, or inside the network)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"metrics-url {url}"

    def read(self, not_before: float) -> CounterReading:
        del not_before  # a direct fetch is always current
        try:
            return reading_from_text(_get(self.url).decode())
        except (OSError, ValueError) as exc:
            raise CrossCheckUnavailable(f"{self.url}: {exc}") from exc


class PrometheusSource:
    """Prometheus' query API; waits until every series has a sample newer than `not_before`."""

    def __init__(self, base_url: str, max_wait_s: float = 45.0, poll_s: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.name = f"prometheus {base_url}"

    def _query(self, promql: str) -> list[dict[str, object]]:
        url = f"{self.base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            body = json.loads(_get(url))
        except (OSError, ValueError) as exc:
            raise CrossCheckUnavailable(f"{self.base_url}: {exc}") from exc
        if body.get("status") != "success":
            raise CrossCheckUnavailable(f"{self.base_url}: query {promql!r} failed: {body}")
        result: list[dict[str, object]] = body["data"]["result"]
        return result

    def read(self, not_before: float) -> CounterReading:
        deadline = time.monotonic() + self.max_wait_s
        while True:
            oldest = self._query(f"min(timestamp({METRIC}))")
            if not oldest:
                raise CrossCheckUnavailable(
                    f"{self.base_url}: no {METRIC} series (is the app scraped?)"
                )
            if float(oldest[0]["value"][1]) > not_before:  # type: ignore[index]
                break
            if time.monotonic() > deadline:
                raise CrossCheckUnavailable(
                    f"{self.base_url}: no scrape of {METRIC} newer than the run "
                    f"after waiting {self.max_wait_s:.0f}s"
                )
            time.sleep(self.poll_s)
        by_route = {
            str(s["metric"].get("route", "")): float(s["value"][1])  # type: ignore[attr-defined,index]
            for s in self._query(f"sum by (route) ({METRIC})")
        }
        return CounterReading(total=sum(by_route.values()), by_route=by_route)


# Runs inside the app container; its python has no curl but has urllib.
_FETCH = (
    "import os,urllib.request;"
    "print(urllib.request.urlopen('http://127.0.0.1:%s/metrics'"
    " % os.environ.get('METRICS_PORT','9000'),timeout=5).read().decode())"
)


class DockerExecSource:
    """`docker exec` into every running `app` container of a compose project and sum."""

    def __init__(self, project: str, service: str = "app") -> None:
        self.project = project
        self.service = service
        self.name = f"docker exec {project}/{service}"

    def containers(self) -> list[str]:
        try:
            ids = running_containers(self.project, self.service)
        except ComposeLookupError as error:
            raise CrossCheckUnavailable(str(error)) from None
        if not ids:
            raise CrossCheckUnavailable(
                f"no running '{self.service}' container in compose project {self.project!r}"
            )
        return ids

    def read(self, not_before: float) -> CounterReading:
        del not_before
        total, by_route = 0.0, {}  # type: float, dict[str, float]
        for cid in self.containers():
            result = subprocess.run(
                ["docker", "exec", cid, "python", "-c", _FETCH],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
            if result.returncode != 0:
                raise CrossCheckUnavailable(
                    f"docker exec {cid[:12]}: {result.stderr.strip()[-300:]}"
                )
            reading = reading_from_text(result.stdout)
            total += reading.total
            for route, value in reading.by_route.items():
                by_route[route] = by_route.get(route, 0.0) + value
        return CounterReading(total=total, by_route=by_route)


def choose_source(settings: CrossCheckSettings) -> tuple[CounterSource | None, str]:
    """The first configured source that answers now, or None and why none did."""
    candidates: list[CounterSource] = []
    wanted = settings.source
    if wanted in ("auto", "metrics-url") and settings.metrics_url:
        candidates.append(MetricsUrlSource(settings.metrics_url))
    if wanted in ("auto", "prometheus") and settings.prometheus_url:
        candidates.append(PrometheusSource(settings.prometheus_url))
    if wanted in ("auto", "docker") and settings.compose_project:
        candidates.append(DockerExecSource(settings.compose_project))
    if wanted == "off":
        return None, "disabled (LOADTEST_CROSSCHECK=off)"
    hint = (
        "set METRICS_URL, PROMETHEUS_URL or LOADTEST_COMPOSE_PROJECT "
        f"(LOADTEST_CROSSCHECK={wanted})"
    )
    reasons = []
    for source in candidates:
        try:
            source.read(not_before=0.0)
        except CrossCheckUnavailable as exc:
            reasons.append(f"{source.name}: {exc}")
            continue
        return source, ""
    return None, "; ".join([*reasons, hint])
