"""Monitoring, end to end: the real stack with its monitoring profile, queried through the
real Prometheus.

- every query of every Grafana panel returns data after a burst of traffic;
- the request count Prometheus reports for a burst is exactly what the client sent;
- a worker killed with SIGKILL never makes a counter go down, and is counted as a restart;
- Prometheus keeps the exemplars of the latency buckets: their trace ids are requests that
  nginx and the app logged;
- with OTLP export on, the receiver gets one server span per request, named by the route
  template, with the trace id of the request's nginx and app log lines;
- AppTargetDown fires when the app is stopped (with the production rule, `for: 1m`), reaches
  a webhook receiver through Alertmanager, and its resolution follows when the app is back;
  the Watchdog (the dead man's switch) reaches it too.

Where Grafana's image cannot be had (no registry, E2E_BASE_IMAGES=local) it is not started;
its queries are run against Prometheus all the same.
Config: monitoring/ (prometheus/, grafana/); metric names: tests/monitoring/promql.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from websockets.asyncio.client import connect

from tests.e2e.receiver import URL as RECEIVER_URL
from tests.e2e.receiver import Receiver
from tests.monitoring import promql

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.e2e.conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

SCRAPE_INTERVAL = 10.0  # monitoring/prometheus/prometheus.yml


# ── the stack ───────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def monitored_stack(stack_factory: StackFactory) -> Stack:
    """A stack of our own (tests/e2e/conftest.py), monitoring profile on: these tests kill a
    worker and stop the app, and count every request the app serves. Grafana is left out
    where its image cannot be had (no registry); Prometheus runs its queries here."""
    stack = stack_factory.up(
        "monitoring",
        profiles=("monitoring",),
        env={
            "ALERTMANAGER_WEBHOOK_URL": f"{RECEIVER_URL}/alerts",
            "OTEL_EXPORTER_OTLP_ENDPOINT": RECEIVER_URL,  # the SDK posts to /v1/traces
        },
    )
    assert {"prometheus", "alertmanager", "nginx-exporter"} <= set(stack.services())
    return stack


@pytest.fixture(scope="module", autouse=True)
def receiver(monitored_stack: Stack) -> Iterator[Receiver]:
    """The webhook the stack's Alertmanager posts to and the OTLP/HTTP collector its app
    exports spans to (tests/e2e/receiver.py), there from the module's first test on."""
    started = Receiver.start(monitored_stack)
    try:
        yield started
    finally:
        started.stop()


# ── Prometheus, through its HTTP API on the loopback port ───────────────────


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr!r}: {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr!r} -> {result}"
        return float(result[0]["value"][1])

    def last_app_scrape(self) -> float:
        """Time of the latest successful app scrape (0 if none)."""
        # timestamp() of a plain selector is the sample's own time (of anything else, the
        # evaluation time), so ask for both series and pair them by instance.
        stamps = {
            r["metric"]["instance"]: float(r["value"][1])
            for r in self.query('timestamp(up{job="app"})')
        }
        ups = {r["metric"]["instance"]: r["value"][1] for r in self.query('up{job="app"}')}
        return max((t for i, t in stamps.items() if ups.get(i) == "1"), default=0.0)

    def wait_for_app_scrape_after(self, moment: float, scrapes: int = 1) -> float:
        """Wait until `scrapes` successful app scrapes have happened after `moment`; return
        the time of the last one."""
        deadline = time.time() + SCRAPE_INTERVAL * (scrapes + 3)
        seen: list[float] = []
        while time.time() < deadline:
            last = self.last_app_scrape()
            if last > moment and last not in seen:
                seen.append(last)
                if len(seen) >= scrapes:
                    return last
            time.sleep(0.5)
        pytest.fail(f"no {scrapes} app scrape(s) after {moment} (got {seen})")

    def alerts(self) -> list[dict[str, Any]]:
        body = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts


@pytest.fixture(scope="module")
def prometheus(monitored_stack: Stack) -> Prometheus:
    prom = Prometheus(f"http://127.0.0.1:{monitored_stack.ports['PROMETHEUS_PORT']}")
    deadline = time.time() + 60
    while time.time() < deadline:  # first scrapes of every job
        up = {r["metric"]["job"]: r["value"][1] for r in prom.query("up")}
        if up == {"app": "1", "nginx": "1", "prometheus": "1", "alertmanager": "1", "tls": "1"}:
            return prom
        time.sleep(1)
    pytest.fail(f"targets not all up: {prom.query('up')}")


