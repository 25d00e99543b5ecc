"""W3C traceparent: parsed, propagated and generated; a malformed one replaced, never trusted."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import structlog

from server.asgi import wrap
from server.metrics import HttpMetrics
from server.trace_context import TraceParent, format_header, is_trace_id, new_span_id, parse

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (VALID, TraceParent(TRACE, PARENT, sampled=True)),
        (f"00-{TRACE}-{PARENT}-00", TraceParent(TRACE, PARENT, sampled=False)),
        # Other flag bits are kept out; only "sampled" means something in version 00.
        (f"00-{TRACE}-{PARENT}-03", TraceParent(TRACE, PARENT, sampled=True)),
        # A later version may be longer; its first four fields are read as version 00's.
        (f"cc-{TRACE}-{PARENT}-01-what-comes-next", TraceParent(TRACE, PARENT, sampled=True)),
        (f"01-{TRACE}-{PARENT}-00", TraceParent(TRACE, PARENT, sampled=False)),
    ],
)
def test_valid_traceparent_is_parsed(header: str, expected: TraceParent) -> None:
    assert parse(header.encode()) == expected


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        VALID.upper(),  # upper-case hex is invalid
        f"00-{TRACE}-{PARENT}-01-",  # version 00 is exactly 55 characters
        f"00-{TRACE}-{PARENT}-01-extra",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"00_{TRACE}_{PARENT}_01",
        f" {VALID}",
        f"{VALID}\n",
        f"cc-{TRACE}-{PARENT}-01-{'x' * 300}",  # absurdly long
        f"cc-{TRACE}-{PARENT}-01-with space",
    ],
)
def test_malformed_traceparent_is_rejected(header: str) -> None:
    assert parse(header.encode()) is None


def test_missing_traceparent_is_none() -> None:
    assert parse(None) is None


def test_generated_ids_are_valid_and_formatted() -> None:
    spans = {new_span_id() for _ in range(1000)}
    assert len(spans) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) and s != "0" * 16 for s in spans)
    assert format_header(TRACE, PARENT, sampled=True) == VALID.encode()
    assert format_header(TRACE, PARENT, sampled=False).endswith(b"-00")
    assert is_trace_id(TRACE)
    assert not is_trace_id("0" * 32)
    assert not is_trace_id(TRACE.upper())
    assert not is_trace_id("abc.DEF_123-x")


# ── through the middleware ─────────────────────────────────────────────────────


class Seen:
    """What the app behind the middleware saw: its request headers and log context."""

    def __init__(self) -> None:
        self.headers: dict[bytes, list[bytes]] = {}
        self.context: dict[str, Any] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.headers = {}
        for name, value in scope["headers"]:
            self.headers.setdefault(name, []).append(value)
        self.context = structlog.contextvars.get_contextvars()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def _get(headers: dict[str, str]) -> tuple[httpx.Response, Seen]:
    seen = Seen()
    transport = httpx.ASGITransport(app=wrap(seen, HttpMetrics()))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/x", headers=headers)
    return response, seen


@pytest.mark.anyio
async def test_incoming_trace_is_continued_with_a_span_of_our_own() -> None:
    response, seen = await _get({"traceparent": VALID, "tracestate": "vendor=abc"})
    returned = TRACEPARENT.fullmatch(response.headers["traceparent"])
    assert returned is not None
    trace_id, span_id, flags = returned.groups()
    assert (trace_id, flags) == (TRACE, "01")
    assert span_id != PARENT
    # The app sees one traceparent, with our span as the parent of what it calls next,
    # and the tracestate that belongs to the trace.
    assert seen.headers[b"traceparent"] == [response.headers["traceparent"].encode()]
    assert seen.headers[b"tracestate"] == [b"vendor=abc"]
    # Every log line of the request carries both ids.
    assert seen.context["trace_id"] == TRACE
    assert seen.context["span_id"] == span_id
    assert seen.context["request_id"] == response.headers["x-request-id"]
    # Nothing leaks into the next request's context.
    assert "trace_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.anyio
async def test_unsampled_trace_stays_unsampled() -> None:
    response, _ = await _get({"traceparent": f"00-{TRACE}-{PARENT}-00"})
    assert response.headers["traceparent"].startswith(f"00-{TRACE}-")
    assert response.headers["traceparent"].endswith("-00")


@pytest.mark.parametrize(
    "header",
    [f"00-{'0' * 32}-{PARENT}-01", VALID.upper(), f"{VALID}-forged", "x" * 1000],
)
@pytest.mark.anyio
async def test_malformed_traceparent_is_replaced_and_its_tracestate_dropped(header: str) -> None:
    response, seen = await _get({"traceparent": header, "tracestate": "evil=1"})
    returned = TRACEPARENT.fullmatch(response.headers["traceparent"])
    assert returned is not None
    trace_id, span_id, flags = returned.groups()
    assert trace_id not in (TRACE, "0" * 32)
    assert flags == "01"
    assert seen.headers[b"traceparent"] == [response.headers["traceparent"].encode()]
    assert b"tracestate" not in seen.headers
    assert seen.context["trace_id"] == trace_id
    assert seen.context["span_id"] == span_id


@pytest.mark.anyio
async def test_without_any_header_the_request_id_is_the_trace_id() -> None:
    response, seen = await _get({})
    rid = response.headers["x-request-id"]
    assert response.headers["traceparent"].startswith(f"00-{rid}-")
    assert seen.context["trace_id"] == rid


@pytest.mark.anyio
async def test_a_callers_request_id_that_is_no_trace_id_gets_a_fresh_trace() -> None:
    response, seen = await _get({"X-Request-ID": "order-42"})
    assert response.headers["x-request-id"] == "order-42"
    trace_id = seen.context["trace_id"]
    assert is_trace_id(trace_id)
    assert response.headers["traceparent"].startswith(f"00-{trace_id}-")
