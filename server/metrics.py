"""Prometheus metrics that stay correct across gunicorn workers.

Workers record HTTP metrics with prometheus_client in multiprocess mode: each process writes
its own memory-mapped files in PROMETHEUS_MULTIPROC_DIR. The gunicorn master wipes that
directory at start, marks dead workers (so `livesum` gauges drop them, while their counters
keep counting), and serves the aggregate on its own port from a thread. The master never
runs application code, so /metrics answers even while every worker is stuck.
https://prometheus.github.io/client_python/multiprocess/

Exemplars: prometheus_client's multiprocess mode has none (its mmap values drop them), so
each worker keeps the latest (trace id, seconds, time) per histogram bucket and writes them,
with its flush, to `exemplars_<pid>.json` in the same directory (atomically: a new file,
then rename). The master attaches the newest per bucket over all workers to the merged
buckets; they are served when the scraper negotiates OpenMetrics (Prometheus does), as
`... # {trace_id="..."} 0.73 1733000000.123`.
https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md#exemplars

The master also exports what only it knows: live workers, worker restarts, build info, and
CPU / memory / fds of every process in the container (multiprocess mode has no process
collector).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import platform
import shutil
import struct
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from wsgiref.simple_server import WSGIServer

__all__ = [
    "HTTP_BUCKETS",
    "MASTER",
    "UNMATCHED_ROUTE",
    "HttpMetrics",
    "MasterCollector",
    "WebSocketMetrics",
    "mark_worker_dead",
    "prepare_multiproc_dir",
    "start_metrics_server",
]

# Resolve web latencies from 1 ms to 10 s.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Every path no route matched shares this label value, so a scanner cannot create series.
UNMATCHED_ROUTE = "<unmatched>"
# The `le` label of each bucket index, as the merged histogram writes it.
_BUCKET_LE = (*(floatToGoString(b) for b in HTTP_BUCKETS), "+Inf")  # type: ignore[no-untyped-call]
_EXEMPLAR_FILE = "exemplars_{pid}.json"
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _BatchedMetrics:
    """Metrics counted in memory on the hot path and written out a few times a second.

    In multiprocess mode every `inc()` takes a lock, checks the pid and writes an mmap;
    five of them per request cost more than the rest of the middleware. Events are
    therefore counted in plain dicts on the hot path and flushed into prometheus_client's
    values at most every FLUSH_INTERVAL seconds (a timer on the worker's event loop, armed
    only while there is something to write) and when the worker shuts down. A scrape sees
    counts at most FLUSH_INTERVAL old; a worker killed by SIGKILL loses at most that much.
    """

    FLUSH_INTERVAL = 0.2

    def __init__(self, registry: CollectorRegistry | None) -> None:
        # In multiprocess mode values live in files and the master aggregates them, so the
        # metrics are not registered anywhere in the worker.
        if registry is None and not _multiprocess():
            registry = CollectorRegistry()
        self.registry = registry
        self._timer: asyncio.TimerHandle | None = None

    def _schedule(self) -> None:
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a plain function call): write now
                self.flush()
                return
            self._timer = loop.call_later(self.FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        """Write what is pending into prometheus_client's values."""
        raise NotImplementedError


