"""Request ids, the access log and the requests' trace spans, for both transports.

Every HTTP request and gRPC call gets a :class:`RequestRecord`, current (a context variable)
while it is served:

- its id: the caller's ``x-request-id`` header or metadata when it is 1 to
  :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters without spaces; else the OIP
  request's ``id`` once the data plane reads it (same rule); else a fresh one. A bad id is
  replaced, never refused. The id goes back to the caller as ``x-request-id`` (the HTTP
  answer's header; gRPC initial metadata on success, trailing metadata on failure);
- what the data plane learnt of it (:meth:`RequestRecord.routed`, :meth:`RequestRecord.ran`):
  model, version, items, and from the batcher the time its items queued and the size of the
  batch they ran in;
- with ``settings.access_log``, one record on logger ``cnnserve.access`` when it ends, its
  fields as record attributes (``log_format=json`` writes them as JSON fields) and in the
  text line;
- with tracing on, its SERVER span (:mod:`cnnserve.tracing`).

uvicorn's own access log stays off (``access_log=False`` in :mod:`.server`): this one
replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnserve import tracing

from .batcher import ModelTime

logger = logging.getLogger("cnnserve.access")

#: The header (HTTP) and metadata key (gRPC) carrying the request id, both ways.
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_BYTES = REQUEST_ID_HEADER.encode()
#: Longest request id taken from a caller; a longer one is replaced by a fresh id.
MAX_REQUEST_ID_CHARS = 128
_GOOD_ID = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_CHARS}}}")
#: Longest HTTP path written in a record (a path is the caller's to choose).
MAX_PATH_CHARS = 256
#: gRPC codes that are the server's failure, not the caller's (OpenTelemetry's rule).
_SERVER_FAULTS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)

_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "cnnserve_request", default=None
)


def valid_request_id(candidate: object) -> bool:
    """Whether a caller's id is kept: 1–128 characters of printable ASCII, no space."""
    return isinstance(candidate, str) and _GOOD_ID.fullmatch(candidate) is not None


class RequestRecord:
    """What is known of one request while it is served (see the module docstring)."""

    __slots__ = (
        "batch_size",
        "from_caller",
        "items",
        "logged",
        "method",
        "model",
        "queue_s",
        "request_id",
        "started",
        "status",
        "trace_id",
        "transport",
        "version",
    )

    def __init__(self, sent_id: str | None, transport: str, method: str) -> None:
        self.from_caller = valid_request_id(sent_id)
        self.request_id: str = sent_id if sent_id is not None and self.from_caller else _new_id()
        self.transport = transport
        self.method = method
        self.started = time.perf_counter()
        self.status = ""
        self.model: str | None = None
        self.version: str | None = None
        self.items: int | None = None
        self.queue_s: float | None = None
        self.batch_size: int | None = None
        self.trace_id: str | None = None
        #: Whether its access record is written (settings.access_log).
        self.logged = False

    def asked(self, oip_id: str, model: str) -> None:
        """The data plane read the request: its OIP ``id`` names it unless the caller sent
        an id already; ``model`` is what it asks for, not yet known to be served (a caller's
        text: quoted unless it is plain printable ASCII)."""
        self.adopt(oip_id)
        self.model = model if valid_request_id(model) else repr(model[:MAX_REQUEST_ID_CHARS])

    def routed(self, model: str, version: str, items: int) -> None:
        """The data plane found the request's version and counted its items."""
        self.model, self.version, self.items = model, version, items

    def adopt(self, oip_id: str) -> None:
        """An OIP request ``id`` names the request unless the caller sent an id already."""
        if not self.from_caller and valid_request_id(oip_id):
            self.request_id, self.from_caller = oip_id, True

    def ran(self, model_time: ModelTime) -> None:
        """The batcher's account of the request: its queue wait and batch size."""
        self.queue_s = model_time.queue_s
        self.batch_size = model_time.batch_size

    def log(self) -> None:
        """Write the access record (INFO on ``cnnserve.access``)."""
        latency_ms = round((time.perf_counter() - self.started) * 1000, 3)
        queue_ms = None if self.queue_s is None else round(self.queue_s * 1000, 3)
        fields = {
            "request_id": self.request_id,
            "transport": self.transport,
            "method": self.method,
            "status": self.status,
            "model": self.model,
            "version": self.version,
            "items": self.items,
            "latency_ms": latency_ms,
            "queue_ms": queue_ms,
            "batch_size": self.batch_size,
            "trace_id": self.trace_id,
        }
        logger.info(
            "%s %s %r %s model=%s version=%s items=%s latency_ms=%.3f queue_ms=%s batch_size=%s",
            self.request_id,
            self.transport,
            self.method,
            self.status,
            self.model or "-",
            self.version or "-",
            "-" if self.items is None else self.items,
            latency_ms,
            "-" if queue_ms is None else queue_ms,
            self.batch_size or "-",
            extra=fields,
        )


def _new_id() -> str:
    return uuid.uuid4().hex


def current_record() -> RequestRecord | None:
    """The record of the request being served in this task (``None`` outside one)."""
    return _current.get()


