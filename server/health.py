"""Health endpoints, answered by the serving layer before the app sees the request.

* `/healthz`: the process is alive and its event loop turns (liveness).
* `/readyz`: the app's lifespan startup has finished and the worker is not shutting down
  (readiness): 503 before and after, so a proxy or orchestrator stops sending traffic.
  Also 503 while the gunicorn master drains before a stop (SHUTDOWN_DELAY): every worker
  still serves, but whoever routes by readiness has time to take this instance out first.

They are neither logged nor counted: probes every few seconds would drown the signal.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.middleware import ASGIApp, Message, Receive, Scope, Send

__all__ = ["HEALTH_PATHS", "STATE", "HealthMiddleware", "ServerState", "SharedFlag"]

HEALTH_PATHS = frozenset({"/healthz", "/readyz"})


class SharedFlag:
    """One byte of anonymous shared memory: set in the gunicorn master, seen at once by
    every worker forked from it (before or after), with no signal, file or lock."""

    def __init__(self) -> None:
        self._memory = mmap.mmap(-1, 1)  # MAP_SHARED | MAP_ANONYMOUS: survives fork

    def set(self) -> None:
        self._memory[0] = 1

    def clear(self) -> None:
        self._memory[0] = 0

    def __bool__(self) -> bool:
        return self._memory[0] == 1


@dataclass
class ServerState:
    started: bool = False
    stopping: bool = False  # this worker got its shutdown signal
    draining: SharedFlag = field(default_factory=SharedFlag)  # the master is about to stop

    @property
    def ready(self) -> bool:
        return self.started and not self.stopping and not self.draining

    @property
    def reason(self) -> str:
        if self.stopping:
            return "stopping"
        return "draining" if self.draining else "starting"


# One per process, created in the gunicorn master when it loads the worker class, so the
# `draining` memory is shared with every worker; each worker flips its own `stopping`.
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
            status, body = 503, b'{"status":"' + self.state.reason.encode() + b'"}'
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
