"""A minimal OTLP/HTTP trace receiver on loopback: the collector at the other end of
`ours, OTLP on` (OTEL_EXPORTER_OTLP_ENDPOINT set), so the bench measures what span export
costs the app, not what a collector costs.

It answers every POST /v1/traces with 200 and an empty ExportTraceServiceResponse (the
exporter then drops nothing), decodes each request to count its spans and keeps the totals
in a JSON file (`python -m bench.otlp_sink PORT COUNTS_FILE`), so the report can say that
every request's span arrived. Keep-alive HTTP/1.1, as the SDK's requests session speaks.
https://opentelemetry.io/docs/specs/otlp/#otlphttp
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"


def count_spans(body: bytes) -> int:
    """Spans in one OTLP/HTTP protobuf export request."""
    request = ExportTraceServiceRequest.FromString(body)
    return sum(len(scope.spans) for res in request.resource_spans for scope in res.scope_spans)


class Sink:
    def __init__(self, counts: Path) -> None:
        self.counts = counts
        self.exports = 0
        self.spans = 0
        self.save()

    def save(self) -> None:
        self.counts.write_text(json.dumps({"exports": self.exports, "spans": self.spans}))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                self.spans += count_spans(await reader.readexactly(length))
                self.exports += 1
                self.save()
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def main(port: int, counts: Path) -> None:
    sink = Sink(counts)
    server = await asyncio.start_server(sink.serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
