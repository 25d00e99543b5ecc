"""The load driver: one bounded wrk run pinned to the client core, and what it measured.

Bounded three ways: wrk's own duration (-d), a request cap (a Lua script stops each wrk
thread after BENCH_MAX_REQUESTS responses) and a hard timeout on the process. The server
side's CPU time is read from /proc before and after, by part (e.g. nginx and gunicorn).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench.processes import cpu_seconds, peak_rss_bytes

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from bench.processes import Server
    from bench.settings import Settings

CAP_LUA = """\
-- Stop this wrk thread after BENCH_MAX_REQUESTS responses: the run is bounded in requests
-- as well as in time (wrk's -d).
local max = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
local seen = 0
function response(status, headers, body)
  seen = seen + 1
  if max > 0 and seen >= max then wrk.thread:stop() end
end
"""


class OutputError(ValueError):
    """The load generator's output lacks a figure the report needs."""


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu: float  # share of one core, all server-side processes
    client_cpu: float
    capped: bool
    parts_cpu: dict[str, float] = field(default_factory=dict)  # by part (nginx, gunicorn)
    peak_rss: int = 0  # bytes, sum of the server side's processes' VmHWM

    @property
    def per_cpu_second(self) -> float:
        """Requests per second of server CPU: capacity, whatever else took the core."""
        return self.rps / self.server_cpu if self.server_cpu > 0 else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise OutputError(f"cannot read the latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _find(pattern: str, output: str, what: str) -> str:
    match = re.search(pattern, output, re.MULTILINE)
    if match is None:
        raise OutputError(f"no {what} in the load generator's output:\n{output[-1500:]}")
    return match.group(1)


def parse_wrk(output: str) -> tuple[float, float, float, int, int]:
    """req/s, p50 ms, p99 ms, requests, errors (non-2xx/3xx + socket errors) from wrk."""
    rps = float(_find(r"Requests/sec:\s+([\d.]+)", output, "Requests/sec"))
    p50 = _ms(_find(r"^\s+50%\s+(\S+)", output, "50% latency (run wrk with --latency)"))
    p99 = _ms(_find(r"^\s+99%\s+(\S+)", output, "99% latency (run wrk with --latency)"))
    requests = int(_find(r"(\d+) requests in", output, "request count"))
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        errors += int(non_2xx.group(1))
    if sock := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(x) for x in sock.groups())
    return rps, p50, p99, requests, errors


def measure(
    argv: list[str],
    parse: Callable[[str], tuple[float, float, float, int, int]],
    parts: dict[str, Server],
    settings: Settings,
    env: dict[str, str] | None = None,
) -> Run:
    """Run a load generator (argv, already pinned) and measure both sides around it."""
    pids = {name: server.pids() for name, server in parts.items()}
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=settings.run_timeout,
        check=False,
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    parts_cpu = {name: max(0.0, cpu_seconds(pids[name]) - before[name]) / wall for name in parts}
    client_cpu = (
        client_after.ru_utime
        + client_after.ru_stime
        - client_before.ru_utime
        - client_before.ru_stime
    ) / wall
    rps, p50, p99, requests, errors = parse(done.stdout)
    return Run(
        rps,
        p50,
        p99,
        requests,
        errors,
        server_cpu=sum(parts_cpu.values()),
        client_cpu=client_cpu,
        capped=requests >= settings.max_requests,
        parts_cpu=parts_cpu,
        peak_rss=sum(peak_rss_bytes(p) for p in pids.values()),
    )


def wrk(
    url: str,
    seconds: int,
    *,
    lua: Path,
    parts: dict[str, Server],
    settings: Settings,
    headers: tuple[str, ...] = (),
) -> Run:
    """One bounded wrk run (HTTP/1.1, keep-alive, 1 thread) pinned to the client core."""
    extra = [arg for header in headers for arg in ("-H", header)]
    argv = [
        "taskset",
        "-c",
        str(settings.client_cpu),
        "wrk",
        "-t1",
        f"-c{settings.connections}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        "Host: localhost",
        *extra,
        "-s",
        str(lua),
        url,
    ]
    env = {**os.environ, "BENCH_MAX_REQUESTS": str(settings.max_requests)}
    return measure(argv, parse_wrk, parts, settings, env)