# ── traffic, through nginx like a user's ────────────────────────────────────

# (method, path, body, expected status, route label)
MIX: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
    ("GET", "/api/hello", None, 200, "/api/hello"),
    ("GET", "/api/items", None, 200, "/api/items"),
    ("GET", "/api/items/7", None, 200, "/api/items/{item_id}"),
    ("GET", "/api/items/999", None, 404, "/api/items/{item_id}"),
    ("POST", "/api/orders", {"item_id": 3, "quantity": 2}, 201, "/api/orders"),
    ("POST", "/api/orders", {"item_id": 3, "quantity": 0}, 422, "/api/orders"),
    ("GET", "/api/boom", None, 500, "/api/boom"),
    ("GET", "/api/slow?seconds=0.05", None, 200, "/api/slow"),
    ("GET", "/api/events?count=2&interval=0", None, 200, "/api/events"),
]
WS_MESSAGES = 2  # per WebSocket session, one session per round
RATE_LIMITED = 429  # nginx's limit_req answers these itself: they never reach the app


@dataclass
class Sent:
    """What the client saw: responses by (route, status) that the app answered."""

    by_route_status: dict[tuple[str, str], int] = field(default_factory=dict)
    rate_limited: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_route_status.values())


async def _websocket_session(stack: Stack) -> None:
    """One echo session over wss:// (not an HTTP request: not in `Sent`)."""
    url = f"wss://127.0.0.1:{stack.https_port}/ws/echo"
    async with connect(url, ssl=stack.ssl_context(), open_timeout=15) as ws:
        for n in range(WS_MESSAGES):
            await ws.send(f"monitoring {n}")
            assert await ws.recv() == f"monitoring {n}"


def send(stack: Stack, rounds: int, pause: float = 0.06) -> Sent:
    """`rounds` x MIX requests and a WebSocket session, paced under nginx's default rate
    limit (20 r/s, burst 40)."""
    sent = Sent()
    with stack.client(timeout=30) as client:
        for _ in range(rounds):
            asyncio.run(_websocket_session(stack))
            for method, path, body, expected, route in MIX:
                response = client.request(method, path, json=body)
                if response.status_code == RATE_LIMITED:
                    sent.rate_limited += 1
                    continue
                assert response.status_code == expected, (method, path, response.text[:200])
                key = (route, str(expected))
                sent.by_route_status[key] = sent.by_route_status.get(key, 0) + 1
                time.sleep(pause)
    assert sent.rate_limited <= sent.total // 10, "the burst was mostly rate-limited"
    return sent


def app_counts(prom: Prometheus, at: float) -> dict[tuple[str, str], float]:
    result = prom.query('sum by (route, status) (http_requests_total{job="app"})', at)
    return {(r["metric"]["route"], r["metric"]["status"]): float(r["value"][1]) for r in result}


# ── the tests ───────────────────────────────────────────────────────────────


def test_every_dashboard_query_returns_data(monitored_stack: Stack, prometheus: Prometheus) -> None:
    # Series are born at their first request: warm up, let a scrape see them, then the
    # burst, then two scrapes so every rate() window holds the burst.
    send(monitored_stack, rounds=1)
    prometheus.wait_for_app_scrape_after(time.time())
    send(monitored_stack, rounds=5)
    prometheus.wait_for_app_scrape_after(time.time(), scrapes=2)

    empty, not_finite = [], []
    for query in promql.panel_queries():
        result = prometheus.query(query.promql())
        values = [float(r["value"][1]) for r in result]
        if not values:
            empty.append(query.name)
        elif not any(math.isfinite(v) for v in values):
            not_finite.append(f"{query.name}: {values}")
    assert not empty, f"panels without data: {empty}"
    assert not not_finite, f"panels with only NaN/Inf: {not_finite}"


def test_rules_and_dashboards_name_only_metrics_prometheus_has(prometheus: Prometheus) -> None:
    response = httpx.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=10)
    names = set(response.json()["data"])
    # ALERTS exists only while an alert is pending or firing; the ACME client's metrics
    # with the acme profile only (tests/e2e/test_acme.py checks those).
    missing = promql.SCRAPED_METRICS - promql.ACME_METRICS - {"ALERTS"} - names
    assert not missing, f"used by monitoring/ but not scraped: {sorted(missing)}"
    unrecorded = {n for n in promql.recorded_names() if n.startswith("threshold:")} - names
    assert not unrecorded, f"thresholds not recorded: {sorted(unrecorded)}"