class HttpMetrics(_BatchedMetrics):
    """The per-request metrics: requests, their duration, requests in progress."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        registry = self.registry
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests handled by the app, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from the request reaching the app to the end of its response (for an "
            "event stream, to its start).",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.in_progress = Gauge(
            "http_requests_in_progress",
            "HTTP requests being handled right now, over all live workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # Pending, not yet written: counts by (method, route, status); for each
        # (method, route) the observation count per bucket and the sum of seconds.
        self._counts: dict[tuple[str, str, int], int] = {}
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}
        # Latest exemplar per (method, route, bucket index): (trace id, seconds, unix time).
        self._exemplars: dict[tuple[str, str, int], tuple[str, float, float]] = {}
        self._exemplars_changed = False
        self._active = 0
        self._written_active = 0

    def started(self) -> None:
        self._active += 1
        self._schedule()

    def observe(
        self, method: str, route: str, status: int, seconds: float, trace_id: str | None = None
    ) -> None:
        """One finished request (also ends what `started` began); its trace id becomes the
        exemplar of its bucket."""
        self._active -= 1
        if method not in _KNOWN_METHODS:
            method = "OTHER"
        key = (method, route, status)
        self._counts[key] = self._counts.get(key, 0) + 1
        hkey = (method, route)
        buckets = self._buckets.get(hkey)
        if buckets is None:
            buckets = self._buckets[hkey] = [0] * (len(HTTP_BUCKETS) + 1)
            self._sums[hkey] = 0.0
        index = bisect.bisect_left(HTTP_BUCKETS, seconds)
        buckets[index] += 1
        self._sums[hkey] += seconds
        if trace_id is not None:
            self._exemplars[(method, route, index)] = (trace_id, seconds, time.time())
            self._exemplars_changed = True
        self._schedule()

    def flush(self) -> None:
        self._timer = None
        counts, self._counts = self._counts, {}
        buckets, self._buckets = self._buckets, {}
        sums, self._sums = self._sums, {}
        for (method, route, status), count in counts.items():
            self.requests.labels(method, route, str(status)).inc(count)
        for hkey, per_bucket in buckets.items():
            child = self.duration.labels(*hkey)
            # prometheus_client's Histogram child keeps one value per bucket (not
            # cumulative) and the sum; observe() increments exactly these.
            for index, count in enumerate(per_bucket):
                if count:
                    child._buckets[index].inc(count)
            child._sum.inc(sums[hkey])
        if self._exemplars_changed:
            self._exemplars_changed = False
            self._write_exemplars()
        if self._active != self._written_active:
            self.in_progress.set(self._active)
            self._written_active = self._active

    def _write_exemplars(self) -> None:
        if self.registry is not None:  # one process: prometheus_client serves them itself
            for (method, route, index), (trace_id, seconds, at) in self._exemplars.items():
                bucket = self.duration.labels(method, route)._buckets[index]
                bucket.set_exemplar(Exemplar({"trace_id": trace_id}, seconds, at))
            return
        directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        path = directory / _EXEMPLAR_FILE.format(pid=os.getpid())
        rows = [[*key, *value] for key, value in self._exemplars.items()]
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(rows))
        temporary.replace(path)  # atomic: the master reads the old file or the new one


def read_exemplars(directory: Path) -> dict[tuple[str, str, str], Exemplar]:
    """The newest exemplar per (method, route, le) over every worker's file."""
    newest: dict[tuple[str, str, str], tuple[float, Exemplar]] = {}
    for path in directory.glob(_EXEMPLAR_FILE.format(pid="*")):
        try:
            rows = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):  # gone with its dead worker
            continue
        for method, route, index, trace_id, seconds, at in rows:
            key = (method, route, _BUCKET_LE[index])
            if key not in newest or at > newest[key][0]:
                newest[key] = (at, Exemplar({"trace_id": trace_id}, seconds, at))
    return {key: exemplar for key, (_, exemplar) in newest.items()}


def _with_exemplars(metrics: list[Metric], directory: Path) -> list[Metric]:
    """The merged request-duration buckets with the newest exemplar of each attached."""
    exemplars = read_exemplars(directory)
    if not exemplars:
        return metrics
    for metric in metrics:
        if metric.name != "http_request_duration_seconds":
            continue
        samples = []
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                labels = sample.labels
                found = exemplars.get((labels["method"], labels["route"], labels["le"]))
                if found is not None:
                    sample = Sample(sample.name, labels, sample.value, None, found)  # noqa: PLW2901
            samples.append(sample)
        metric.samples = samples
    return metrics


class WebSocketMetrics(_BatchedMetrics):
    """WebSocket sessions: open now (over all live workers), messages, how sessions ended.

    A session ends with its close code: the one the app sent, the one the client sent, or
    what the server saw (1006 when the peer vanished without a close frame, 1009 for a
    message over WS_MAX_MESSAGE_SIZE, 1011 for an app error or a missed ping, 1012 when
    the worker stopped). A handshake the app refused counts with code "rejected".
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        registry = self.registry
        self.open = Gauge(
            "websocket_connections_open",
            "WebSocket sessions open right now, over all live workers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.messages = Counter(
            "websocket_messages_total",
            "WebSocket messages, by route template and direction (in: from the client).",
            ["route", "direction"],
            registry=registry,
        )
        self.sessions = Counter(
            "websocket_sessions_total",
            "WebSocket sessions that ended, by route template and close code.",
            ["route", "code"],
            registry=registry,
        )
        self._open = 0
        self._written_open = 0
        self._messages: dict[tuple[str, str], int] = {}
        self._sessions: dict[tuple[str, str], int] = {}

    def opened(self) -> None:
        self._open += 1
        self._schedule()

    def message(self, route: str, direction: str) -> None:
        """One message, "in" (from the client) or "out"."""
        key = (route, direction)
        self._messages[key] = self._messages.get(key, 0) + 1
        self._schedule()

    def closed(self, route: str, code: str, *, was_open: bool) -> None:
        """A session ended (`was_open`: it had been accepted, so `opened` counted it)."""
        if was_open:
            self._open -= 1
        key = (route, code)
        self._sessions[key] = self._sessions.get(key, 0) + 1
        self._schedule()

    def flush(self) -> None:
        self._timer = None
        messages, self._messages = self._messages, {}
        sessions, self._sessions = self._sessions, {}
        for labels, count in messages.items():
            self.messages.labels(*labels).inc(count)
        for labels, count in sessions.items():
            self.sessions.labels(*labels).inc(count)
        if self._open != self._written_open:
            self.open.set(self._open)
            self._written_open = self._open


def prepare_multiproc_dir(path: Path) -> None:
    """Start from an empty directory: stale files from a previous run would be summed."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges; its counters and histograms keep counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    # Its exemplars go too: the live workers' are as recent, and the directory stays bounded.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        with contextlib.suppress(FileNotFoundError):
            (Path(directory) / _EXEMPLAR_FILE.format(pid=pid)).unlink()


