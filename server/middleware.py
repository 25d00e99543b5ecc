"""The per-request ASGI middleware: request id, trace context, access line, metrics, 500.

Pure ASGI (as Starlette's own middleware is written), not `BaseHTTPMiddleware`, which
costs a task and a stream per request. One class does the four jobs because each layer
of middleware costs time on every request; each job's logic lives in its own module
(`server.request_id`, `server.trace_context`, `server.metrics`, `server.logs`). WebSocket
sessions get request ids, access lines and metrics from `server.websocket`; event streams
end cleanly when the worker stops (`server.streams`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from server import request_id, trace_context
from server.logs import flush_access_lines, get_logger, log_access
from server.metrics import UNMATCHED_ROUTE, HttpMetrics, WebSocketMetrics
from server.streams import EVENT_STREAMS, is_event_stream
from server.websocket import observe_websocket

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, MutableMapping

    Scope = MutableMapping[str, Any]
    Message = MutableMapping[str, Any]
    Receive = Callable[[], Awaitable[Message]]
    Send = Callable[[Message], Awaitable[None]]
    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

    from server.otlp import SpanExport

__all__ = ["ObservabilityMiddleware", "route_template", "send_json"]

_error_log = get_logger("server.errors")
_bind = structlog.contextvars.bind_contextvars
_reset = structlog.contextvars.reset_contextvars
# Incoming headers the middleware sets itself.
_REPLACED = frozenset({request_id.HEADER, trace_context.HEADER})
_REPLACED_AND_STATE = _REPLACED | {trace_context.STATE_HEADER}


def route_template(scope: Scope) -> str:
    """The matched route's template (`/api/items/{item_id}`), never the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return scope.get("root_path", "") + path if path else "/"
    return UNMATCHED_ROUTE


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: HttpMetrics | None,
        ws_metrics: WebSocketMetrics | None = None,
        spans: SpanExport | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics or _NoMetrics()
        self.ws_metrics = ws_metrics or WebSocketMetrics()
        self.spans = spans  # OTLP export (server/otlp.py), when configured

    async def __call__(  # noqa: PLR0912, PLR0915 - one flat function: calls cost on the hot path
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await observe_websocket(self.app, self.ws_metrics, scope, receive, send)
            elif scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        incoming_id = incoming_parent = None
        for name, value in headers:
            if name == request_id.HEADER:
                incoming_id = value
            elif name == trace_context.HEADER:
                incoming_parent = value
        rid = request_id.accept_or_generate(incoming_id)
        rid_bytes = rid.encode("ascii")
        span = trace_context.begin(incoming_parent, rid)
        traceparent = span.header
        # The app reads the id it is logged under, and the trace context to pass on (its
        # span as the parent), from its request headers. A `tracestate` is kept only with
        # the `traceparent` it belongs to.
        dropped = _REPLACED if span.parent is not None else _REPLACED_AND_STATE
        scope["headers"] = [h for h in headers if h[0] not in dropped]
        scope["headers"] += ((request_id.HEADER, rid_bytes), (trace_context.HEADER, traceparent))
        tokens = _bind(request_id=rid, trace_id=span.trace_id, span_id=span.span_id)
        spans = self.spans
        exported = spans.start(span, scope) if spans is not None else None

        status = 500
        response_started = False
        stream = None  # an event stream, once its response has started
        stream_started = 0.0

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, stream, stream_started
            if stream is not None:
                await stream.send(message)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *message.get("headers", ()),
                    (request_id.HEADER, rid_bytes),
                    (trace_context.HEADER, traceparent),
                ]
                if is_event_stream(message):
                    stream = EVENT_STREAMS.opened(send)
                    stream_started = time.perf_counter()
            await send(message)

        metrics = self.metrics
        metrics.started()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the last resort: log it, answer 500, keep the worker
            # Structured, with the request id; the client never sees the traceback.
            _error_log.exception("unhandled exception", method=scope["method"], path=scope["path"])
            status = 500
            if not response_started:
                payload = {"detail": "internal server error", "request_id": rid}
                await send_json(send_with_id, 500, payload)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"]
            if stream is None:
                metrics.observe(method, route, status, seconds, span.trace_id)
            else:
                # A stream lasts as long as it has events: its latency is the wait for it
                # to begin; the access line below has its whole duration.
                EVENT_STREAMS.closed(stream)
                metrics.observe(method, route, status, stream_started - started, span.trace_id)
            if spans is not None and exported is not None:
                spans.end(exported, method, route, status)
            client = scope.get("client")
            log_access(
                {
                    "method": method,
                    "path": scope["path"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": client[0] if client else None,
                    "http_version": scope.get("http_version"),
                }
            )
            _reset(**tokens)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Write the pending metrics before the worker exits."""
        metrics = self.metrics

        async def flush_then_send(message: Message) -> None:
            if message["type"].startswith("lifespan.shutdown."):
                metrics.flush()
                self.ws_metrics.flush()
                flush_access_lines()
                if self.spans is not None:
                    self.spans.shutdown()
            await send(message)

        await self.app(scope, receive, flush_then_send)


class _NoMetrics(HttpMetrics):
    """HTTP_METRICS=off: the same calls, nothing recorded (no branch on the hot path)."""

    def __init__(self) -> None:  # no prometheus_client metrics are created
        pass

    def started(self) -> None:
        pass

    def observe(self, *args: object, **kwargs: object) -> None:
        pass

    def flush(self) -> None:
        pass


async def send_json(
    send: Send, status: int, payload: dict[str, str], headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A whole JSON response: the serving layer's own answers (500 here, 503 in
    server.reloader) have the shape of the app's errors."""
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
