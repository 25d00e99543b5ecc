"""The serving layer's WebSocket session and event-stream handling, driven by ASGI messages
in-process (the integration tests run the same through real gunicorn and uvicorn)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.asgi import wrap
from server.metrics import HttpMetrics, WebSocketMetrics
from server.streams import EVENT_STREAMS, is_event_stream

Message = dict[str, Any]


class Peer:
    """The server side of one connection: what the app receives, what it sent."""

    def __init__(self, *incoming: Message) -> None:
        self.incoming = list(incoming)
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        if self.incoming:
            return self.incoming.pop(0)
        await asyncio.Event().wait()  # nothing more: wait forever (until cancelled)
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)


def ws_scope(path: str = "/ws/x", extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "websocket",
        "path": path,
        "headers": [(b"x-request-id", b"given-id")],
        "client": ("10.0.0.9", 5555),
        "extensions": extensions if extensions is not None else {},
    }


def sample(metrics: WebSocketMetrics, name: str, **labels: str) -> float:
    metrics.flush()
    assert metrics.registry is not None
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.anyio
async def test_session_counts_messages_and_its_close_code() -> None:
    async def echo_twice(scope: Any, receive: Any, send: Any) -> None:
        assert scope["headers"] == [(b"x-request-id", b"given-id")]
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        for _ in range(2):
            message = await receive()
            await send({"type": "websocket.send", "text": message["text"]})
        assert (await receive())["type"] == "websocket.disconnect"

    metrics = WebSocketMetrics()
    peer = Peer(
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "a"},
        {"type": "websocket.receive", "text": "b"},
        {"type": "websocket.disconnect", "code": 4001},
    )
    await wrap(echo_twice, HttpMetrics(), metrics)(ws_scope(), peer.receive, peer.send)

    accept = peer.sent[0]
    assert (b"x-request-id", b"given-id") in accept["headers"]
    assert sample(metrics, "websocket_sessions_total", route="<unmatched>", code="4001") == 1
    assert sample(metrics, "websocket_messages_total", route="<unmatched>", direction="in") == 2
    assert sample(metrics, "websocket_messages_total", route="<unmatched>", direction="out") == 2
    assert sample(metrics, "websocket_connections_open") == 0


@pytest.mark.anyio
async def test_app_error_after_accept_closes_with_1011_and_keeps_the_worker() -> None:
    async def fails(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})
        raise RuntimeError("boom")

    metrics = WebSocketMetrics()
    peer = Peer({"type": "websocket.connect"})
    await wrap(fails, HttpMetrics(), metrics)(ws_scope(), peer.receive, peer.send)
    assert peer.sent[-1] == {"type": "websocket.close", "code": 1011}
    assert sample(metrics, "websocket_sessions_total", route="<unmatched>", code="1011") == 1


@pytest.mark.anyio
async def test_app_error_before_accept_answers_500_where_the_server_can() -> None:
    async def fails(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    metrics = WebSocketMetrics()
    peer = Peer({"type": "websocket.connect"})
    scope = ws_scope(extensions={"websocket.http.response": {}})
    await wrap(fails, HttpMetrics(), metrics)(scope, peer.receive, peer.send)
    assert peer.sent[0]["type"] == "websocket.http.response.start"
    assert peer.sent[0]["status"] == 500
    assert b"given-id" in peer.sent[1]["body"]
    assert sample(metrics, "websocket_sessions_total", route="<unmatched>", code="rejected") == 1


@pytest.mark.anyio
async def test_refused_handshake_is_counted_as_rejected_not_open() -> None:
    async def refuses(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "websocket.close", "code": 1008})

    metrics = WebSocketMetrics()
    peer = Peer({"type": "websocket.connect"})
    await wrap(refuses, HttpMetrics(), metrics)(ws_scope(), peer.receive, peer.send)
    assert sample(metrics, "websocket_sessions_total", route="<unmatched>", code="rejected") == 1
    assert sample(metrics, "websocket_connections_open") == 0


def test_event_streams_are_marked_unbuffered_unless_the_app_chose() -> None:
    start = {"type": "http.response.start", "headers": [(b"content-type", b"text/event-stream")]}
    assert is_event_stream(start)
    assert (b"x-accel-buffering", b"no") in start["headers"]
    chosen = {
        "type": "http.response.start",
        "headers": [(b"content-type", b"text/event-stream"), (b"x-accel-buffering", b"yes")],
    }
    assert is_event_stream(chosen)
    assert (b"x-accel-buffering", b"no") not in chosen["headers"]
    plain = {"type": "http.response.start", "headers": [(b"content-type", b"text/plain")]}
    assert not is_event_stream(plain)
    assert plain["headers"] == [(b"content-type", b"text/plain")]


@pytest.mark.anyio
@pytest.mark.parametrize("app_writes_after_end", [True, False])
async def test_open_event_streams_end_with_a_final_chunk(app_writes_after_end: bool) -> None:
    ended = asyncio.Event()

    async def stream(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await ended.wait()
        if app_writes_after_end:  # swallowed: the response is already complete
            await send({"type": "http.response.body", "body": b"data: 2\n\n", "more_body": True})

    peer = Peer({"type": "http.request", "body": b"", "more_body": False})
    scope = {"type": "http", "method": "GET", "path": "/events", "headers": [], "client": None}
    task = asyncio.create_task(wrap(stream, HttpMetrics())(scope, peer.receive, peer.send))
    while not len(EVENT_STREAMS):
        await asyncio.sleep(0)
    assert await EVENT_STREAMS.end_all() == 1
    ended.set()
    await task
    bodies = [m for m in peer.sent if m["type"] == "http.response.body"]
    assert bodies[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert [m["body"] for m in bodies] == [b"data: 1\n\n", b""]
    assert len(EVENT_STREAMS) == 0