def test_prometheus_counts_exactly_the_requests_sent(
    monitored_stack: Stack, prometheus: Prometheus
) -> None:
    before_at = prometheus.wait_for_app_scrape_after(time.time())
    before = app_counts(prometheus, before_at)
    sent = send(monitored_stack, rounds=8)
    after_at = prometheus.wait_for_app_scrape_after(time.time())
    after = app_counts(prometheus, after_at)

    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()}
    delta = {k: v for k, v in delta.items() if v}
    assert delta == sent.by_route_status
    assert sum(delta.values()) == sent.total
    # The histogram counts the same requests.
    durations = prometheus.value(
        'sum(http_request_duration_seconds_count{job="app"})', after_at
    ) - prometheus.value('sum(http_request_duration_seconds_count{job="app"})', before_at)
    assert durations == sent.total


def _worker_pids(stack: Stack) -> list[int]:
    """Children of the gunicorn master (PID 1 of the app container), from /proc."""
    script = (
        "import os\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit():\n"
        "        try:\n"
        "            stat = open(f'/proc/{p}/stat').read()\n"
        "        except OSError:\n"
        "            continue\n"
        "        if stat[stat.rfind(')') + 2:].split()[1] == '1':\n"
        "            print(p)\n"
    )
    return sorted(int(p) for p in stack.exec("app", "python", "-c", script).stdout.split())


def test_killed_worker_never_makes_counters_go_down(
    monitored_stack: Stack, prometheus: Prometheus
) -> None:
    send(monitored_stack, rounds=3)
    start_at = prometheus.wait_for_app_scrape_after(time.time())
    workers_before = prometheus.value('sum(gunicorn_workers{job="app"})', start_at)
    restarts_before = prometheus.value('sum(gunicorn_worker_restarts_total{job="app"})', start_at)
    pids = _worker_pids(monitored_stack)
    assert len(pids) == workers_before >= 1, (pids, workers_before)

    # Kill a worker that has counted requests (its multiprocess files exist), so its
    # counts are part of the totals the master serves.
    multiproc = monitored_stack.exec("app", "sh", "-c", 'ls "$PROMETHEUS_MULTIPROC_DIR"')
    multiproc_files = multiproc.stdout.split()
    victim = next(p for p in pids if f"counter_{p}.db" in multiproc_files)
    monitored_stack.exec("app", "sh", "-c", f"kill -9 {victim}")  # no kill(1) in the image
    send(monitored_stack, rounds=3)

    # Wait for the master to replace it, as Prometheus sees it.
    deadline = time.time() + 60
    while time.time() < deadline:
        at = prometheus.wait_for_app_scrape_after(time.time())
        restarts = prometheus.value('sum(gunicorn_worker_restarts_total{job="app"})', at)
        workers = prometheus.value('sum(gunicorn_workers{job="app"})', at)
        if restarts > restarts_before and workers == workers_before:
            break
    else:
        pytest.fail(f"restarts stayed {restarts_before} or workers did not come back")
    assert restarts == restarts_before + 1
    assert victim not in _worker_pids(monitored_stack)

    # Every raw sample of every counter since before the kill: never lower than the one before.
    window = f"{math.ceil(time.time() - start_at) + 1}s"
    for counter in (
        "http_requests_total",
        "http_request_duration_seconds_count",
        "http_request_duration_seconds_bucket",
        "gunicorn_worker_restarts_total",
    ):
        series = prometheus.query(f'{counter}{{job="app"}}[{window}]', at)
        assert series, counter
        for one in series:
            values = [float(v) for _, v in one["values"]]
            drops = [(a, b) for a, b in itertools.pairwise(values) if b < a]
            assert not drops, f"{counter}{one['metric']} went down: {drops}"
        assert prometheus.value(f'sum(resets({counter}{{job="app"}}[{window}]))', at) == 0


def _alert_state(prom: Prometheus, name: str) -> str | None:
    states = {a["state"] for a in prom.alerts() if a["labels"]["alertname"] == name}
    return "firing" if "firing" in states else next(iter(states), None)


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def test_exemplars_are_trace_ids_of_requests_in_the_logs(
    monitored_stack: Stack, prometheus: Prometheus
) -> None:
    start = time.time()
    send(monitored_stack, rounds=3)
    prometheus.wait_for_app_scrape_after(time.time())
    # The query the dashboard's latency panel asks exemplars for, as Grafana sends it.
    (query,) = [q for q in promql.panel_queries() if q.exemplar]
    response = httpx.get(
        f"{prometheus.url}/api/v1/query_exemplars",
        params={"query": query.promql(), "start": start - 1, "end": time.time() + 1},
        timeout=10,
    )
    body = response.json()
    assert body["status"] == "success", body
    exemplars = [
        (series["seriesLabels"], exemplar)
        for series in body["data"]
        for exemplar in series["exemplars"]
    ]
    assert exemplars, body
    app_lines = {  # HTTP requests' lines (a WebSocket session's is "websocket")
        r["trace_id"]: r
        for r in monitored_stack.records("app")
        if r.get("logger") == "server.access" and r.get("event") == "request"
    }
    nginx_lines = {r["trace_id"]: r for r in monitored_stack.records("nginx") if r.get("trace_id")}
    for labels, exemplar in exemplars:
        trace_id = exemplar["labels"]["trace_id"]
        # A request really made: the app logged it with that route, nginx with that id.
        line = app_lines[trace_id]
        assert line["route"] == labels["route"]
        assert float(exemplar["value"]) <= float(labels["le"])
        if line["route"] == "/api/events":  # timed until the stream began; logged whole
            assert float(exemplar["value"]) * 1000 <= float(line["duration_ms"])
        else:
            assert abs(float(exemplar["value"]) * 1000 - float(line["duration_ms"])) < 1
        assert nginx_lines[trace_id]["request_id"] == line["request_id"]


def _spans(receiver: Receiver) -> list[tuple[dict[str, Any], Any]]:
    """Every span the receiver got over OTLP/HTTP (protobuf), with its resource's attributes."""
    found = []
    for item in receiver.received():
        if item.path != "/v1/traces":
            continue
        assert item.content_type == "application/x-protobuf", item.content_type
        request = ExportTraceServiceRequest.FromString(item.body)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                found.extend((resource, span) for span in scope_spans.spans)
    return found


def test_otlp_receiver_gets_one_span_per_request_with_the_logged_trace_id(
    monitored_stack: Stack, receiver: Receiver
) -> None:
    # (path, route template, status); nginx starts each trace (no client traceparent),
    # but for the last request, whose client's trace it continues.
    requests = [
        ("/api/items/7", "/api/items/{item_id}", 200),
        ("/api/items/999", "/api/items/{item_id}", 404),
        ("/api/hello", "/api/hello", 200),
        ("/api/boom", "/api/boom", 500),
    ]
    client_trace, client_parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    sent: dict[str, tuple[str, str, int, str]] = {}  # trace id -> path, route, status, rid
    with monitored_stack.client() as client:
        for n, (path, route, status) in enumerate(requests):
            continued = n == len(requests) - 1
            headers = {"traceparent": f"00-{client_trace}-{client_parent}-01"} if continued else {}
            response = client.get(path, headers=headers)
            assert response.status_code == status, response.text[:200]
            rid = response.headers["x-request-id"]
            sent[client_trace if continued else rid] = (path, route, status, rid)

    def arrived() -> bool:
        return {s.trace_id.hex() for _, s in _spans(receiver)} >= sent.keys()

    _wait_for(arrived, timeout=30, what="the requests' spans at the OTLP receiver")
    time.sleep(1)  # a second span of the same request would come in the same batch or next
    spans = [(r, s) for r, s in _spans(receiver) if s.trace_id.hex() in sent]
    assert sorted(s.trace_id.hex() for _, s in spans) == sorted(sent)  # one per request

    app_lines = {
        r["trace_id"]: r
        for r in monitored_stack.records("app")
        if r.get("logger") == "server.access" and r.get("trace_id") in sent
    }
    nginx_lines = {r["trace_id"]: r for r in monitored_stack.records("nginx") if r.get("trace_id")}
    for resource, span in spans:
        trace_id = span.trace_id.hex()
        path, route, status, rid = sent[trace_id]
        attributes = {a.key: a.value for a in span.attributes}
        assert span.name == f"GET {route}"
        assert span.kind == span.SPAN_KIND_SERVER
        assert attributes["http.route"].string_value == route
        assert attributes["url.path"].string_value == path
        assert attributes["http.response.status_code"].int_value == status
        assert (span.status.code == span.status.STATUS_CODE_ERROR) == (status >= 500)
        assert resource["service.version"] == monitored_stack.env["APP_VERSION"]
        # The same request in both logs: the app's line has the span's own id, nginx's the id
        # it answered with; the span's parent is the one nginx (or the client) sent.
        assert app_lines[trace_id]["span_id"] == span.span_id.hex()
        assert app_lines[trace_id]["route"] == route
        assert app_lines[trace_id]["request_id"] == rid
        assert nginx_lines[trace_id]["request_id"] == rid
        assert nginx_lines[trace_id]["status"] == status
        if trace_id == client_trace:
            assert span.parent_span_id.hex() == client_parent
        else:
            assert span.parent_span_id.hex() == rid[16:]  # nginx: the request id's low half


