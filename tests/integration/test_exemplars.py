"""Exemplars across gunicorn workers: the master's OpenMetrics output links histogram buckets
to trace ids of requests really made, whichever worker served them."""

from __future__ import annotations

import concurrent.futures
import secrets
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from server.metrics import HttpMetrics

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

OPENMETRICS = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"
# Sleeps that land in different buckets of HTTP_BUCKETS, so each keeps its own exemplar.
SLEEPS = (0.0, 0.015, 0.035, 0.07, 0.15, 0.3)


def _exemplars(text: str) -> dict[tuple[str, str], tuple[str, float, float]]:
    """(route, le) -> (trace id, seconds, bucket bound) of every exemplar in the output."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name != "http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.exemplar is not None:
                le = sample.labels["le"]
                found[(sample.labels["route"], le)] = (
                    sample.exemplar.labels["trace_id"],
                    float(sample.exemplar.value),
                    float(le),
                )
    return found


def _one(server: Server, seconds: float) -> str:
    trace_id = secrets.token_hex(16)
    response = httpx.get(
        f"{server.url}/api/slow",
        params={"seconds": seconds},
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
        timeout=10,
    )
    assert response.status_code == 200
    return trace_id


def test_exemplars_carry_trace_ids_of_real_requests_from_every_worker(server: Server) -> None:
    sent: set[str] = set()
    served_by: dict[str, int] = {}
    exemplars: dict[tuple[str, str], tuple[str, float, float]] = {}
    # Concurrent requests spread over both workers; a few rounds in case one took all.
    for _ in range(10):
        with concurrent.futures.ThreadPoolExecutor(len(SLEEPS)) as pool:
            sent.update(pool.map(lambda s: _one(server, s), SLEEPS))
        time.sleep(HttpMetrics.FLUSH_INTERVAL * 2 + 0.1)
        for record in server.records():
            if record.get("logger") == "server.access" and record.get("trace_id") in sent:
                served_by[str(record["trace_id"])] = int(str(record["pid"]))
        response = httpx.get(server.metrics_url, headers={"Accept": OPENMETRICS}, timeout=5)
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        exemplars = {k: v for k, v in _exemplars(response.text).items() if k[0] == "/api/slow"}
        if len({served_by.get(trace_id) for trace_id, _, _ in exemplars.values()}) >= 2:
            break
    assert len(exemplars) >= 3, exemplars  # one per bucket the sleeps reached
    for (_, le), (trace_id, seconds, bound) in exemplars.items():
        # Each is a request we made, and its value lies in the bucket it is attached to.
        assert trace_id in sent, (le, trace_id)
        assert seconds <= bound
    workers = {served_by[trace_id] for trace_id, _, _ in exemplars.values()}
    assert workers == server.worker_pids(), (workers, server.worker_pids())


def test_plain_text_scrapes_are_unchanged(server: Server) -> None:
    """A scraper that does not ask for OpenMetrics gets the classic format, no exemplars."""
    _one(server, 0.0)
    time.sleep(HttpMetrics.FLUSH_INTERVAL * 2 + 0.1)
    text = server.metrics()
    assert "# EOF" not in text
    assert "trace_id" not in text
    assert "http_request_duration_seconds_bucket{" in text