# --- process metrics from /proc: the master, and every worker it supervises -------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _process_stats(pid: int) -> tuple[float, int, int] | None:
    """(cpu seconds, resident bytes, open fds) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
        with open(f"/proc/{pid}/statm", "rb") as statm_file:
            rss_pages = int(statm_file.read().split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS, rss_pages * _PAGE_SIZE, fds


class MasterCollector(Collector):
    """What the gunicorn master knows: workers, restarts, build info, process resources."""

    def __init__(self, worker_pids: Callable[[], Iterable[int]], version: str) -> None:
        self._worker_pids = worker_pids
        self._version = version
        self._restarts = 0
        self._lock = threading.Lock()

    def worker_restarted(self) -> None:
        with self._lock:
            self._restarts += 1

    def collect(self) -> Iterable[Metric]:
        workers = sorted(self._worker_pids())
        live = GaugeMetricFamily("gunicorn_workers", "Worker processes the master supervises.")
        live.add_metric([], len(workers))
        yield live

        restarts = CounterMetricFamily(
            "gunicorn_worker_restarts",
            "Workers that exited while the master kept running (crash, kill, timeout, "
            "max_requests recycling, reload).",
        )
        with self._lock:
            restarts.add_metric([], self._restarts)
        yield restarts

        info = GaugeMetricFamily(
            "app_build_info",
            "Always 1; labels carry the build.",
            labels=["version", "python_version"],
        )
        info.add_metric([self._version, platform.python_version()], 1)
        yield info

        cpu = CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU time.", labels=["role", "pid"]
        )
        rss = GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory.", labels=["role", "pid"]
        )
        fds = GaugeMetricFamily(
            "process_open_fds", "Open file descriptors.", labels=["role", "pid"]
        )
        processes = [("master", os.getpid())] + [("worker", pid) for pid in workers]
        for role, pid in processes:
            stats = _process_stats(pid)
            if stats is None:
                continue
            labels = [role, str(pid)]
            cpu.add_metric(labels, stats[0])
            rss.add_metric(labels, stats[1])
            fds.add_metric(labels, stats[2])
        yield cpu
        yield rss
        yield fds


class _MasterMetrics:
    """The master's metrics objects; module state, so a config reload (SIGHUP) keeps them."""

    collector: MasterCollector | None = None
    httpd: WSGIServer | None = None


MASTER = _MasterMetrics()


class _MultiProcessCollector(Collector):
    """prometheus_client's MultiProcessCollector, tolerant of files that come and go.

    A worker creating its file (size 0 until truncated to size) or a dead worker's gauge
    file being removed during a scrape would otherwise fail the whole scrape.
    """

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        for attempt in range(3):
            files = []
            for entry in self._path.glob("*.db"):
                try:
                    if entry.stat().st_size > 0:
                        files.append(str(entry))
                except FileNotFoundError:
                    continue
            try:
                merged = list(MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]
                return _with_exemplars(merged, self._path)
            except (OSError, struct.error):
                if attempt == 2:
                    raise
        return []


def _logged(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A failed scrape answers 500 and is logged as JSON, not printed as a traceback."""
    from server.logs import get_logger

    log = get_logger("server.metrics")

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return list(app(environ, start_response))
        except Exception:  # one failed scrape must not kill the thread
            log.exception("metrics scrape failed")
            headers = [("Content-Type", "text/plain")]
            start_response("500 Internal Server Error", headers, sys.exc_info())
            return [b"metrics collection failed\n"]

    return wsgi


def start_metrics_server(
    host: str, port: int, multiproc_dir: Path, master: MasterCollector
) -> WSGIServer:
    """Serve the aggregate of all workers plus the master's own metrics, from a thread."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    registry = CollectorRegistry()
    registry.register(_MultiProcessCollector(multiproc_dir))
    registry.register(master)
    httpd = make_server(
        host, port, _logged(make_wsgi_app(registry)), ThreadingWSGIServer, _SilentHandler
    )
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd
