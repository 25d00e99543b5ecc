"""The serving layer's side of a WebSocket session: request id, metrics, one access line.

The session's life in ASGI messages (https://asgi.readthedocs.io/en/latest/specs/www.html):
the app accepts (`websocket.accept`) or refuses (`websocket.close` before accepting), then
messages flow both ways until one side closes. The close code is whichever comes first:
the one the app sends, or the one the server reports in `websocket.disconnect` (the
client's code, 1006 without a close frame, 1009 for an oversized message, 1012 when the
worker stops). One access line is written when the session ends, never per message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
import structlog

from server import request_id, trace_context
from server.logs import get_logger, log_access
from server.metrics import UNMATCHED_ROUTE

if TYPE_CHECKING:
    from server.metrics import WebSocketMetrics
    from server.middleware import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REJECTED", "observe_websocket"]

# The code label of a handshake that never became a session (the app refused it).
REJECTED = "rejected"
_INTERNAL_ERROR = 1011
_error_log = get_logger("server.errors")


def _route(scope: Scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    return scope.get("root_path", "") + path if isinstance(path, str) else UNMATCHED_ROUTE


class _Session:
    """What the serving layer tracks of one session, fed by the app's ASGI messages."""

    __slots__ = (
        "accepted",
        "code",
        "metrics",
        "receive_",
        "received",
        "rid_bytes",
        "route",
        "scope",
        "send_",
        "sent",
        "status",
    )

    def __init__(
        self, metrics: WebSocketMetrics, scope: Scope, receive: Receive, send: Send, rid: bytes
    ) -> None:
        self.metrics = metrics
        self.scope = scope
        self.receive_ = receive
        self.send_ = send
        self.rid_bytes = rid
        self.accepted = False
        self.code: int | None = None  # the first close code either side used
        self.status = 101  # the handshake's answer: 101 when upgraded, else the refusal's
        self.received = self.sent = 0
        self.route = UNMATCHED_ROUTE

    async def receive(self) -> Message:
        message = await self.receive_()
        kind = message["type"]
        if kind == "websocket.receive":
            self.received += 1
            if self.received == 1:
                self.route = _route(self.scope)  # the router has set it by now
            self.metrics.message(self.route, "in")
        elif kind == "websocket.disconnect" and self.code is None:
            self.code = message.get("code", 1005)
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            self.sent += 1
            if self.sent == 1:
                self.route = _route(self.scope)
            self.metrics.message(self.route, "out")
        elif kind == "websocket.accept":
            # The client can quote the id in a report: it is in the 101 response too.
            headers = [*message.get("headers", ()), (request_id.HEADER, self.rid_bytes)]
            message["headers"] = headers
            self.accepted = True
            self.metrics.opened()
        elif kind == "websocket.close" and self.code is None:
            self.code = message.get("code", 1000)
            if not self.accepted:
                self.status = 403  # ASGI: a close before accept is an HTTP 403 refusal
        elif kind == "websocket.http.response.start" and not self.accepted:
            self.status = message["status"]  # the denial-response extension
        await self.send_(message)


async def observe_websocket(
    app: ASGIApp, metrics: WebSocketMetrics, scope: Scope, receive: Receive, send: Send
) -> None:
    started = time.perf_counter()
    rid, rid_bytes = request_id.for_scope(scope)
    # The session is a span of the trace nginx started (or the client's): its line carries
    # the trace id of nginx's line for the upgrade, as an HTTP request's does.
    incoming = next((v for k, v in scope["headers"] if k == trace_context.HEADER), None)
    span = trace_context.begin(incoming, rid)
    tokens = structlog.contextvars.bind_contextvars(
        request_id=rid, trace_id=span.trace_id, span_id=span.span_id
    )
    session = _Session(metrics, scope, receive, send, rid_bytes)
    try:
        await app(scope, session.receive, session.send)
    except Exception:  # noqa: BLE001 - log it with the request id, end the session, keep the worker
        _error_log.exception("unhandled exception", path=scope["path"], websocket=True)
        await _fail(scope, session.send, rid, session.accepted, closed=session.code is not None)
        if session.accepted and session.code is None:  # the close could not be sent
            session.code = _INTERNAL_ERROR
    finally:
        seconds = time.perf_counter() - started
        route = _route(scope)
        accepted, code = session.accepted, session.code
        label = str(code if code is not None else 1000) if accepted else REJECTED
        metrics.closed(route, label, was_open=accepted)
        client = scope.get("client")
        log_access(
            {
                "path": scope["path"],
                "route": route,
                "status": session.status,
                "close_code": code if accepted else None,
                "duration_ms": round(seconds * 1000, 3),
                "messages_in": session.received,
                "messages_out": session.sent,
                "client": client[0] if client else None,
                "http_version": scope.get("http_version"),
            },
            event="websocket",
        )
        structlog.contextvars.reset_contextvars(**tokens)


async def _fail(scope: Scope, send: Send, rid: str, accepted: bool, *, closed: bool) -> None:
    """After an app error: close an open session with 1011, answer a handshake with 500."""
    try:
        if accepted:
            if not closed:
                await send({"type": "websocket.close", "code": _INTERNAL_ERROR})
        elif "websocket.http.response" in scope.get("extensions", {}):
            body = orjson.dumps({"detail": "internal server error", "request_id": rid})
            headers = [(b"content-type", b"application/json")]
            await send({"type": "websocket.http.response.start", "status": 500, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": _INTERNAL_ERROR})
    except Exception:  # noqa: BLE001 - the connection is already gone: nothing more to tell it
        return
