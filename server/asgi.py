"""The ASGI callable gunicorn's workers serve: the user's app inside the serving layer.

`APP_MODULE` names the app ("module:attribute"); the serving layer wraps it, so the app
itself needs to know nothing about health checks, request ids, logs or metrics:

    HealthMiddleware -> ObservabilityMiddleware -> the app
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from uvicorn.importer import ImportFromStringError, import_from_string

from server.health import STATE, HealthMiddleware
from server.logs import get_logger
from server.metrics import HttpMetrics, WebSocketMetrics
from server.middleware import ObservabilityMiddleware
from server.reloader import failed_app
from server.settings import Settings, get_settings

if TYPE_CHECKING:
    from server.middleware import ASGIApp
    from server.otlp import SpanExport

__all__ = ["app", "wrap"]


def wrap(
    user_app: ASGIApp,
    metrics: HttpMetrics | None = None,
    ws_metrics: WebSocketMetrics | None = None,
    spans: SpanExport | None = None,
) -> ASGIApp:
    """Put the serving layer's middleware around an ASGI app (metrics None: no HTTP
    metrics; spans None: no span export)."""
    observed = ObservabilityMiddleware(user_app, metrics, ws_metrics, spans)
    return HealthMiddleware(observed, STATE)


APP_LOAD_ERROR = 4  # gunicorn's Arbiter.APP_LOAD_ERROR: the master halts instead of respawning


def create_app(settings: Settings) -> ASGIApp:
    try:
        user_app: ASGIApp = import_from_string(settings.app_module)
    except Exception as error:
        if settings.reload:  # development: keep serving until a save fixes it
            get_logger("server.asgi").exception(
                "cannot load the application; answering 503 until the next change",
                app_module=settings.app_module,
            )
            return wrap(failed_app(error))
        if not isinstance(error, ImportFromStringError):
            raise
        get_logger("server.asgi").critical(
            "cannot load the application", app_module=settings.app_module, error=str(error)
        )
        sys.exit(APP_LOAD_ERROR)
    spans = None
    if settings.otel_exporter_otlp_endpoint:  # else OpenTelemetry is never imported
        from server.otlp import SpanExport

        spans = SpanExport(settings.app_module, settings.app_version)
    return wrap(user_app, HttpMetrics() if settings.http_metrics == "on" else None, spans=spans)


app = create_app(get_settings())
