"""Health endpoints, answered by the serving layer before the app sees the request.

* `/healthz`: the process is alive and its event loop turns (liveness).
* `/readyz`: the app's lifespan startup has finished and the worker is not shutting down
  (readiness): 503 before and after, so a proxy or orchestrator stops sending traffic.

They are neither logged nor counted: probes every few seconds would drown the signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.middleware import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HEALTH_PATHS", "STATE", "HealthMiddleware", "ServerState"]

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


@dataclass
class ServerState:
    started: bool = False
    stopping: bool = False

    @property
    def ready(self) -> bool:
        return self.started and not self.stopping


# One per worker process: the worker class flips `stopping` when it receives SIGTERM.
STATE = ServerState()


class HealthMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState = STATE) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in HEALTH_PATHS:
            await self._answer(scope, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state

        async def watch_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                state.stopping = True
            return message

        async def watch_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                state.started = True
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:
            # An app without lifespan support has nothing to wait for: it is ready.
            if not state.started and not state.stopping:
                state.started = True
            raise

    async def _answer(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            status, body = 405, b'{"detail":"method not allowed"}'
        elif scope["path"] == "/healthz":
            status, body = 200, b'{"status":"ok"}'
        elif self.state.ready:
            status, body = 200, b'{"status":"ready"}'
        else:
            reason = b"stopping" if self.state.stopping else b"starting"
            status, body = 503, b'{"status":"' + reason + b'"}'
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if status == 405:
            headers.append((b"allow", b"GET, HEAD"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
