"""Gunicorn configuration: read the settings, derive the rest, assign gunicorn's names.

Run as `gunicorn -c server/gunicorn_conf.py`. Every value comes from `server.settings`
(environment variables, validated); an invalid one stops start-up with one line naming it.
The effective configuration is logged once, as one JSON line, when the master starts.
https://docs.gunicorn.org/en/stable/settings.html
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from server.logs import get_logger, log_startup_error
from server.settings import EX_CONFIG, SettingsError, get_settings

try:
    _settings = get_settings()
except SettingsError as _error:
    log_startup_error(str(_error), logger="server.settings")
    sys.exit(EX_CONFIG)

# prometheus_client picks its multiprocess value class when first imported: set the
# directory before anything imports it.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_settings.prometheus_multiproc_dir)

from server import metrics, reloader
from server.cpu import effective_cpus, worker_count
from server.health import STATE

# --- server socket ---------------------------------------------------------------------
bind = [f"{_settings.host}:{_settings.port}"]
backlog = _settings.backlog  # pending connections the kernel queues (default 2048)

# --- worker processes ------------------------------------------------------------------
wsgi_app = "server.asgi:app"  # the user's APP_MODULE wrapped in the serving layer
worker_class = "server.workers.UvicornWorker"
workers = worker_count(_settings.web_concurrency)
timeout = _settings.worker_timeout  # heartbeat deadline; default 30
graceful_timeout = _settings.graceful_timeout  # after SIGTERM/HUP before SIGKILL; default 30
keepalive = _settings.keepalive_timeout  # idle keep-alive; > nginx upstream keepalive_timeout
max_requests = _settings.max_requests  # recycle workers to bound slow leaks; default 0 (off)
max_requests_jitter = _settings.max_requests_jitter  # so workers do not recycle in lockstep
worker_tmp_dir = str(_settings.worker_tmp_dir)  # heartbeat files on a tmpfs, not overlayfs
forwarded_allow_ips = _settings.forwarded_allow_ips  # whose X-Forwarded-* to trust
preload_app = False  # each worker imports the app itself: reload picks up new code
reload = False  # gunicorn's own misses uvicorn workers; RELOAD uses server.reloader instead

# --- logging ---------------------------------------------------------------------------
logger_class = "server.logs.GunicornLogger"
loglevel = _settings.log_level
errorlog = "-"
accesslog = None  # one access line per request comes from server.middleware
capture_output = False

# --- process naming and control ----------------------------------------------------------
proc_name = "asgi-server"
control_socket_disable = True  # no management socket in a read-only container


# --- server hooks --------------------------------------------------------------------------
_log = get_logger("server.gunicorn")


def on_starting(server: Any) -> None:
    """Master, before anything else: a clean metrics directory, the effective config."""
    metrics.prepare_multiproc_dir(_settings.prometheus_multiproc_dir)
    _log.info(
        "effective configuration",
        app_module=_settings.app_module,
        app_version=_settings.app_version,
        bind=bind,
        workers=workers,
        cpus=round(effective_cpus(), 2),
        worker_class=worker_class,
        timeout=timeout,
        graceful_timeout=graceful_timeout,
        shutdown_delay=_settings.shutdown_delay,
        shutdown_timeout=_settings.shutdown_timeout,
        keepalive=keepalive,
        max_requests=max_requests,
        max_requests_jitter=max_requests_jitter,
        worker_tmp_dir=worker_tmp_dir,
        forwarded_allow_ips=forwarded_allow_ips,
        ws_ping_interval=_settings.ws_ping_interval,
        ws_ping_timeout=_settings.ws_ping_timeout,
        ws_max_message_size=_settings.ws_max_message_size,
        log_level=loglevel,
        log_format=_settings.log_format,
        reload=_settings.reload,
        metrics=f"{_settings.metrics_host}:{_settings.metrics_port}",
        prometheus_multiproc_dir=str(_settings.prometheus_multiproc_dir),
    )


def _drain_before_stop(server: Any) -> None:
    """Master: on SIGTERM, answer /readyz 503 in every worker for SHUTDOWN_DELAY seconds
    while they keep serving, then stop as gunicorn does (graceful, GRACEFUL_TIMEOUT).

    Gunicorn has no hook before a stop: its main loop dispatches each queued signal to
    the arbiter's `handle_<name>` method, so this wraps `handle_term` on the instance.
    The first SIGTERM starts the drain and a timer; the timer's SIGTERM (or a second one
    from the operator, to skip the rest) runs gunicorn's own handler. SIGINT and SIGQUIT
    stay immediate, SIGHUP reloads do not drain.
    """
    stop = server.handle_term
    delay = _settings.shutdown_delay

    def handle_term() -> None:
        if delay == 0 or STATE.draining:
            _log.info("stopping", graceful_timeout=graceful_timeout)
            stop()  # raises StopIteration: gunicorn's graceful stop
            return
        STATE.draining.set()
        _log.info("draining before stop: /readyz answers 503", shutdown_delay=delay)
        timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()

    server.handle_term = handle_term


def when_ready(server: Any) -> None:
    """Master, listening: drain before a stop; serve metrics from a thread of the master."""
    if metrics.MASTER.httpd is not None:  # already serving (a reload re-reads this file)
        return
    _drain_before_stop(server)
    collector = metrics.MasterCollector(lambda: list(server.WORKERS), _settings.app_version)
    metrics.MASTER.collector = collector
    metrics.MASTER.httpd = metrics.start_metrics_server(
        _settings.metrics_host,
        _settings.metrics_port,
        _settings.prometheus_multiproc_dir,
        collector,
    )
    _log.info("metrics listening", address=f"{_settings.metrics_host}:{_settings.metrics_port}")
    if _settings.reload:  # development (compose.dev.yml): SIGHUP to ourselves on a change
        reloader.start_watching(_settings.app_module, reread=Path(__file__))


def post_fork(server: Any, worker: Any) -> None:
    """Worker, just forked: it must not hold the master's metrics socket open."""
    if metrics.MASTER.httpd is not None:
        metrics.MASTER.httpd.socket.close()


def child_exit(server: Any, worker: Any) -> None:
    """Master, a worker has exited: drop its live gauges; count it if we keep running."""
    metrics.mark_worker_dead(worker.pid)
    if server.LISTENERS and metrics.MASTER.collector is not None:  # [] once stopping
        metrics.MASTER.collector.worker_restarted()


def worker_abort(worker: Any) -> None:
    """Worker, on SIGABRT from the master after a missed heartbeat (timeout)."""
    _log.error("worker timed out", worker_pid=worker.pid, timeout=timeout)