def _notifications(receiver: Receiver, alertname: str, status: str) -> list[dict[str, Any]]:
    """Alertmanager webhook bodies (version 4) with `alertname` in `status`."""
    found = []
    for item in receiver.received():
        if item.path != "/alerts":
            continue
        body = item.json()
        for alert in body["alerts"]:
            if alert["labels"]["alertname"] == alertname and alert["status"] == status:
                found.append(body)
    return found


def test_app_target_down_fires_when_the_app_stops(
    monitored_stack: Stack, prometheus: Prometheus, receiver: Receiver
) -> None:
    assert _alert_state(prometheus, "AppTargetDown") is None
    monitored_stack.compose("stop", "--timeout", "10", "app")
    stopped = time.time()
    states: list[str] = []

    def firing() -> bool:
        state = _alert_state(prometheus, "AppTargetDown")
        if state and (not states or states[-1] != state):
            states.append(state)
        return state == "firing"

    # Next scrape fails (<= 10s), rules see it (<= 10s), `for: 1m`, next evaluation (<= 10s).
    _wait_for(firing, timeout=SCRAPE_INTERVAL * 3 + 60 + 30, what="AppTargetDown firing")
    assert states[0] == "pending", states  # it waited for its `for:`, not fired at once
    assert time.time() - stopped >= 60
    # One page for one outage: NoWorkers leaves a down target to AppTargetDown.
    assert _alert_state(prometheus, "NoWorkers") is None

    # Through Alertmanager to the webhook: pages wait group_wait (10s) at most.
    fired_at = time.time()
    try:
        _wait_for(
            lambda: bool(_notifications(receiver, "AppTargetDown", "firing")),
            timeout=60,
            what="AppTargetDown at the webhook",
        )
    except pytest.fail.Exception:
        got = [(r.path, r.content_type) for r in receiver.received() if r.path != "/v1/traces"]
        logs = monitored_stack.logs("alertmanager")[-15:]
        pytest.fail(f"AppTargetDown not at the webhook in 60s; it got {got}; alertmanager: {logs}")
    notified = time.time() - fired_at
    (page,) = _notifications(receiver, "AppTargetDown", "firing")[:1]
    assert page["receiver"] == "webhook"
    assert page["groupLabels"] == {"alertname": "AppTargetDown", "severity": "critical"}
    (alert,) = [a for a in page["alerts"] if a["labels"]["alertname"] == "AppTargetDown"]
    assert alert["annotations"]["runbook_url"] == "monitoring/RUNBOOK.md#apptargetdown"

    # The app returns: resolved within a scrape, an evaluation and the pages' group_interval.
    monitored_stack.compose("start", "app")
    back = time.time()
    _wait_for(
        lambda: bool(_notifications(receiver, "AppTargetDown", "resolved")),
        timeout=SCRAPE_INTERVAL * 3 + 60 + 60,
        what="AppTargetDown resolved at the webhook",
    )
    resolved = time.time() - back
    # The dead man's switch reached it too (the heartbeat URL defaults to the webhook).
    watchdog = _notifications(receiver, "Watchdog", "firing")
    assert watchdog
    assert watchdog[0]["receiver"] == "heartbeat"
    print(
        f"AppTargetDown: webhook {notified:.0f}s after firing, resolved {resolved:.0f}s after start"
    )
