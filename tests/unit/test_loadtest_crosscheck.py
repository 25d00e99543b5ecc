"""Reading the app's request counter for the load test cross-check."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loadtests.crosscheck import (
    CounterReading,
    CrossCheckUnavailable,
    MetricsUrlSource,
    choose_source,
    parse_samples,
    reading_from_text,
    route_deltas,
)
from loadtests.settings import load_settings

EXPOSITION = """\
# HELP http_requests_total HTTP requests handled by the app.
# TYPE http_requests_total counter
http_requests_total{method="GET",route="/api/items/{item_id}",status="200"} 40.0
http_requests_total{method="GET",route="/api/items/{item_id}",status="404"} 2.0
http_requests_total{method="POST",route="/api/orders",status="201"} 7.0
http_requests_total{method="GET",route="<unmatched>",status="404"} 1.0
http_requests_total{method="GET",route="/a \\"quoted\\" } route",status="200"} 3.0 1700000000000
http_requests_total_created{method="GET",route="/api/hello",status="200"} 1.7e9
http_requests_totally_different 5
http_request_duration_seconds_count{method="GET",route="/api/hello"} 99.0
"""


def test_samples_are_parsed_with_braces_and_escapes_in_label_values() -> None:
    samples = parse_samples(EXPOSITION)
    assert len(samples) == 5
    labels, value = samples[0]
    assert labels == {"method": "GET", "route": "/api/items/{item_id}", "status": "200"}
    assert value == 40.0
    assert samples[4][0]["route"] == '/a "quoted" } route'
    assert samples[4][1] == 3.0


def test_reading_sums_by_route() -> None:
    reading = reading_from_text(EXPOSITION)
    assert reading.total == 53
    assert reading.by_route["/api/items/{item_id}"] == 42
    assert reading.by_route["<unmatched>"] == 1


def test_unlabelled_counter() -> None:
    assert reading_from_text("http_requests_total 12\n").total == 12


def test_route_deltas_keep_only_what_moved() -> None:
    before = CounterReading(10, {"/api/hello": 10, "/api/items": 0})
    after = CounterReading(25, {"/api/hello": 20, "/api/items": 0, "/api/orders": 5})
    assert route_deltas(before, after) == {"/api/hello": 10, "/api/orders": 5}


@pytest.fixture
def metrics_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = EXPOSITION.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_metrics_url_source_reads_a_live_endpoint(metrics_server: str) -> None:
    assert MetricsUrlSource(metrics_server).read(not_before=0).total == 53


def test_metrics_url_source_down_is_unavailable_not_a_crash() -> None:
    with pytest.raises(CrossCheckUnavailable, match=r"127\.0\.0\.1:9"):
        MetricsUrlSource("http://127.0.0.1:9/metrics").read(not_before=0)


def test_auto_picks_the_first_source_that_answers(metrics_server: str) -> None:
    settings = load_settings(env={"METRICS_URL": metrics_server}).crosscheck
    source, reason = choose_source(settings)
    assert source is not None
    assert reason == ""
    assert "metrics-url" in source.name


NO_PROJECT = {"LOADTEST_COMPOSE_PROJECT": "loadtest-unit-no-such-project"}


def test_no_source_says_how_to_configure_one() -> None:
    env = {"LOADTEST_CROSSCHECK": "metrics-url"}
    source, reason = choose_source(load_settings(env=env).crosscheck)
    assert source is None
    assert "METRICS_URL" in reason
    assert "PROMETHEUS_URL" in reason
    off, why = choose_source(load_settings(env={"LOADTEST_CROSSCHECK": "off"}).crosscheck)
    assert off is None
    assert "disabled" in why


def test_unreachable_sources_are_all_reported() -> None:
    env = {
        "METRICS_URL": "http://127.0.0.1:9/metrics",
        "PROMETHEUS_URL": "http://127.0.0.1:9",
        **NO_PROJECT,
    }
    source, reason = choose_source(load_settings(env=env).crosscheck)
    assert source is None
    assert "metrics-url" in reason
    assert "prometheus" in reason
    assert "docker exec loadtest-unit-no-such-project" in reason
