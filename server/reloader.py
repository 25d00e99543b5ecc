"""Development only (RELOAD=true, which compose.dev.yml sets): new workers on a code change.

gunicorn's own `--reload` restarts a worker from a thread inside it, which the uvicorn
worker never notices (https://github.com/benoitc/gunicorn/issues/2339). Here a thread of
the master watches the app's package and the serving layer and sends the master SIGHUP:
the same graceful reload as `make reload`, so new workers import the new code while the
old ones finish their requests and nothing is dropped. It compares mtimes and sizes
twice a second instead of using inotify, whose events do not cross every bind mount
(Docker Desktop, WSL2); the trees are small. A module the master itself has loaded
(settings, logging, metrics) is not re-imported by a reload: that change is logged with
what to do instead.

An app that fails to import (a typo mid-edit) would make gunicorn halt; with RELOAD on the
workers serve `failed_app` instead, a 503 naming the error, until the next save fixes it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from server import request_id
from server.logs import get_logger
from server.middleware import send_json

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from server.middleware import ASGIApp, Receive, Scope, Send

__all__ = ["failed_app", "source_paths", "start_watching"]

POLL_S = 0.5  # how often the trees are scanned
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".swx", "~", ".tmp")

_log = get_logger("server.reloader")


def source_paths(app_module: str) -> list[Path]:
    """The app's top-level package (found, not imported: the master runs no app code)
    and the serving layer's."""
    paths = [Path(__file__).resolve().parent]
    top = app_module.split(":", 1)[0].split(".", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is not None and spec.submodule_search_locations:
        paths += [Path(p).resolve() for p in spec.submodule_search_locations]
    elif spec is not None and spec.origin:
        paths.append(Path(spec.origin).resolve())
    return sorted(set(paths))


def snapshot(paths: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """Each source file under `paths` with its mtime and size (a truncate and the write
    after it can share an mtime tick; the size tells them apart). Caches, hidden folders,
    bytecode and editors' swap files are left out."""
    found: dict[str, tuple[int, int]] = {}
    for root in paths:
        walk = os.walk(root) if root.is_dir() else [(str(root.parent), [], [root.name])]
        for folder, dirs, files in walk:
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            for name in files:
                if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
                    continue
                path = os.path.join(folder, name)
                try:
                    stat = os.stat(path)
                except OSError:  # deleted between the listing and the stat
                    continue
                found[path] = (stat.st_mtime_ns, stat.st_size)
    return found


def _loaded_by_master(changed: Iterable[str], reread: Path) -> list[str]:
    files = (getattr(module, "__file__", None) for module in tuple(sys.modules.values()))
    loaded = {Path(file).resolve() for file in files if file}
    loaded.discard(reread.resolve())
    return sorted(path for path in changed if Path(path).resolve() in loaded)


def _watch(
    paths: list[Path], reread: Path, stop: threading.Event, reload: Callable[[], None]
) -> None:
    seen = snapshot(paths)
    while not stop.wait(POLL_S):
        now = snapshot(paths)
        if now == seen:
            continue
        while not stop.wait(POLL_S / 5):  # until the save is complete (several files, an
            settled = snapshot(paths)  # editor's write-then-rename): one reload for it
            if settled == now:
                break
            now = settled
        changed = sorted(k for k in seen.keys() | now.keys() if seen.get(k) != now.get(k))
        seen = now
        _log.info("code changed: reloading the workers", files=changed)
        stale = _loaded_by_master(changed, reread)
        if stale:
            _log.warning(
                "the gunicorn master has these loaded; a reload does not apply them: "
                "restart the app container",
                files=stale,
            )
        reload()


def start_watching(app_module: str, reread: Path) -> threading.Event:
    """Watch the sources from a daemon thread of the master; set the event to stop.

    `reread` is the gunicorn config file, which every reload reads afresh."""
    paths = source_paths(app_module)
    stop = threading.Event()
    pid = os.getpid()
    thread = threading.Thread(
        target=_watch,
        args=(paths, reread, stop, lambda: os.kill(pid, signal.SIGHUP)),
        name="reloader",
        daemon=True,
    )
    thread.start()
    _log.warning(
        "RELOAD is on: workers reload when the code changes (development only)",
        paths=[str(p) for p in paths],
    )
    return stop


def failed_app(error: BaseException) -> ASGIApp:
    """An ASGI app standing in for one that failed to import: every request gets a 503
    that names the error (the log has the traceback). It has no lifespan, so /readyz says
    503 too, while /healthz keeps the container alive until a reload brings the fix."""
    summary = f"{type(error).__name__}: {error}"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: none; a WebSocket is refused
            return
        rid = dict(scope.get("headers") or ()).get(request_id.HEADER, b"").decode("latin-1")
        payload = {"detail": "the application failed to load", "error": summary, "request_id": rid}
        await send_json(send, 503, payload, headers=((b"retry-after", b"1"),))

    return app
