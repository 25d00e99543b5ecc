"""WebSockets and event streams through a real gunicorn master and real uvicorn workers.

The client is the `websockets` library: it speaks the protocol, so a close frame the server
never sent shows up as 1006 and a malformed one as a protocol error.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import TYPE_CHECKING

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.settings import Settings
from tests.integration.conftest import start_server
from tests.integration.test_serving import _wait_for
from tests.promtext import total

if TYPE_CHECKING:
    from pathlib import Path

    from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

MAX_MESSAGE = Settings.model_fields["ws_max_message_size"].default


def _ws_url(server: Server, path: str = "/ws/echo") -> str:
    return server.url.replace("http://", "ws://") + path


def _lines(server: Server, event: str, request_id: str | None = None) -> list[dict[str, object]]:
    return [
        r
        for r in server.records()
        if r.get("event") == event
        and r.get("logger") == "server.access"
        and (request_id is None or r.get("request_id") == request_id)
    ]


def test_echo_round_trip_with_request_id_and_one_access_line(server: Server) -> None:
    rid = "ws-" + secrets.token_hex(8)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {"X-Request-ID": rid, "traceparent": f"00-{trace_id}-{parent_id}-01"}

    async def session() -> tuple[str | None, list[str | bytes]]:
        async with connect(_ws_url(server), additional_headers=headers) as ws:
            answers: list[str | bytes] = []
            for message in ("hello", b"\x00\xffbinary", "é" * 100):
                await ws.send(message)
                answers.append(await ws.recv())
            assert ws.response is not None
            return ws.response.headers.get("x-request-id"), answers

    returned_id, answers = asyncio.run(session())
    assert returned_id == rid
    assert answers == ["hello", b"\x00\xffbinary", "é" * 100]

    lines = _wait_for(lambda: _lines(server, "websocket", rid))
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["route"] == "/ws/echo"
    assert line["status"] == 101
    assert line["close_code"] == 1000  # the client closed normally
    assert line["messages_in"] == 3
    assert line["messages_out"] == 3
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] > 0
    # The session continues the caller's trace with a span of its own, as a request does.
    assert line["trace_id"] == trace_id
    assert len(str(line["span_id"])) == 16
    assert line["span_id"] != parent_id
    # No per-handshake lines from uvicorn or the websockets library besides ours.
    chatter = [
        r
        for r in server.records()
        if r.get("request_id") == rid and r.get("logger") != "server.access"
    ]
    assert chatter == []


def test_oversized_message_is_refused_with_1009(server: Server) -> None:
    async def session() -> tuple[int | None, str]:
        async with connect(_ws_url(server), max_size=None) as ws:
            await ws.send("fits")
            assert await ws.recv() == "fits"
            await ws.send(b"x" * (MAX_MESSAGE + 1))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            rcvd = closed.value.rcvd
            return (rcvd.code if rcvd else None), ws.response.headers["x-request-id"]

    code, rid = asyncio.run(session())
    assert code == 1009
    line = _wait_for(lambda: _lines(server, "websocket", rid))[0]
    assert line["close_code"] == 1009
    assert line["messages_in"] == 1  # the oversized one never reached the app
    # The worker is unharmed.
    assert httpx.get(f"{server.url}/api/hello", timeout=10).status_code == 200


def test_metrics_count_open_sessions_messages_and_close_codes(server: Server) -> None:
    before = server.metrics(settle=True)
    sessions = 20
    ids: list[str] = []

    async def run() -> tuple[float, float]:
        # Fresh connections: both workers take some, so the gauge is summed over processes.
        clients: list[ClientConnection] = [await connect(_ws_url(server)) for _ in range(sessions)]
        for ws in clients:
            for n in range(3):
                await ws.send(f"m{n}")
                await ws.recv()
        await asyncio.sleep(0.5)  # the workers' metric flush interval
        open_now = total(await asyncio.to_thread(server.metrics), "websocket_connections_open")
        ids.extend(ws.response.headers["x-request-id"] for ws in clients if ws.response)
        for ws in clients[:2]:
            await ws.close(code=4000, reason="test")  # an application-defined code
        for ws in clients[2:]:
            await ws.close()
        await asyncio.sleep(0.5)
        open_after = total(await asyncio.to_thread(server.metrics), "websocket_connections_open")
        return open_now, open_after

    open_now, open_after = asyncio.run(run())
    after = server.metrics(settle=True)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert open_now == sessions
    # Both workers held some, so the open gauge really was summed over processes.
    assert len({r["pid"] for r in _lines(server, "websocket") if r["request_id"] in ids}) == 2
    assert open_after == 0
    assert delta("websocket_messages_total", route="/ws/echo", direction="in") == 3 * sessions
    assert delta("websocket_messages_total", route="/ws/echo", direction="out") == 3 * sessions
    assert delta("websocket_sessions_total", route="/ws/echo", code="4000") == 2
    assert delta("websocket_sessions_total", route="/ws/echo", code="1000") == sessions - 2
    # Sessions are not HTTP requests: the request counters did not move.
    assert delta("http_requests_total") == 0


def test_unknown_websocket_path_is_refused_and_counted_under_one_label(server: Server) -> None:
    async def attempt() -> int:
        try:
            async with connect(_ws_url(server, "/ws/" + secrets.token_hex(6))):
                return 101
        except Exception as error:  # noqa: BLE001 - the refusal is the expected outcome
            return int(getattr(getattr(error, "response", None), "status_code", 0))

    assert asyncio.run(attempt()) == 403
    after = server.metrics(settle=True)
    assert total(after, "websocket_sessions_total", route="<unmatched>", code="rejected") >= 1


def test_first_event_arrives_long_before_the_stream_ends(server: Server) -> None:
    arrivals: list[float] = []
    started = time.monotonic()
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("GET", "/api/events", params={"count": 3, "interval": 0.5}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        for line in response.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 3
    # The first event came while the rest of the stream was still to come: two intervals.
    assert arrivals[0] < arrivals[-1] / 2


def test_a_reconnecting_client_resumes_after_its_last_event_id(server: Server) -> None:
    response = httpx.get(
        f"{server.url}/api/events",
        params={"count": 10, "interval": 0},
        headers={"Last-Event-ID": "7"},
        timeout=10,
    )
    assert response.status_code == 200
    ids = [
        line.removeprefix("id: ") for line in response.text.splitlines() if line.startswith("id:")
    ]
    assert ids == ["8", "9"]
    bad = httpx.get(f"{server.url}/api/events", headers={"Last-Event-ID": "x"}, timeout=10)
    assert bad.status_code == 422


@pytest.mark.parametrize(
    "params", [{"count": 0}, {"count": 1001}, {"interval": -1}, {"interval": 11}]
)
def test_event_parameters_out_of_range_are_422(server: Server, params: dict[str, int]) -> None:
    response = httpx.get(f"{server.url}/api/events", params=params, timeout=10)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


def test_sigterm_closes_every_websocket_and_ends_event_streams_cleanly(tmp_path: Path) -> None:
    """50 open WebSockets and 2 long event streams, then SIGTERM to the master: every
    client gets a close frame (1012, service restart), every stream ends with its
    terminating chunk, and the master exits 0 (no worker needed SIGKILL)."""
    server = start_server(tmp_path, SHUTDOWN_TIMEOUT="10", GRACEFUL_TIMEOUT="15")
    server.wait_ready(workers=2)
    sockets = 50

    def read_stream() -> tuple[int, str | None]:
        events = 0
        try:
            with (
                httpx.Client(base_url=server.url, timeout=30) as client,
                client.stream("GET", "/api/events", params={"count": 1000, "interval": 0.2}) as r,
            ):
                for line in r.iter_lines():
                    events += line.startswith("data:")
        except httpx.HTTPError as error:
            return events, repr(error)
        return events, None

    async def run() -> tuple[list[int | None], list[tuple[int, str | None]]]:
        clients = [await connect(_ws_url(server)) for _ in range(sockets)]
        for ws in clients:
            await ws.send("ping")
            assert await ws.recv() == "ping"
        streams = [asyncio.create_task(asyncio.to_thread(read_stream)) for _ in range(2)]
        await asyncio.to_thread(
            _wait_for, lambda: total(server.metrics(), "websocket_connections_open") == sockets
        )
        await asyncio.sleep(0.6)  # a few events on each stream
        server.process.terminate()

        async def close_code(ws: ClientConnection) -> int | None:
            try:
                await asyncio.wait_for(ws.recv(), timeout=20)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
            return -1  # a message instead of a close frame

        codes = await asyncio.gather(*(close_code(ws) for ws in clients))
        return codes, await asyncio.gather(*streams)

    codes, streams = asyncio.run(run())
    assert server.process.wait(timeout=30) == 0
    assert codes == [1012] * sockets
    for events, error in streams:
        assert error is None  # the chunked body ended properly, not cut
        assert 0 < events < 1000
    records = server.records()
    closed = [r for r in records if r.get("event") == "websocket" and r.get("close_code") == 1012]
    assert len(closed) == sockets
    assert sum(r.get("streams", 0) for r in records if r.get("event") == "event streams ended") == 2
    assert not [r for r in records if "SIGKILL" in str(r.get("event"))]
