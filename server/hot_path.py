"""The functions one request passes through, by layer and by concern: for profilers.

`make bench --profile` attributes a worker's CPU samples to these. They are function
objects, not names: renaming or removing one breaks this import, so a profile can never
silently attribute nothing to a concern that moved. Keep it in step with server/asgi.py
(the order of the layers) and with what ObservabilityMiddleware calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from server import logs, metrics, middleware, request_id, trace_context
from server.health import HealthMiddleware

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["CONCERNS", "LAYERS"]

# Outermost first, as the worker nests them: uvicorn's proxy headers (the worker class
# turns them on), then server/asgi.py's wrap(). The app (APP_MODULE) comes after these.
LAYERS: tuple[tuple[str, Callable[..., object]], ...] = (
    ("uvicorn ProxyHeadersMiddleware (X-Forwarded-*)", ProxyHeadersMiddleware.__call__),
    ("server.health.HealthMiddleware", HealthMiddleware.__call__),
    ("server.middleware.ObservabilityMiddleware", middleware.ObservabilityMiddleware.__call__),
)

# Inside ObservabilityMiddleware, by concern: each entry's functions, any of which on the
# stack counts the sample for it.
CONCERNS: tuple[tuple[str, tuple[Callable[..., object], ...]], ...] = (
    ("access line: log_access (render + queue)", (logs.log_access,)),
    ("  of which the write(2) of a batch", (logs._write_line,)),
    (
        "metrics: HttpMetrics.started + observe",
        (metrics.HttpMetrics.started, metrics.HttpMetrics.observe),
    ),
    ("metrics: HttpMetrics.flush (mmap files)", (metrics.HttpMetrics.flush,)),
    ("request id: accept_or_generate", (request_id.accept_or_generate,)),
    ("trace context: begin (parse traceparent, new span id)", (trace_context.begin,)),
    (
        "structlog bind/reset_contextvars",
        (structlog.contextvars.bind_contextvars, structlog.contextvars.reset_contextvars),
    ),
    ("route_template", (middleware.route_template,)),
)
