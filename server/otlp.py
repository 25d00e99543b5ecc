"""Span export over OTLP/HTTP: one server span per request, only when asked for.

Imported by `server.asgi` only when OTEL_EXPORTER_OTLP_ENDPOINT is set: without it no
OpenTelemetry module is loaded and a request pays nothing. Each worker sets up its own
provider (a batch processor's thread does not survive fork). The span takes the ids the
middleware already chose and logged (`server.trace_context`), so the trace and span ids in
the logs, in the `traceparent` returned and in the tracing backend are the same. The SDK
reads its other settings from the standard variables (OTEL_SERVICE_NAME,
OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, OTEL_BSP_*...); without a service name
there, the service is named after APP_MODULE's top package.
https://opentelemetry.io/docs/specs/semconv/http/http-spans/
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from server.metrics import UNMATCHED_ROUTE

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from opentelemetry.trace import Span as OtelSpan

    from server.trace_context import Span

__all__ = ["SpanExport", "service_resource"]


class _ChosenIds(IdGenerator):
    """Hands the SDK the ids the middleware chose for the span it is about to start (the
    event loop starts one span at a time, synchronously)."""

    trace_id = 0
    span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id


def service_resource(app_module: str, version: str) -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) plus the version.

    Without a name from those variables the SDK would say `unknown_service:python`; the
    service is then named after the top package of APP_MODULE (`app.main:app` -> `app`)."""
    resource = Resource.create({"service.version": version})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        package = app_module.partition(":")[0].partition(".")[0]
        resource = resource.merge(Resource({"service.name": package}))
    return resource


class SpanExport:
    def __init__(self, app_module: str, version: str) -> None:
        self._ids = _ChosenIds()
        self._provider = TracerProvider(
            resource=service_resource(app_module, version), id_generator=self._ids
        )
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._tracer = self._provider.get_tracer("server")

    def start(self, span: Span, scope: MutableMapping[str, Any]) -> OtelSpan:
        self._ids.trace_id = int(span.trace_id, 16)
        self._ids.span_id = int(span.span_id, 16)
        context = None
        if span.parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if span.parent.sampled else TraceFlags.DEFAULT)
            remote = SpanContext(
                int(span.parent.trace_id, 16),
                int(span.parent.parent_id, 16),
                is_remote=True,
                trace_flags=flags,
            )
            context = set_span_in_context(NonRecordingSpan(remote))
        client = scope.get("client")
        attributes = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        if client:
            attributes["client.address"] = client[0]
        return self._tracer.start_span(
            scope["method"], context=context, kind=SpanKind.SERVER, attributes=attributes
        )

    @staticmethod
    def end(otel_span: OtelSpan, method: str, route: str, status: int) -> None:
        if route != UNMATCHED_ROUTE:
            otel_span.update_name(f"{method} {route}")
            otel_span.set_attribute("http.route", route)
        otel_span.set_attribute("http.response.status_code", status)
        if status >= 500:  # server errors only: a 4xx is the client's (semantic conventions)
            otel_span.set_attribute("error.type", str(status))
            otel_span.set_status(Status(StatusCode.ERROR))
        otel_span.end()

    def shutdown(self) -> None:
        """Export what is pending (the worker is stopping)."""
        self._provider.shutdown()
