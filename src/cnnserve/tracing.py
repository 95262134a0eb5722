"""OpenTelemetry tracing of the gateway's requests, behind ``settings.tracing_otlp_endpoint``.

Unset (the default), nothing here imports OpenTelemetry and every hook is a check of one
module global: tracing costs nothing. Set, the gateway exports its spans over OTLP/gRPC
(``pip install 'cnnserve[tracing]'``):

- one SERVER span per HTTP request and gRPC call, a child of the caller's W3C
  ``traceparent`` (header or metadata) when it sent a valid one; a malformed one starts a
  new trace, never fails the request;
- ``queue wait``: from the moment the request's items were queued to the moment the first of
  them went into a batch, a child of the request's span;
- ``batch``: one span per batch, the child of the batch's oldest request (so that request's
  trace shows the whole way) and linked to every request it serves (Jaeger lists the links
  under "References", so each request's trace leads to the batch it ran in, and the batch to
  its requests). A child span per request would repeat one model run as many times as the
  batch had requests, each claiming the whole run's time;
- ``infer``: the backend's work on the batch, a child of ``batch``; the TorchServe backend
  sends its context as ``traceparent`` metadata with the call, so a TorchServe that traces
  continues the trace.

docs/observability.md shows how to point it at Jaeger or Tempo.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cnnserve.errors import needs_extra

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from cnnserve.settings import Settings

#: W3C Trace Context's header (and gRPC metadata key), and its companion.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Longest propagation header read; W3C asks for 512 characters of tracestate at least.
MAX_PROPAGATION_CHARS = 1024
#: The instrumentation scope of every span.
SCOPE = "cnnserve.gateway"

_tracer: Tracer | None = None


def enabled() -> bool:
    """Whether spans are recorded (a tracer was configured)."""
    return _tracer is not None


def configure(settings: Settings) -> TracerProvider | None:
    """Export spans to ``settings.tracing_otlp_endpoint`` when it is set; the provider (to
    flush at exit), or ``None`` (no tracing). Raises :class:`MissingExtraError` naming the
    ``tracing`` extra when OpenTelemetry's SDK or exporter is not installed."""
    if settings.tracing_otlp_endpoint is None:
        return None
    with needs_extra("tracing", "tracing_otlp_endpoint"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.tracing_service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.tracing_sample_ratio)),
    )
    # Exported from a background thread in batches: a slow collector never holds a request.
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.tracing_otlp_endpoint))
    )
    use_provider(provider)
    return provider


@contextlib.contextmanager
def exporting(settings: Settings) -> Iterator[None]:
    """Trace as ``settings`` say while the block runs (a gateway or batching process's
    life), each process with its own exporter; its last spans are flushed at the end."""
    provider = configure(settings)
    try:
        yield
    finally:
        if provider is not None:
            use_provider(None)
            provider.shutdown()


def use_provider(provider: TracerProvider | None) -> None:
    """Record spans with ``provider`` from now on (``None``: stop tracing)."""
    global _tracer  # noqa: PLW0603 - the one switch every hook reads
    _tracer = None if provider is None else provider.get_tracer(SCOPE)


def _carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """The propagation headers worth parsing: present and of a sane length."""
    return {
        name: value
        for name in (TRACEPARENT, TRACESTATE)
        if (value := headers.get(name)) is not None and len(value) <= MAX_PROPAGATION_CHARS
    }


@contextlib.contextmanager
def server_span(
    name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]
) -> Iterator[Span | None]:
    """A SERVER span for one request, current while the block runs, the child of the
    ``traceparent`` in ``headers`` (lower-case names) when valid; ``None`` when tracing is
    off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(_carrier(headers))
    # The transports set the span's status from the answer: a caller's bad request (an
    # exception here) is not the server's error.
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


def trace_id(span: Span | None) -> str | None:
    """The span's trace id as 32 hex digits (how Jaeger and Tempo look a trace up)."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def set_error(span: Span | None, description: str) -> None:
    """Mark the request's span failed (a 5xx answer, a server-side gRPC code)."""
    if span is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, description))


class Queued:
    """A request's trace context and the moment it was queued, kept until it leaves the
    queue."""

    __slots__ = ("context", "queued_ns")

    def __init__(self, context: Context, queued_ns: int) -> None:
        self.context = context
        self.queued_ns = queued_ns


def queued() -> Queued | None:
    """Call where a request is queued: its context, or ``None`` when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry.context import get_current

    return Queued(get_current(), time.time_ns())


def dequeued(request: Queued | None, model: str) -> None:
    """The request's first items went into a batch: its ``queue wait`` span ends now."""
    if _tracer is None or request is None:
        return
    span = _tracer.start_span(
        "queue wait",
        context=request.context,
        start_time=request.queued_ns,
        attributes={"cnnserve.model": model},
    )
    span.end()


@contextlib.contextmanager
def batch_span(model: str, requests: Sequence[Queued | None], size: int) -> Iterator[None]:
    """A ``batch`` span, the oldest request's child linked to every request, and within it
    an ``infer`` span, current while the block runs the backend."""
    if _tracer is None:
        yield
        return
    from opentelemetry.trace import Link, get_current_span

    contexts = [r.context for r in requests if r is not None]
    links = [Link(get_current_span(c).get_span_context()) for c in contexts]
    attributes: dict[str, str | int] = {"cnnserve.model": model, "cnnserve.batch_size": size}
    with (
        _tracer.start_as_current_span(
            "batch",
            context=contexts[0] if contexts else None,
            links=links,
            attributes={**attributes, "cnnserve.batch_requests": len(requests)},
        ),
        _tracer.start_as_current_span("infer", attributes=attributes),
    ):
        yield


@contextlib.contextmanager
def continued(headers: Mapping[str, str] | None) -> Iterator[None]:
    """Make the trace context another process sent (:func:`propagation_metadata`'s pairs)
    current while the block runs: a frontend's request, queued in the batching process."""
    if _tracer is None or not headers:
        yield
        return
    from opentelemetry.context import attach, detach
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    token = attach(TraceContextTextMapPropagator().extract(_carrier(headers)))
    try:
        yield
    finally:
        detach(token)


def propagation_metadata() -> tuple[tuple[str, str], ...]:
    """``traceparent`` (and ``tracestate``) of the current span for an outgoing call; none
    when tracing is off or no span is current."""
    if _tracer is None:
        return ()
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return tuple(carrier.items())
