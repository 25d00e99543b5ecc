"""An example FastAPI service that exercises the stack: reads, writes with validation,
path parameters and 404s, a bounded slow call, an endpoint that fails, lifespan events,
a WebSocket echo and a server-sent event stream.

It knows nothing about gunicorn, nginx or Prometheus: the serving layer (server/) adds
health checks, request ids, access logs and metrics around it. Its logs go through the
standard `logging` module and come out as the same JSON lines as everything else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import (
    FastAPI,
    Header,
    HTTPException,
    Query,
    Request,
    WebSocket,
    WebSocketDisconnect,
    status,
)
from fastapi.responses import FileResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from app.catalog import CATALOG, Item

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

log = logging.getLogger("app")

STATIC_DIR = Path(__file__).parent / "static"
MAX_SLOW_SECONDS = 30.0
MAX_EVENTS = 1000
MAX_EVENT_INTERVAL = 10.0


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    log.info("app starting", extra={"items": len(CATALOG)})
    yield
    log.info("app stopped")


app = FastAPI(
    title="Example service",
    version="1.0.0",
    summary="An example JSON API served by the ASGI production stack.",
    lifespan=lifespan,
)


class OrderIn(BaseModel):
    item_id: int = Field(ge=1, description="An item of the catalog.")
    quantity: int = Field(ge=1, le=100)
    note: str | None = Field(default=None, max_length=200)


class Order(BaseModel):
    id: int
    item: Item
    quantity: int
    total: Decimal
    note: str | None


_order_ids = itertools.count(1)


@app.get("/api/hello")
async def hello() -> dict[str, str]:
    """A small JSON answer: the endpoint `make bench` measures."""
    return {"message": "hello", "service": "example"}


@app.get("/api/items")
async def list_items() -> list[Item]:
    return list(CATALOG.values())


@app.get("/api/items/{item_id}", responses={404: {"description": "No such item"}})
async def get_item(item_id: int) -> Item:
    item = CATALOG.get(item_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
    return item


@app.post(
    "/api/orders",
    status_code=status.HTTP_201_CREATED,
    responses={404: {"description": "No such item"}},
)
async def create_order(order: OrderIn) -> Order:
    item = CATALOG.get(order.item_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
    created = Order(
        id=next(_order_ids),
        item=item,
        quantity=order.quantity,
        total=item.price * order.quantity,
        note=order.note,
    )
    log.info("order created", extra={"order_id": created.id, "item_id": item.id})
    return created


@app.get("/api/slow")
async def slow(
    seconds: Annotated[float, Query(ge=0, le=MAX_SLOW_SECONDS)] = 1.0,
) -> dict[str, float]:
    """Wait a bounded time without blocking the worker: for shutdown and timeout tests."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@app.get("/api/events", response_class=EventSourceResponse)
async def events(
    count: Annotated[int, Query(ge=1, le=MAX_EVENTS, description="Events to send.")] = 10,
    interval: Annotated[
        float, Query(ge=0, le=MAX_EVENT_INTERVAL, description="Seconds between events.")
    ] = 1.0,
    last_event_id: Annotated[
        int | None, Header(ge=0, description="A reconnecting client resumes after this id.")
    ] = None,
) -> AsyncIterable[ServerSentEvent]:
    """Server-sent events: `count` ticks, `interval` seconds apart, the first at once. A
    client that reconnects (EventSource does, after a server restart) gets the rest."""
    first = 0 if last_event_id is None else last_event_id + 1
    for number in range(first, count):
        if number > first:
            await asyncio.sleep(interval)
        yield ServerSentEvent(data={"tick": number, "of": count}, event="tick", id=str(number))


@app.websocket("/ws/echo")
async def echo(websocket: WebSocket) -> None:
    """Send every text or binary message back as it came. The serving layer bounds the size
    of a message (WS_MAX_MESSAGE_SIZE: larger ones close the session with 1009)."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return


@app.get("/api/boom")
async def boom() -> None:
    """Fail on purpose: the client gets a clean 500, the log gets the traceback."""
    raise RuntimeError("boom: this endpoint always fails")


@app.exception_handler(Exception)
async def unhandled(request: Request, _: Exception) -> JSONResponse:
    # The serving layer logs the exception with its traceback; the client only gets the id.
    return JSONResponse(
        {"detail": "internal server error", "request_id": request.headers.get("x-request-id")},
        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
    )


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


# In production nginx serves these files itself and never forwards such requests; mounting
# them here lets `make run` show the same page without nginx.
app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
