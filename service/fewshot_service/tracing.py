"""OpenTelemetry traces: a ``fewshot.request`` span per RPC / HTTP request, with children
``decode``, ``queue_wait``, ``inference`` and ``registry`` (docs/observability.md).

Off by default. Only :func:`configure` with an OTLP endpoint (``--otlp-endpoint``, or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) installs the SDK's tracer
provider, and only this module's own: the process-wide OpenTelemetry globals are left alone. While
off, :func:`request_span` and :func:`span` return a shared null context after one flag or
contextvar look-up (bench/bench_tracing_overhead.py measures it), so no span object, id or
attribute dict is made. The SDK and the OTLP exporter are the ``otel`` extra; the API alone is a
dependency of the server.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

TRACER_NAME = "fewshot"
REQUEST_SPAN = "fewshot.request"
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate, whatever the globals say
_NULL: AbstractContextManager[None] = contextlib.nullcontext()
_tracer: trace.Tracer | None = None  # None: tracing is off


class TracingUnavailable(RuntimeError):
    """An OTLP endpoint is set but the SDK is not installed (``pip install 'fewshot[otel]'``)."""


def enabled() -> bool:
    return _tracer is not None


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` from now on (None: off). The tests hand in one with an
    in-memory exporter; :func:`configure` one that exports by OTLP."""
    global _tracer
    _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None


def otlp_endpoint(configured: str | None) -> str | None:
    """The endpoint to export to: the setting, else the standard environment variables."""
    if configured:
        return configured
    return next((os.environ[v] for v in OTLP_ENDPOINT_VARIABLES if os.environ.get(v)), None)


def configure(endpoint: str | None, service_version: str = "") -> TracerProvider | None:
    """Start exporting spans by OTLP/gRPC to ``endpoint`` (see :func:`otlp_endpoint`); None and
    nothing installed when there is none. The caller shuts the returned provider down at exit
    (that flushes the spans still batched)."""
    endpoint = otlp_endpoint(endpoint)
    if endpoint is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            f"an OTLP endpoint is set but the OpenTelemetry SDK is missing ({exc.name}): "
            "pip install 'fewshot[otel]'"
        ) from None
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES apply (Resource.create reads them); without a
    # name from them the service is "fewshot" rather than the SDK's "unknown_service".
    resource = Resource.create({"service.version": service_version})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "fewshot"}))
    provider = TracerProvider(resource=resource)
    # Headers, TLS and timeouts of the exporter come from the standard OTEL_EXPORTER_OTLP_* variables.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    use_provider(provider)
    log.info("tracing: exporting spans by OTLP/gRPC")  # not the endpoint: it may carry credentials
    return provider


# -- spans ---------------------------------------------------------------------------------------


def request_span(
    route: str, headers: Iterable[tuple[str, str]], attributes: Mapping[str, Any]
) -> AbstractContextManager[Any]:
    """The root span of one request (SERVER kind), a child of the caller's W3C ``traceparent``
    when ``headers`` hold a valid one; the null context while tracing is off."""
    if _tracer is None:
        return _NULL
    carrier = {
        name.lower(): value for name, value in headers if name.lower() in ("traceparent", "tracestate")
    }
    parent = _PROPAGATOR.extract(carrier) if carrier else None
    return _tracer.start_as_current_span(
        REQUEST_SPAN,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"fewshot.route": route, **attributes},
        record_exception=False,
        set_status_on_exception=False,
    )


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current request span; the null context outside a recording one."""
    if _tracer is None or not trace.get_current_span().is_recording():
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def record(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A child span of the current request span for an interval measured elsewhere (a batcher
    worker's queue wait and run, timed with :func:`time.time_ns`)."""
    if _tracer is None or not trace.get_current_span().is_recording():
        return
    _tracer.start_span(name, start_time=start_ns, attributes=attributes).end(end_time=end_ns)


def recording() -> bool:
    return _tracer is not None and trace.get_current_span().is_recording()


def set_attributes(**attributes: Any) -> None:
    """Add to the current span (the request's, where called from a handler) when it records."""
    if _tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attributes)


def end_request(status: str | int, failed: bool) -> None:
    """The request's answer on its span: the status and, for a server-side failure, ERROR."""
    if _tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute("fewshot.status", status)
        if failed:
            current.set_status(Status(StatusCode.ERROR))


def trace_id() -> str | None:
    """The current span's trace id (32 hex digits) when it records, for the access log."""
    if _tracer is None:
        return None
    current = trace.get_current_span()
    if not current.is_recording():
        return None
    return trace.format_trace_id(current.get_span_context().trace_id)


def in_context(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` bound to the current context, for a thread pool (children stay children)."""
    if not recording():
        return function
    context = contextvars.copy_context()
    return lambda *args, **kwargs: context.run(function, *args, **kwargs)
