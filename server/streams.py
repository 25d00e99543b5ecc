"""Event streams (`text/event-stream` responses) that end cleanly when the worker stops.

uvicorn's graceful shutdown waits for in-flight responses, and cancels what is still
running after SHUTDOWN_TIMEOUT: a stream that outlives it is cut mid-chunk, and the client
sees a broken response instead of the end of the stream. An event stream may end after any
event (the client reconnects, with `Last-Event-ID`), so at shutdown each open one is ended
right away: between two of the app's writes, the terminating chunk is sent. The app then
reads `http.disconnect` from uvicorn, as if the client had gone, and stops producing.
Other streamed bodies are left alone: ending a download early would truncate it.
https://html.spec.whatwg.org/multipage/server-sent-events.html#server-sent-events-intro
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.middleware import Message, Send

__all__ = ["EVENT_STREAMS", "EventStream", "EventStreams", "is_event_stream"]

_CONTENT_TYPE = b"content-type"
_EVENT_STREAM = b"text/event-stream"
# Without it, nginx buffers the response and the client sees every event at the end.
# https://nginx.org/en/docs/http/ngx_http_proxy_module.html#proxy_buffering
_NO_BUFFERING = (b"x-accel-buffering", b"no")


def is_event_stream(message: Message) -> bool:
    """Whether an `http.response.start` opens an event stream; if so, make sure a proxy
    passes it on unbuffered (unless the app chose otherwise)."""
    headers: list[tuple[bytes, bytes]] = message.get("headers") or []
    stream = False
    unbuffered_set = False
    for name, value in headers:
        if name.lower() == _CONTENT_TYPE and value.startswith(_EVENT_STREAM):
            stream = True
        elif name.lower() == _NO_BUFFERING[0]:
            unbuffered_set = True
    if stream and not unbuffered_set:
        message["headers"] = [*headers, _NO_BUFFERING]
    return stream


class EventStream:
    """One open event stream: the app's writes, and the ending at shutdown, in turn."""

    __slots__ = ("_ended", "_lock", "_send")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._lock = asyncio.Lock()
        self._ended = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            if self._ended:
                return  # ended at shutdown: the app learns it from http.disconnect
            if not message.get("more_body", False):
                self._ended = True
            await self._send(message)

    async def end(self) -> None:
        async with self._lock:
            if not self._ended:
                self._ended = True
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class EventStreams:
    """The open event streams of this worker."""

    # A stream whose client does not take the last chunk within this long is left to
    # uvicorn's graceful shutdown (and its SHUTDOWN_TIMEOUT).
    END_TIMEOUT = 1.0

    def __init__(self) -> None:
        self._open: set[EventStream] = set()

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, send: Send) -> EventStream:
        stream = EventStream(send)
        self._open.add(stream)
        return stream

    def closed(self, stream: EventStream) -> None:
        self._open.discard(stream)

    async def end_all(self) -> int:
        """End every open stream after its current event; how many there were."""
        streams = list(self._open)
        if streams:
            tasks = [asyncio.ensure_future(stream.end()) for stream in streams]
            await asyncio.wait(tasks, timeout=self.END_TIMEOUT)
        return len(streams)


# One per worker process: the middleware registers streams, the worker ends them on stop.
EVENT_STREAMS = EventStreams()
