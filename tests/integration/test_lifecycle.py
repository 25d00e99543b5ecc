"""Start-up and shutdown of the real server: bad settings, graceful SIGTERM."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import httpx
import orjson
import pytest

from server.cpu import worker_count
from tests.integration.conftest import ROOT, start_server

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORKER_TIMEOUT", "soon"),
        ("LOG_FORMAT", "xml"),
        ("PORT", "70000"),
        ("FORWARDED_ALLOW_IPS", "the-proxy"),
        ("APP_MODULE", "no colon here"),
        ("WEB_CONCURRENCY", "lots"),
        ("SHUTDOWN_TIMEOUT", "60"),
        ("WS_MAX_MESSAGE_SIZE", "1MB"),
    ],
)
def test_bad_setting_stops_startup_with_its_message(
    tmp_path: Path, variable: str, value: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), variable: value}
    result = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 78
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    record = orjson.loads(lines[0])
    assert record["level"] == "critical"
    assert variable in record["event"]
    if variable != "SHUTDOWN_TIMEOUT":  # a relation between two settings names both
        assert f"{variable}='{value}' is invalid: expected " in record["event"]
    assert result.stderr == b""


def test_unimportable_app_module_stops_startup(tmp_path: Path) -> None:
    server = start_server(tmp_path, APP_MODULE="app.nonexistent:app")
    code = server.process.wait(timeout=30)
    assert code != 0
    failures = [r for r in server.records() if r["event"] == "cannot load the application"]
    assert failures, server.tail()
    assert failures[0]["app_module"] == "app.nonexistent:app"
    assert failures[0]["level"] == "critical"


def _slow(url: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(url, timeout=30)
    return response.status_code, time.monotonic() - started


def test_sigterm_finishes_in_flight_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    server = start_server(tmp_path, SHUTDOWN_TIMEOUT="10", GRACEFUL_TIMEOUT="15")
    server.wait_ready(workers=2)
    in_flight = 6
    with concurrent.futures.ThreadPoolExecutor(max_workers=in_flight) as pool:
        futures = [pool.submit(_slow, f"{server.url}/api/slow?seconds=2") for _ in range(in_flight)]
        # Every request has reached a worker before the signal.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            busy = sum(
                1 for r in server.records() if r.get("event") == "request" and r.get("route")
            )
            text = server.metrics()
            if f"http_requests_in_progress {float(in_flight)}" in text:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"requests never all in flight: {busy}")
        server.process.terminate()  # SIGTERM to the master

        # New connections are refused once the listeners are closed.
        def refused() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
                    return False
            except OSError:
                return True

        deadline = time.monotonic() + 3
        while not refused():
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        results = [f.result(timeout=30) for f in futures]

    assert [status for status, _ in results] == [200] * in_flight
    assert server.process.wait(timeout=30) == 0
    for line in server.lines():
        orjson.loads(line)


def test_sigterm_drains_readiness_first_while_serving(tmp_path: Path) -> None:
    """SHUTDOWN_DELAY: after SIGTERM every worker answers /readyz 503 and serves normal
    requests on fresh and kept-alive connections; /healthz stays 200; then the stop."""
    delay = 3
    server = start_server(tmp_path, SHUTDOWN_DELAY=str(delay))
    server.wait_ready(workers=2)
    workers = server.worker_pids()
    fresh = httpx.Limits(max_keepalive_connections=0)
    with (
        httpx.Client(base_url=server.url, timeout=5) as kept,
        httpx.Client(base_url=server.url, timeout=5, limits=fresh) as client,
    ):
        assert kept.get("/readyz").status_code == 200  # a connection opened before the signal
        server.process.terminate()
        signalled = time.monotonic()
        readiness: list[str] = []
        others: set[tuple[int, int, int]] = set()
        while server.process.poll() is None and time.monotonic() - signalled < delay - 0.5:
            readiness.append(client.get("/readyz").json()["status"])
            order = client.post("/api/orders", json={"item_id": 1, "quantity": 2})
            healthz = client.get("/healthz")
            hello = kept.get("/api/hello")
            others.add((order.status_code, healthz.status_code, hello.status_code))
            time.sleep(0.05)
        # The drain is still on, in the same workers (fresh connections reach both).
        assert server.process.poll() is None, "the master stopped before SHUTDOWN_DELAY"
        assert server.worker_pids() == workers
    # Ready until the master handled the signal, then draining for good; meanwhile every
    # write, liveness probe and request on the old keep-alive connection succeeded.
    flipped = readiness.index("draining")
    assert set(readiness[:flipped]) <= {"ready"}, readiness
    assert set(readiness[flipped:]) == {"draining"}, readiness
    assert len(readiness) - flipped > 10, readiness
    assert others == {(201, 200, 200)}
    assert server.process.wait(timeout=30) == 0
    events = [r["event"] for r in server.records()]
    draining = events.index("draining before stop: /readyz answers 503")
    assert draining < events.index("stopping") < events.index("Shutting down: Master")


def test_a_second_sigterm_skips_the_rest_of_the_drain(tmp_path: Path) -> None:
    server = start_server(tmp_path, SHUTDOWN_DELAY="60")
    server.wait_ready(workers=2)
    server.process.terminate()
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "never started draining"
        time.sleep(0.05)
    server.process.terminate()
    assert server.process.wait(timeout=20) == 0


def test_sighup_reload_replaces_workers_without_failing_a_request(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        server.wait_ready(workers=2)
        before = server.worker_pids()
        failures: list[str] = []
        statuses: list[int] = []
        stop = time.monotonic() + 6
        sent_hup = False

        # A fresh connection per request: an idle keep-alive connection closed by a stopping
        # worker is a race every HTTP/1.1 client must retry (RFC 9112 9.3.1); nginx does,
        # for idempotent requests. What must never happen is an accepted request dropped.
        no_keepalive = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=10, limits=no_keepalive) as client:
            while time.monotonic() < stop and len(statuses) < 2000:
                try:
                    statuses.append(client.get("/api/hello").status_code)
                except httpx.HTTPError as error:
                    failures.append(repr(error))
                if not sent_hup and len(statuses) >= 50:
                    server.process.send_signal(signal.SIGHUP)
                    sent_hup = True

        assert sent_hup
        assert failures == []
        assert set(statuses) == {200}
        server.wait_ready(workers=2)
        after = server.worker_pids()
        assert before.isdisjoint(after), (before, after)  # every worker was replaced
    finally:
        assert server.stop() == 0


def test_env_example_values_start_the_server(tmp_path: Path) -> None:
    """The defaults .env.example documents, uncommented, start the server: an empty
    WEB_CONCURRENCY means auto, not a crash."""
    example = (ROOT / ".env.example").read_text()
    values = dict(
        line.removeprefix("# ").split("=", 1)
        for line in example.splitlines()
        if re.match(r"^# [A-Z][A-Z0-9_]*=", line)
    )
    keep = {"WEB_CONCURRENCY", "LOG_LEVEL", "MAX_REQUESTS", "MAX_REQUESTS_JITTER", "BACKLOG"}
    keep |= {"WORKER_TIMEOUT", "GRACEFUL_TIMEOUT", "SHUTDOWN_TIMEOUT", "KEEPALIVE_TIMEOUT"}
    keep |= {"SHUTDOWN_DELAY"}
    server = start_server(tmp_path, **{k: v for k, v in values.items() if k in keep})
    try:
        assert server.env["WEB_CONCURRENCY"] == ""
        server.wait_ready(workers=worker_count(None))  # derived from this machine's CPUs
    finally:
        assert server.stop() == 0
