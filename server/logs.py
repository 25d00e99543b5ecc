"""Logging: one JSON object per line on stdout, for gunicorn, uvicorn and the app alike.

Configured once per process (`configure_logging`), as structlog's documentation suggests:
a list of processors that reads like the life of a log line. Three doors lead to it, and
every line has the same keys: `timestamp` (ISO-8601 UTC), `level`, `logger`, `event`, `pid`,
plus `request_id` and whatever else is bound in the request's context:

* structlog loggers (`get_logger`) render straight to bytes with orjson;
* stdlib loggers (gunicorn.error, uvicorn.error, the app's `logging.getLogger`) go through
  structlog's `ProcessorFormatter` with the same processors;
* the access line of each request (`log_access`, the hot path) is rendered without the
  processor chain and written with the other access lines of the same event-loop turn.

Every write(2) on fd 1 holds whole lines and stays within PIPE_BUF when it holds several,
so lines of concurrent processes sharing the container's stdout never interleave.
https://www.structlog.org/en/stable/standard-library.html
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Literal

import orjson
import structlog
from gunicorn.glogging import Logger as _GunicornLogger

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = [
    "GunicornLogger",
    "configure_logging",
    "flush_access_lines",
    "get_logger",
    "log_access",
    "log_startup_error",
]

Format = Literal["json", "console"]

_STDOUT = 1


def _write_line(data: bytes) -> None:
    """Write one whole line to stdout in a single syscall where the kernel allows."""
    view = memoryview(data + b"\n")
    while view:
        try:
            written = os.write(_STDOUT, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            written = 0
        view = view[written:]


# Access lines of one turn of the event loop are written together: one write(2) per batch
# instead of one per request. A batch never exceeds PIPE_BUF, so it stays atomic and whole
# lines from several processes sharing stdout still never interleave.
_PIPE_BUF = 4096
_batch: list[bytes] = []


def _flush_batch() -> None:
    """Write the queued lines in chunks of whole lines of at most PIPE_BUF bytes."""
    lines = _batch[:]
    _batch.clear()
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) + 1 > _PIPE_BUF:
            _write_line(b"\n".join(chunk))
            chunk, size = [], 0
        chunk.append(line)
        size += len(line) + 1  # and its newline
    if chunk:
        _write_line(b"\n".join(chunk))


def _queue_line(data: bytes) -> None:
    """Queue a line for the end of this turn of the event loop (now, without a loop)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _write_line(data)
        return
    if not _batch:
        loop.call_soon(_flush_batch)
    _batch.append(data)


def flush_access_lines() -> None:
    """Write queued access lines now (at shutdown)."""
    if _batch:
        _flush_batch()


atexit.register(flush_access_lines)


class _FdLogger:
    """structlog's final logger: takes the rendered line, writes it to fd 1."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name

    def msg(self, message: bytes | str) -> None:
        _write_line(message if isinstance(message, bytes) else message.encode())

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def _fd_logger_factory(*args: Any) -> _FdLogger:
    return _FdLogger(args[0] if args and isinstance(args[0], str) else None)


class _FdHandler(logging.Handler):
    """A stdlib handler that writes each formatted record as one line to fd 1."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.format(record).encode())
        except Exception:  # noqa: BLE001 - logging must never take the process down
            self.handleError(record)


