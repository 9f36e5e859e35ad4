"""OpenTelemetry tracing, off by default (PAYSENTINEL_TRACING).

One trace per checkout: the API's ``checkout`` span, Temporal's StartWorkflow /
RunWorkflow / StartActivity / RunActivity spans (the SDK's TracingInterceptor carries the
context through workflow and activity headers) and a ``provider <operation>`` span
around each call to the payment provider.

    off      no tracing (default)
    otlp     export over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT; pip install 'paysentinel[otlp]')
    console  print spans to stderr
    file     append one JSON object per span to PAYSENTINEL_TRACING_FILE
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from paysentinel.config import Settings

tracer = trace.get_tracer("paysentinel")
_configured: str | None = None
_lock = threading.Lock()


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in a file: trace and span ids, parent, name, attributes."""

    def __init__(self, path: Path):
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            context = span.get_span_context()
            if context is None:
                continue
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "trace_id": f"{context.trace_id:032x}",
                        "span_id": f"{context.span_id:016x}",
                        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                        "service": span.resource.attributes.get("service.name"),
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "attributes": {
                            k: v if isinstance(v, (str, int, float, bool)) else str(v) for k, v in (span.attributes or {}).items()
                        },
                    }
                )
            )
        with _lock, self._path.open("a") as out:
            out.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS


def _exporter(settings: Settings):
    if settings.tracing == "console":
        return SimpleSpanProcessor(ConsoleSpanExporter())
    if settings.tracing == "file":
        if not settings.tracing_file:
            raise RuntimeError("PAYSENTINEL_TRACING=file needs PAYSENTINEL_TRACING_FILE (where to write spans)")
        return SimpleSpanProcessor(JsonLinesExporter(Path(settings.tracing_file)))
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as err:
        raise RuntimeError("PAYSENTINEL_TRACING=otlp needs the OTLP exporter: pip install 'paysentinel[otlp]'") from err
    return BatchSpanProcessor(OTLPSpanExporter())


def interceptors(settings: Settings) -> list:
    """Temporal client interceptors for the configured tracing (none when it is off)."""
    global _configured
    if settings.tracing == "off":
        return []
    with _lock:
        if _configured is None:
            provider = TracerProvider(resource=Resource.create({"service.name": settings.tracing_service_name}))
            provider.add_span_processor(_exporter(settings))
            trace.set_tracer_provider(provider)
            _configured = settings.tracing
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return [TracingInterceptor()]
