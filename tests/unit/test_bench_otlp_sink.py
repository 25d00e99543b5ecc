"""bench/otlp_sink.py: the OTLP/HTTP receiver of `ours + OTLP` counts what it receives."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from bench.otlp_sink import Sink, count_spans

if TYPE_CHECKING:
    from pathlib import Path


def export(*per_scope: int) -> bytes:
    scopes = [ScopeSpans(spans=[Span(name=f"GET /{i}") for i in range(n)]) for n in per_scope]
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=scopes)]
    ).SerializeToString()


def test_spans_of_every_scope_are_counted() -> None:
    assert count_spans(export(3, 2)) == 5
    assert count_spans(b"") == 0


def test_two_exports_on_one_connection_are_answered_and_counted(tmp_path: Path) -> None:
    counts = tmp_path / "counts.json"

    async def exchange() -> list[bytes]:
        server = await asyncio.start_server(Sink(counts).serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for body in (export(4), export(1, 1)):
            writer.write(
                b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-protobuf\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answers.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()
        server.close()
        await server.wait_closed()
        return answers

    answers = asyncio.run(exchange())
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
    assert json.loads(counts.read_text()) == {"exports": 2, "spans": 6}
