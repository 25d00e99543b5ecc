"""OTLP span export from real gunicorn workers to a small OTLP/HTTP receiver on loopback: one
server span per request, named by the route template, with the trace and span ids the logs
and the returned traceparent carry. Without the setting, OpenTelemetry is never imported."""

from __future__ import annotations

import http.server
import os
import secrets
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.conftest import free_port, start_server

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.integration


class _Receiver(http.server.ThreadingHTTPServer):
    spans: list[Any]
    resources: list[dict[str, str]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        assert self.path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = resource_spans.resource.attributes
            self.server.resources.append({a.key: a.value.string_value for a in attributes})
            for scope_spans in resource_spans.scope_spans:
                self.server.spans.extend(scope_spans.spans)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver(("127.0.0.1", free_port()), _Handler)
    server.spans = []
    server.resources = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_one_span_per_request_with_the_logged_ids(receiver: _Receiver, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    srv = start_server(
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_SERVICE_NAME="",  # unset: the default name is under test
        APP_VERSION="otlp-test",
    )
    try:
        srv.wait_ready(workers=2)
        sent = {}
        for path in ("/api/items/7", "/api/hello", "/api/items/999", "/api/boom"):
            trace_id = secrets.token_hex(16)
            response = httpx.get(
                srv.url + path,
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
                timeout=10,
            )
            span_id = response.headers["traceparent"].split("-")[2]
            sent[trace_id] = (path, response.status_code, span_id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(receiver.spans) < len(sent):
            time.sleep(0.1)
        time.sleep(0.5)  # nothing more should come
    finally:
        srv.stop()
    spans = {s.trace_id.hex(): s for s in receiver.spans if s.trace_id.hex() in sent}
    assert len(spans) == len(sent) == len([s for s in receiver.spans if s.trace_id.hex() in sent])
    logged = {r["trace_id"]: r for r in srv.records() if r.get("logger") == "server.access"}
    names = {}
    for trace_id, (path, status, span_id) in sent.items():
        span = spans[trace_id]
        attributes = {a.key: a.value for a in span.attributes}
        route = logged[trace_id]["route"]
        names[path] = span.name
        assert span.name == f"GET {route}"
        assert attributes["http.route"].string_value == route
        assert attributes["http.response.status_code"].int_value == status
        assert attributes["http.request.method"].string_value == "GET"
        assert span.span_id.hex() == span_id == logged[trace_id]["span_id"]
        assert span.parent_span_id.hex() == "00f067aa0ba902b7"
        assert span.kind == span.SPAN_KIND_SERVER
        assert (span.status.code == span.status.STATUS_CODE_ERROR) == (status >= 500)
    assert names["/api/items/999"] == "GET /api/items/{item_id}"
    # No OTEL_SERVICE_NAME: named after APP_MODULE's package, with the build's version.
    assert receiver.resources
    for resource in receiver.resources:
        assert resource["service.name"] == "app"
        assert resource["service.version"] == "otlp-test"


@pytest.mark.parametrize(("endpoint", "imported"), [("", False), ("http://127.0.0.1:9", True)])
def test_opentelemetry_is_imported_only_with_the_setting(endpoint: str, imported: bool) -> None:
    """What a worker imports (the SDK; FastAPI may load the bare API itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_"))}
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, server.asgi; print('opentelemetry.sdk.trace' in sys.modules)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == str(imported)
