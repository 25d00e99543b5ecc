"""The smallest ASGI app that answers GET /api/hello like app.main does (same bytes).

Only for `make bench`'s informational "raw ASGI" row: what uvicorn alone costs, so the
FastAPI share of the ceiling is visible. The ceiling the targets are measured against is
bare uvicorn serving the real `app.main:app`: the same endpoint, the same framework work,
minus our serving layer; that difference is what the serving layer costs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]

BODY = b'{"message":"hello","service":"example"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
NOT_FOUND = b'{"detail":"Not Found"}'


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/api/hello" and scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": NOT_FOUND})