def _add_pid(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["pid"] = _PID.value
    return event_dict


class _Pid:
    """The current pid, refreshed after fork so workers do not report the master's."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()


_PID = _Pid
os.register_at_fork(after_in_child=_Pid.refresh)


def _add_logger_name(
    logger: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """`logger` key for structlog loggers (stdlib records get it from add_logger_name)."""
    if "logger" not in event_dict:
        event_dict["logger"] = getattr(logger, "name", None)
    return event_dict


def _drop_color_message(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # uvicorn adds a copy of each message with ANSI colours for its own formatter.
    event_dict.pop("color_message", None)
    return event_dict


def _orjson_dumps(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=repr)


def _orjson_dumps_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=repr).decode()


def _shared_processors(fmt: Format) -> list[Any]:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,  # request_id and friends
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        _add_pid,
        _drop_color_message,
    ]
    if fmt == "json":
        # Exceptions become structured fields (type, value, frames), never multi-line text.
        # Locals are left out: they are large and may hold secrets.
        processors.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=30)
            )
        )
    return processors


class _NoWebSocketAccessLines(logging.Filter):
    """Drop uvicorn's (and the websockets library's) lines for each WebSocket handshake,
    open and close: server.websocket writes one access line per session instead."""

    _MESSAGES = frozenset({"connection open", "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.msg, str):
            return True
        return not (record.msg.startswith('%s - "WebSocket %s"') or record.msg in self._MESSAGES)


def configure_logging(level: str = "info", fmt: Format = "json") -> None:
    """Configure structlog and the stdlib root logger for this process (idempotent)."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        numeric_level = logging.INFO
    shared = _shared_processors(fmt)

    if fmt == "json":
        native_renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        stdlib_renderer: Any = structlog.processors.JSONRenderer(serializer=_orjson_dumps_str)
    else:
        native_renderer = stdlib_renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stdout.isatty()
        )

    structlog.configure(
        processors=[_add_logger_name, *shared, native_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_fd_logger_factory,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            *shared,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, stdlib_renderer],
    )
    handler = _FdHandler()
    handler.setFormatter(formatter)
    handler.set_name("server")

    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    # gunicorn and uvicorn attach their own handlers and stop propagation: route them to ours.
    for name in ("gunicorn.error", "uvicorn", "uvicorn.error"):
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.propagate = False
        named.setLevel(numeric_level)
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _NoWebSocketAccessLines) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(_NoWebSocketAccessLines())
    # Each request is logged once by our middleware; these would be duplicates.
    for name in ("gunicorn.access", "uvicorn.access"):
        named = logging.getLogger(name)
        named.handlers = []
        named.propagate = False
        named.disabled = True
    logging.captureWarnings(True)
    _ACCESS.fast_json = fmt == "json"
    _ACCESS.enabled = numeric_level <= logging.INFO


class _AccessMode:
    """How `log_access` renders: set by `configure_logging`."""

    fast_json = False
    enabled = True


_ACCESS = _AccessMode
_access_fallback = structlog.get_logger("server.access")
_get_contextvars = structlog.contextvars.get_contextvars
_second = -1
_second_text = ""


def _utc_timestamp() -> str:
    """ISO-8601 UTC with microseconds and Z, as TimeStamper(fmt="iso", utc=True) writes it."""
    global _second, _second_text  # noqa: PLW0603 - a one-entry cache for the hot path
    now = time.time()
    second = int(now)
    if second != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return f"{_second_text}.{int((now - second) * 1_000_000):06d}Z"


def log_access(fields: dict[str, Any], event: str = "request") -> None:
    """The access line of one request (`event` "request") or WebSocket session ("websocket"):
    the hot path renders it without the processor chain.

    Same keys as every other line (timestamp, level, logger, event, pid, plus whatever is
    bound in the request's context such as request_id), one orjson call, one write.
    """
    if not _ACCESS.enabled:
        return
    if _ACCESS.fast_json:
        record = {
            "timestamp": _utc_timestamp(),
            "level": "info",
            "logger": "server.access",
            "event": event,
            "pid": _PID.value,
            **_get_contextvars(),
            **fields,
        }
        _queue_line(orjson.dumps(record, default=repr))
    else:
        _access_fallback.info(event, **fields)


def get_logger(name: str) -> Any:
    """A structlog logger whose lines carry `logger=name`."""
    return structlog.get_logger(name)


class GunicornLogger(_GunicornLogger):
    """gunicorn's logger class, re-pointed at our handlers (`logger_class` setting)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from server.settings import get_settings

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)

    def access(self, *args: Any, **kwargs: Any) -> None:
        """Access lines come from our ASGI middleware, one per request."""


def log_startup_error(message: str, logger: str = "server") -> None:
    """Report a start-up failure as one JSON line on stdout, before logging is configured."""
    from datetime import UTC, datetime

    record = {
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "level": "critical",
        "logger": logger,
        "event": message,
        "pid": os.getpid(),
    }
    _write_line(orjson.dumps(record))
