"""Batches as OpenTelemetry spans: one `backfill.batch` span per committed batch, from its BEGIN
to its COMMIT, with what it read and changed, so a trace shows where a migration's time goes.

Configured as OpenTelemetry always is, by the standard `OTEL_*` variables: `OTEL_SERVICE_NAME`
and `OTEL_RESOURCE_ATTRIBUTES` name the service (backfill unless they do), `OTEL_TRACES_SAMPLER`
samples, `OTEL_TRACES_EXPORTER` (default `otlp`; `console`, `none`) picks the exporters installed
under the SDK's `opentelemetry_traces_exporter` entry points, which read their own variables
(`OTEL_EXPORTER_OTLP_ENDPOINT`, ...); the extra brings OTLP over HTTP (`otlp` with
`OTEL_EXPORTER_OTLP_PROTOCOL=grpc` needs `opentelemetry-exporter-otlp-proto-grpc`).
`OTEL_SDK_DISABLED=true` turns it off. An app that set up its own tracer provider keeps it.
Only this module imports OpenTelemetry (`pip install 'backfill[otel]'`), and only when called:
importing backfill never imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from backfill.events import BatchCommitted, Event

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("backfill")

SPAN_NAME = "backfill.batch"
_EXPORTERS = "opentelemetry_traces_exporter"  # the SDK's entry point group for span exporters


class BatchSpans:
    """An events listener making one span per committed batch with `tracer_provider` (the
    global one if not given)."""

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from opentelemetry import trace

        self.provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = self.provider.get_tracer("backfill")

    def __call__(self, event: Event) -> None:
        if not isinstance(event, BatchCommitted):
            return
        end = int(event.time * 1e9)  # the event is emitted once the batch committed
        attributes: dict[str, str | int] = {
            "migration": event.migration,
            "first_key": _text(event.first_key),
            "last_key": _text(event.last_key),
            "rows_read": event.rows_read,
            "rows_changed": event.rows_changed,
            "batch_size": event.batch_size,
        }
        if event.shard is not None:
            attributes["shard"] = event.shard
        span = self.tracer.start_span(
            SPAN_NAME, start_time=end - int(event.seconds * 1e9), attributes=attributes
        )
        span.end(end_time=end)

    def flush(self, timeout_millis: int = 2000) -> None:
        """Export what is queued (a command ends soon after its run does)."""
        force_flush = getattr(self.provider, "force_flush", None)
        if force_flush is not None:
            force_flush(timeout_millis)


def _text(key: Any) -> str:
    """A key as a span attribute: the value as text, or JSON for a composite key's list."""
    return key if isinstance(key, str) else json.dumps(key, default=str)


def otel_listener(tracer_provider: TracerProvider | None = None) -> BatchSpans:
    """The listener making batch spans with `tracer_provider` (default: the global one)."""
    return BatchSpans(tracer_provider)


def enable_from_environment(environ: Mapping[str, str] = os.environ) -> BatchSpans | None:
    """With an `OTEL_*` variable set and the extra installed: the listener, over the app's
    tracer provider or one configured from the environment; otherwise None."""
    if not any(name.startswith("OTEL_") and value for name, value in environ.items()):
        return None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* is set but opentelemetry-sdk is not installed "
            "(pip install 'backfill[otel]'): no spans"
        )
        return None
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):  # the app set its own up
        return otel_listener(current)
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "backfill"}))
    provider = SdkTracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER
    for exporter in _exporters(environ):
        provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*
    return otel_listener(provider)


def _otlp(name: str, environ: Mapping[str, str], installed: Mapping[str, Any]) -> str:
    """`otlp` as the SDK reads it: the exporter of `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`
    (grpc, or http/protobuf); with none given, the one installed (the extra's is HTTP)."""
    if name != "otlp" or name in installed:
        return name
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or ""
    ).strip()
    if protocol == "grpc":
        return "otlp_proto_grpc"
    if protocol.startswith("http") or "otlp_proto_http" in installed:
        return "otlp_proto_http"
    return "otlp_proto_grpc"


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters `OTEL_TRACES_EXPORTER` names, as the SDK finds them; one not installed is
    logged and left out."""
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    installed = {e.name: e for e in entry_points(group=_EXPORTERS)}
    exporters = []
    for name in (_otlp(n, environ, installed) for n in names):
        if name in ("", "none"):
            continue
        if name not in installed:
            log.warning(
                "OTEL_TRACES_EXPORTER names %r, which is not installed (for OTLP over gRPC: "
                "pip install opentelemetry-exporter-otlp-proto-grpc): its spans are dropped",
                name,
            )
            continue
        exporters.append(installed[name].load()())
    return exporters


__all__ = ["SPAN_NAME", "BatchSpans", "enable_from_environment", "otel_listener"]
