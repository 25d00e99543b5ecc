"""The load drivers: one bounded run pinned to the client core, and what it measured.

wrk: HTTP/1.1 with keep-alive, BENCH_CONNECTIONS connections. Bounded by its duration (-d),
a request cap (a Lua script stops each thread after BENCH_MAX_REQUESTS responses) and a
hard timeout on the process.
h2load: HTTP/2 over TLS with BENCH_CONNECTIONS / BENCH_STREAMS connections of
BENCH_STREAMS concurrent streams each (the same requests in flight as wrk: a browser's
few connections, multiplexed); HTTP/1.1 (--h1) to a server without TLS. h2load (1.52,
Debian 12) does not open a new connection when the server ends one: after nginx's
`keepalive_requests` (1000, nginx/conf/runtime/connection.conf) nginx sends GOAWAY, and
h2load counts the streams it had sent beyond GOAWAY's last stream id as failed (nginx
never processed them; RFC 9113 6.8: a client retries them on a new connection) and the
client then stays idle until -D ends: its req/s was requests / duration, not capacity.
So h2load runs in batches: each makes exactly that many requests per connection (-n),
new connections per batch (as a browser would reconnect), batches until BENCH_SECONDS or
BENCH_MAX_REQUESTS, each under the hard timeout. Latency percentiles come from its
per-request log (all batches).
req/s is requests / wall time of the whole run, for both clients, so requests per server
CPU-second is requests / server CPU-seconds exactly. The server side's CPU time is read
from /proc before and after, by part (nginx, gunicorn).
"""

from __future__ import annotations

import math
import os
import re
import resource
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.processes import cpu_seconds, peak_rss_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

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


CONNECTION_CONF = Path(__file__).resolve().parents[1] / "nginx/conf/runtime/connection.conf"


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


Figures = tuple[float, float, float, int, int]  # req/s, p50 ms, p99 ms, requests, errors


def _h2load_summary(output: str) -> tuple[float, int, int]:
    """req/s, requests done, errors (failed: non-2xx/3xx or not completed, + timed out)."""
    rps = float(_find(r"finished in [\d.]+m?s, ([\d.]+) req/s", output, "req/s"))
    done = int(_find(r"^requests: .*?(\d+) done", output, "requests done"))
    failed = int(_find(r"^requests: .*?(\d+) failed", output, "requests failed"))
    timeout = int(_find(r"^requests: .*?(\d+) timeout", output, "requests timed out"))
    return rps, done, failed + timeout


def _h2load_latency(log: str) -> tuple[float, float]:
    """p50 and p99 ms from h2load's --log-file (per request: start µs, status, µs until the
    response ended; tab-separated)."""
    durations = sorted(int(line.split("\t")[2]) for line in log.splitlines() if line.strip())
    if not durations:
        raise OutputError("h2load's log holds no request")
    return percentile(durations, 50) / 1000, percentile(durations, 99) / 1000


def parse_h2load(output: str, log: str) -> Figures:
    """req/s, p50 ms, p99 ms, requests, errors from h2load's summary and its --log-file."""
    rps, done, errors = _h2load_summary(output)
    return (rps, *_h2load_latency(log), done, errors)


def combine_h2load(batches: list[str], log: str) -> Figures:
    """The figures of consecutive h2load batches: their requests and errors summed, the
    latency percentiles over every request in the log (req/s: the last batch's; measure()
    divides the requests by the wall time of all of them)."""
    if not batches:
        raise OutputError("no h2load batch ran")
    summaries = [_h2load_summary(out) for out in batches]
    return (
        summaries[-1][0],
        *_h2load_latency(log),
        sum(s[1] for s in summaries),
        sum(s[2] for s in summaries),
    )


def percentile(ordered: list[int], pct: float) -> float:
    """Nearest-rank percentile of ascending values."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


def per_connection_requests(conf: Path = CONNECTION_CONF) -> int:
    """nginx's `keepalive_requests` for client connections, read from its one home: the
    requests h2load makes on one connection before it opens the next."""
    match = re.search(r"^keepalive_requests\s+(\d+);", conf.read_text(), re.MULTILINE)
    if match is None:
        raise OutputError(f"no keepalive_requests in {conf}")
    return int(match.group(1))


def _run(argv: list[str], settings: Settings, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=env,
        timeout=settings.run_timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


def measure(load: Callable[[], Figures], parts: dict[str, Server], settings: Settings) -> Run:
    """Run a load generator (`load`: its runs, already pinned, and their figures) and
    measure both sides around it."""
    pids = {name: server.pids() for name, server in parts.items()}
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    _, p50, p99, requests, errors = load()
    wall = time.monotonic() - started
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    parts_cpu = {name: max(0.0, cpu_seconds(pids[name]) - before[name]) / wall for name in parts}
    client_cpu = (
        client_after.ru_utime
        + client_after.ru_stime
        - client_before.ru_utime
        - client_before.ru_stime
    ) / wall
    return Run(
        requests / wall,
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
    return measure(lambda: parse_wrk(_run(argv, settings, env)), parts, settings)


def h2load(
    url: str,
    seconds: int,
    *,
    log: Path,
    parts: dict[str, Server],
    settings: Settings,
    headers: tuple[str, ...] = (),
) -> Run:
    """Bounded h2load batches (HTTP/2 over TLS; HTTP/1.1 to a plain-HTTP url) pinned to the
    client core, for `seconds` (see the module's docstring: why batches)."""
    h1 = url.startswith("http://")
    streams = 1 if h1 else settings.streams
    connections = max(1, settings.connections // streams)
    batch = connections * per_connection_requests()
    argv = [
        *("taskset", "-c", str(settings.client_cpu), "h2load"),
        *(
            "--threads",
            "1",
            "--clients",
            str(connections),
            "--max-concurrent-streams",
            str(streams),
        ),
        *("--requests", str(batch), "--log-file", str(log)),
        *(arg for header in headers for arg in ("--header", header)),
        *(["--h1"] if h1 else []),
        url,
    ]

    def batches() -> Figures:
        log.unlink(missing_ok=True)  # h2load appends: one log for all batches
        outputs: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(outputs) * batch < settings.max_requests:
            outputs.append(_run(argv, settings))
        return combine_h2load(outputs, log.read_text())

    return measure(batches, parts, settings)