class RequestLog:
    """ASGI middleware, outermost: a record (and span) per HTTP request, the id on the
    answer, the access record at the end when ``enabled``."""

    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self._logged = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request within its record."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _HTTP_HEADERS_READ:
                headers[name.decode()] = value.decode("latin-1")
        # The raw target, not the percent-decoded path: no control character can reach a line.
        path = scope.get("raw_path", b"").decode("latin-1")[:MAX_PATH_CHARS] or scope["path"]
        record = RequestRecord(headers.get(REQUEST_ID_HEADER), "http", f"{scope['method']} {path}")
        record.logged = self._logged
        token = _current.set(record)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = str(message["status"])
                id_header = (_REQUEST_ID_BYTES, record.request_id.encode())
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        try:
            attributes = {"http.request.method": scope["method"], "url.path": path}
            with tracing.server_span(record.method, headers, attributes) as span:
                record.trace_id = tracing.trace_id(span)
                await self.app(scope, receive, send_with_id)
                _finish_span(span, record)
        finally:
            _current.reset(token)
            if not record.status:
                record.status = "500"  # uvicorn answers 500 for an app that raised
            if record.logged:
                record.log()


_HTTP_HEADERS_READ = frozenset(
    name.encode() for name in (REQUEST_ID_HEADER, tracing.TRACEPARENT, tracing.TRACESTATE)
)


def _finish_span(span: Any, record: RequestRecord) -> None:
    """The request's outcome on its span (``None``: tracing is off)."""
    if span is None:
        return
    span.set_attributes(
        {
            "cnnserve.request_id": record.request_id,
            "cnnserve.model": record.model or "",
            "cnnserve.model_version": record.version or "",
            "cnnserve.items": record.items or 0,
        }
    )
    if record.transport == "http":
        span.set_attribute("http.response.status_code", int(record.status))
        if record.status.startswith("5"):
            tracing.set_error(span, record.status)
    else:
        span.set_attribute("rpc.grpc.status_code", record.status)
        if record.status in _SERVER_FAULTS:
            tracing.set_error(span, record.status)


class RequestLogInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The gRPC side of :class:`RequestLog`: first of the server's interceptors, so a call
    another one refuses (no API key) is recorded too."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        #: Method → (the handler it had, the handler made from it), as ParsedByGateway keeps.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, its behaviour run within a record."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # gRPC's own UNIMPLEMENTED
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior, make = {
            (False, False): (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (False, True): (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (True, False): (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (True, True): (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        }[streaming]
        enabled = self._enabled
        if inspect.isasyncgenfunction(behavior):

            async def stream_answers(request: Any, context: grpc.aio.ServicerContext) -> Any:
                record, token, metadata = _begin_call(context, method, enabled)
                # A stream's answers start with its initial metadata: the id goes first.
                await context.send_initial_metadata(((REQUEST_ID_HEADER, record.request_id),))
                with _call_span(record, metadata) as span:
                    try:
                        async for answer in behavior(request, context):
                            yield answer
                    except BaseException as exc:
                        _end_call(record, context, span, exc)
                        raise
                    else:
                        _end_call(record, context, span, None)
                    finally:
                        _current.reset(token)

            wrapped: Any = stream_answers
        else:

            async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
                record, token, metadata = _begin_call(context, method, enabled)
                with _call_span(record, metadata) as span:
                    try:
                        response = await behavior(request, context)
                    except BaseException as exc:
                        _end_call(record, context, span, exc)
                        raise
                    finally:
                        _current.reset(token)
                    # The OIP id may have named the request meanwhile: the id as it ends.
                    await context.send_initial_metadata(((REQUEST_ID_HEADER, record.request_id),))
                    _end_call(record, context, span, None)
                return response

            wrapped = answer
        return make(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {
        key: value
        for key, value in context.invocation_metadata() or ()
        if key in _GRPC_METADATA_READ and isinstance(value, str)
    }


_GRPC_METADATA_READ = frozenset((REQUEST_ID_HEADER, tracing.TRACEPARENT, tracing.TRACESTATE))


def _begin_call(
    context: grpc.aio.ServicerContext, method: str, logged: bool
) -> tuple[RequestRecord, contextvars.Token[RequestRecord | None], dict[str, str]]:
    """The call's record, made current; the metadata it reads (id, trace context)."""
    metadata = _metadata(context)
    record = RequestRecord(metadata.get(REQUEST_ID_HEADER), "grpc", method)
    record.logged = logged
    # Where the call fails before the data plane names it otherwise, the id the call had.
    context.set_trailing_metadata(((REQUEST_ID_HEADER, record.request_id),))
    return record, _current.set(record), metadata


def _call_span(record: RequestRecord, metadata: dict[str, str]) -> Any:
    attributes = {"rpc.system": "grpc", "rpc.method": record.method}
    return tracing.server_span(record.method, metadata, attributes)


def _end_call(
    record: RequestRecord,
    context: grpc.aio.ServicerContext,
    span: Any,
    exc: BaseException | None,
) -> None:
    """Close the call's record: its status code name (what the servicer set, else OK when
    it returned, CANCELLED when the caller left, UNKNOWN for an exception gRPC answers as
    such), its span's outcome, the access record."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        record.status = code.name
    elif exc is None:
        record.status = "OK"
    else:
        record.status = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"
    record.trace_id = tracing.trace_id(span)
    _finish_span(span, record)
    if record.logged:
        record.log()


@contextlib.contextmanager
def stream_request(oip_id: str) -> Iterator[RequestRecord]:
    """One request of a ``ModelStreamInfer`` stream, with its own record while the block
    runs (in the request's own task): its id is the message's OIP ``id`` when valid, else a
    fresh one; the block sets its ``status``."""
    stream = current_record()
    record = RequestRecord(None, "grpc", stream.method if stream is not None else "")
    record.logged = stream is not None and stream.logged
    if stream is not None:
        record.trace_id = stream.trace_id
    record.adopt(oip_id)
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)
        if not record.status:
            record.status = "CANCELLED"  # the stream ended before this request's answer
        if record.logged:
            record.log()
