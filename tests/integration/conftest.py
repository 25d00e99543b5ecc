"""A real gunicorn master with real uvicorn workers on loopback, for the integration layer."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import orjson
import pytest

from server.metrics import HttpMetrics
from tests.promtext import samples

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running `gunicorn -c server/gunicorn_conf.py`, its ports and its output."""

    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def lines(self) -> list[bytes]:
        return [line for line in self.log_path.read_bytes().splitlines() if line.strip()]

    def records(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.lines()]

    def metrics(self, settle: bool = False) -> str:
        """The scrape; `settle` first waits out the workers' metric flush interval."""
        if settle:
            time.sleep(HttpMetrics.FLUSH_INTERVAL * 2 + 0.1)
        return httpx.get(self.metrics_url, timeout=5).text

    def worker_pids(self) -> set[int]:
        """The live workers' pids, as the master's process metrics list them."""
        return {
            int(labels["pid"])
            for labels, _ in samples(self.metrics(), "process_cpu_seconds_total")
            if labels["role"] == "worker"
        }

    def wait_ready(self, workers: int, timeout: float = 30) -> None:
        """Until the metrics report `workers` live workers and every one has started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.process.returncode}:\n{self.tail()}"
                )
            try:
                text = self.metrics()
                started = sum(
                    1 for r in self.records() if r.get("event") == "Application startup complete."
                )
                if (
                    f"gunicorn_workers {workers:.1f}" in text
                    and started >= workers
                    and httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
                ):
                    return
            except (httpx.HTTPError, orjson.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"gunicorn not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        return b"\n".join(self.lines()[-n:]).decode(errors="replace")

    def stop(self, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_server(tmp: Path, workers: int = 2, **env_overrides: str) -> Server:
    port, metrics_port = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "METRICS_HOST": "127.0.0.1",
        "METRICS_PORT": str(metrics_port),
        "WEB_CONCURRENCY": str(workers),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / "multiproc"),
        "WORKER_TMP_DIR": str(tmp),
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        # No drain before a stop unless a test asks for one: nothing routes by readiness here.
        "SHUTDOWN_DELAY": "0",
        **env_overrides,
    }
    log_path = tmp / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "server"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Server(process, port, metrics_port, log_path, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with two workers, shared by a module's tests."""
    srv = start_server(tmp_path_factory.mktemp("gunicorn"))
    try:
        srv.wait_ready(workers=2)
        yield srv
    finally:
        srv.stop()
