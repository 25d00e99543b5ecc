"""The serving layer as a user runs it: a real gunicorn master, two real uvicorn workers."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import re
import secrets
import signal
import time
from typing import TYPE_CHECKING

import httpx
import orjson
import pytest

from tests.promtext import samples, total

if TYPE_CHECKING:
    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration


def _access_lines(server: Server, request_id: str) -> list[dict[str, object]]:
    return [
        r
        for r in server.records()
        if r.get("request_id") == request_id and r.get("logger") == "server.access"
    ]


def _wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def test_api_answers_and_errors(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        hello = client.get("/api/hello")
        assert hello.status_code == 200
        assert hello.json()["message"] == "hello"

        items = client.get("/api/items")
        assert items.status_code == 200
        assert len(items.json()) == 50

        assert client.get("/api/items/7").json()["id"] == 7
        missing = client.get("/api/items/999")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "item not found"}
        assert client.get("/api/items/abc").status_code == 422

        created = client.post("/api/orders", json={"item_id": 3, "quantity": 2})
        assert created.status_code == 201
        assert created.json()["quantity"] == 2

        invalid = client.post("/api/orders", json={"item_id": 0, "quantity": 500})
        assert invalid.status_code == 422
        fields = {tuple(err["loc"]) for err in invalid.json()["detail"]}
        assert fields == {("body", "item_id"), ("body", "quantity")}
        assert client.post("/api/orders", content=b"{not json").status_code == 422
        assert client.post("/api/orders", json={"item_id": 999, "quantity": 1}).status_code == 404

        assert client.get("/api/slow", params={"seconds": 31}).status_code == 422
        assert client.get("/api/slow", params={"seconds": -1}).status_code == 422
        assert client.get("/api/slow", params={"seconds": 0.01}).json() == {"slept": 0.01}

        boom = client.get("/api/boom")
        assert boom.status_code == 500
        rid = boom.headers["x-request-id"]
        assert boom.json() == {"detail": "internal server error", "request_id": rid}
        assert "Traceback" not in boom.text
        assert "RuntimeError" not in boom.text

        assert client.get("/docs").status_code == 200
        assert "/api/orders" in client.get("/openapi.json").json()["paths"]
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready"}

    # The failure is in the log as structured fields, on one line, with the request id.
    errors = _wait_for(
        lambda: [
            r for r in server.records() if r.get("request_id") == rid and r.get("level") == "error"
        ]
    )
    exception = errors[0]["exception"]
    assert isinstance(exception, list)
    assert exception[0]["exc_type"] == "RuntimeError"
    assert exception[0]["frames"][-1]["name"] == "boom"


def test_trace_context_is_continued_and_on_every_line_of_the_request(server: Server) -> None:
    trace_id = secrets.token_hex(16)
    sent = f"it-{secrets.token_hex(6)}"
    response = httpx.post(
        f"{server.url}/api/orders",
        json={"item_id": 5, "quantity": 1},
        headers={"X-Request-ID": sent, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        timeout=10,
    )
    assert response.status_code == 201
    returned = re.fullmatch(rf"00-{trace_id}-([0-9a-f]{{16}})-01", response.headers["traceparent"])
    assert returned, response.headers["traceparent"]
    lines = _wait_for(
        lambda: (
            [r for r in server.records() if r.get("request_id") == sent]
            if _access_lines(server, sent)
            else []
        )
    )
    # The app's own line and the access line: same trace, same span (the one returned).
    assert {r["logger"] for r in lines} == {"app", "server.access"}
    for record in lines:
        assert record["trace_id"] == trace_id
        assert record["span_id"] == returned[1]

    # A forged one is replaced: a new trace, never the caller's bytes.
    forged = httpx.get(
        f"{server.url}/api/hello",
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01-forged"},
        timeout=10,
    )
    assert not forged.headers["traceparent"].startswith(f"00-{trace_id}-")
    assert forged.headers["traceparent"].startswith(f"00-{forged.headers['x-request-id']}-")


def test_request_id_is_returned_and_logged(server: Server) -> None:
    sent = f"it-{secrets.token_hex(6)}"
    response = httpx.post(
        f"{server.url}/api/orders",
        json={"item_id": 5, "quantity": 1},
        headers={"X-Request-ID": sent},
        timeout=10,
    )
    assert response.headers["x-request-id"] == sent
    lines = _wait_for(
        lambda: (
            [r for r in server.records() if r.get("request_id") == sent]
            if _access_lines(server, sent)
            else []
        )
    )
    by_logger = {str(r["logger"]): r for r in lines}
    # The access line of the serving layer and the app's own line share the id.
    assert by_logger["server.access"]["route"] == "/api/orders"
    assert by_logger["server.access"]["status"] == 201
    assert by_logger["server.access"]["method"] == "POST"
    assert by_logger["app"]["event"] == "order created"
    for record in lines:
        assert {"timestamp", "level", "logger", "event", "pid"} <= record.keys()

    # A malformed id is replaced, never echoed.
    bad = httpx.get(
        f"{server.url}/api/hello", headers={"X-Request-ID": "bad id\t<script>"}, timeout=10
    )
    assert re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])


def test_client_address_comes_from_trusted_proxy_only(server: Server) -> None:
    rid = f"xff-{secrets.token_hex(6)}"
    httpx.get(
        f"{server.url}/api/hello",
        headers={"X-Request-ID": rid, "X-Forwarded-For": "203.0.113.9"},
        timeout=10,
    )
    # 127.0.0.1 is in FORWARDED_ALLOW_IPS (the default), so the header is believed.
    assert _wait_for(lambda: _access_lines(server, rid))[0]["client"] == "203.0.113.9"


def _fresh_connection_get(url: str) -> str:
    with httpx.Client(timeout=10) as client:  # a new connection: any worker may accept it
        response = client.get(url)
        assert response.status_code in (200, 404)
        return response.headers["x-request-id"]


def test_metrics_count_every_request_over_all_workers(server: Server) -> None:
    before = server.metrics(settle=True)
    paths = ["/api/hello", "/api/items", "/api/items/1", "/api/items/404"] * 30
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda p: _fresh_connection_get(server.url + p), paths))
    after = server.metrics(settle=True)

    sent = len(paths)
    assert total(after, "http_requests_total") - total(before, "http_requests_total") == sent
    assert (
        total(after, "http_request_duration_seconds_count")
        - total(before, "http_request_duration_seconds_count")
        == sent
    )
    assert (
        total(after, "http_requests_total", route="/api/items/{item_id}", status="404")
        - total(before, "http_requests_total", route="/api/items/{item_id}", status="404")
        == 30
    )
    # Both workers served some of them, so the totals really were summed over processes.
    pids = {
        r["pid"]
        for r in server.records()
        if r.get("logger") == "server.access" and r.get("request_id") in set(ids)
    }
    assert len(pids) == 2


def test_scanner_paths_share_one_route_label(server: Server) -> None:
    def routes() -> set[str]:
        return {labels["route"] for labels, _ in samples(server.metrics(), "http_requests_total")}

    time.sleep(0.5)  # the workers' metric flush interval
    known = routes()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(100):
            path = f"/{secrets.token_hex(4)}/{secrets.token_hex(8)}.php"
            assert client.get(path).status_code == 404
    time.sleep(0.5)  # the workers' metric flush interval
    added = routes() - known
    assert added <= {"<unmatched>"}
    assert "<unmatched>" in routes()
    assert total(server.metrics(), "http_requests_total", route="<unmatched>") >= 100


def test_metrics_answer_while_every_worker_is_stuck(server: Server) -> None:
    # At least one request counted, whichever tests ran before this one.
    assert httpx.get(f"{server.url}/api/hello", timeout=10).status_code == 200
    server.metrics(settle=True)
    pids = server.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # truly stuck: not even the event loop turns
    try:
        started = time.monotonic()
        response = httpx.get(server.metrics_url, timeout=1.0)
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert "http_requests_total" in response.text
        assert elapsed < 1.0
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{server.url}/api/hello", timeout=0.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_killed_worker_is_replaced_and_counters_never_go_backwards(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for _ in range(20):
            client.get("/api/hello")
    text = server.metrics(settle=True)
    requests_before = total(text, "http_requests_total")
    restarts_before = total(text, "gunicorn_worker_restarts_total")
    pids = server.worker_pids()
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)

    seen = [requests_before]

    def replaced() -> bool:
        now = server.metrics()
        seen.append(total(now, "http_requests_total"))
        current = server.worker_pids()
        return len(current) == 2 and victim not in current

    _wait_for(replaced, timeout=20, interval=0.1)
    server.wait_ready(workers=2)
    text = server.metrics()
    assert total(text, "gunicorn_worker_restarts_total") == restarts_before + 1
    assert all(b >= a for a, b in itertools_pairwise(seen)), seen
    assert total(text, "http_requests_total") >= requests_before
    assert total(text, "http_requests_in_progress") == 0


def itertools_pairwise(values: list[float]) -> list[tuple[float, float]]:
    return list(itertools.pairwise(values))


def test_every_line_the_server_printed_is_json(server: Server) -> None:
    lines = server.lines()
    assert len(lines) > 50
    for line in lines:
        record = orjson.loads(line)
        assert {"timestamp", "level", "event", "pid"} <= record.keys(), record
        assert record["timestamp"].endswith("Z")
