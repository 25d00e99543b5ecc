"""The gunicorn worker class: uvicorn-worker's, given what the stock class leaves out.

The stock `uvicorn_worker.UvicornWorker` passes gunicorn's keep-alive, timeout and
max_requests to uvicorn, but not the graceful-shutdown timeout, the proxy headers with
their trusted addresses, or an explicit choice of uvloop and httptools; and it leaves
uvicorn's own access log on. This class sets those from `server.settings`, and flips the
worker's readiness to "stopping" as soon as a shutdown signal arrives.
https://github.com/Kludex/uvicorn-worker
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any, ClassVar

from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker as _StockUvicornWorker

from server.health import STATE
from server.logs import get_logger
from server.settings import get_settings
from server.streams import EVENT_STREAMS

if TYPE_CHECKING:
    import socket
    from types import FrameType

__all__ = ["UvicornWorker"]


class _HttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose graceful shutdown does not close an idle
    keep-alive connection at once. nginx keeps idle connections to the app and may send
    a request on one at the very moment the worker closes it (a reload, `make reload`, a
    stop): the request is lost, and nginx answers a POST 502 (it retries only idempotent
    ones). Instead, for IDLE_GRACE seconds a request that comes is served with
    `Connection: close` (nginx then opens a new connection, to a live worker); after
    that the connection is closed if still idle. nginx reuses its most recent idle
    connection first, so the ones still idle then are the ones it is least likely to pick.
    """

    IDLE_GRACE = 1.0
    _shutting_down = False

    def shutdown(self) -> None:
        self._shutting_down = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(self.IDLE_GRACE, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False  # this one answered, then closed


class _Server(Server):
    """uvicorn's server, marking the worker not ready the moment it is told to stop,
    letting just-accepted connections deliver their request before idle ones are closed,
    and ending event streams cleanly. uvicorn itself then closes each open WebSocket with
    1012 (service restart), which tells clients to reconnect at once.
    """

    # uvicorn's shutdown closes every connection without a request in progress at once,
    # including one accepted a moment ago whose request bytes are still in the socket
    # buffer: that client gets a reset for a request it sent correctly. Stop accepting
    # first and give such connections this long to be read.
    ACCEPTED_GRACE = 0.3

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        STATE.stopping = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        await asyncio.sleep(self.ACCEPTED_GRACE)
        streams = await EVENT_STREAMS.end_all()
        if streams:
            get_logger("server.workers").info("event streams ended", streams=streams)
        await super().shutdown(sockets=sockets)


class UvicornWorker(_StockUvicornWorker):
    # Fail loudly if the fast implementations are missing rather than fall back silently.
    # WebSockets: the `websockets` library's Sans-I/O protocol (uvicorn's "auto" picks the
    # legacy one, deprecated upstream).
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": _HttpToolsProtocol,  # httptools, idle keep-alive closed gracefully
        "ws": "websockets-sansio",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        # Logging needs nothing here: the stock class points uvicorn's loggers at gunicorn's
        # handlers, which server.logs.GunicornLogger already replaced with ours in the
        # master, and the worker inherits them (uvicorn.access stays disabled).
        config = self.config
        config.timeout_graceful_shutdown = settings.shutdown_timeout
        config.timeout_keep_alive = settings.keepalive_timeout
        config.proxy_headers = True
        config.forwarded_allow_ips = settings.forwarded_allow_ips
        config.access_log = False  # our middleware logs each request once
        config.server_header = False  # nginx decides what the client sees
        config.ws_ping_interval = settings.ws_ping_interval
        config.ws_ping_timeout = settings.ws_ping_timeout
        config.ws_max_size = settings.ws_max_message_size

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = _Server(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
