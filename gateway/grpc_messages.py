"""Request messages parsed by the gateway, not by gRPC: off the event loop when big, and a
malformed one answered INVALID_ARGUMENT.

gRPC's server parses each request message with the method's deserializer on the event loop,
before the handler runs: a 64 MiB message of millions of tiny repeated elements freezes every
other call (health checks included) while it parses, and bytes that are not the method's
message end the call UNKNOWN ("Unexpected DecodeError"). :class:`ParsedByGateway` hands every
method's handler the message as received (bytes) and parses it with the same deserializer
through :meth:`~cnnserve.gateway.dataplane.DataPlane.convert_message` — inline when small,
in the bounded decode pool when big.

It runs after :class:`~cnnserve.gateway.auth.ApiKeyInterceptor`, which refuses a call
without an accepted key before any of its messages is received.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from cnnserve.errors import CnnserveError, public_message
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.grpc_codec import grpc_status, parse_infer_request

from .dataplane import DataPlane

Deserializer = Callable[[bytes], Any]

_INFERENCE = "/" + pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Methods whose messages carry tensors: parsed with their raw contents left as views of the
#: received bytes (:func:`~cnnserve.protocol.grpc_codec.parse_infer_request`), so the
#: servicer gets a ``ReceivedInferRequest``, not the protobuf message.
INFER_PARSERS: dict[str, Deserializer] = {
    f"{_INFERENCE}/ModelInfer": parse_infer_request,
    f"{_INFERENCE}/ModelStreamInfer": parse_infer_request,
}


def _parse(deserializer: Deserializer, data: bytes) -> Any:
    try:
        return deserializer(data)
    except DecodeError as exc:
        raise CodecError(
            f"the request message ({len(data)} bytes) is not this method's protobuf message: {exc}"
        ) from None


class ParsedByGateway(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every method's request messages arrive as bytes and are parsed here; see the module
    docstring."""

    def __init__(self, core: DataPlane) -> None:
        self._core = core
        #: Method → (the handler it had, the handler made from it): every call asks, and
        #: building a handler per call was a visible part of a small request's cost. Keyed
        #: by the method names the server serves, so it holds one entry per method at most.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The method's handler, taking bytes and parsing them before its behaviour runs."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, INFER_PARSERS.get(method, handler.request_deserializer))
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, handler: grpc.RpcMethodHandler, deserializer: Deserializer
    ) -> grpc.RpcMethodHandler:
        """``handler`` taking bytes, parsed with ``deserializer``."""
        streaming = (handler.request_streaming, handler.response_streaming)
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[streaming]
        wrapped = (
            self._stream_request(behavior, deserializer)
            if handler.request_streaming
            else self._unary_request(behavior, deserializer)
        )
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[streaming]
        return make(
            wrapped, request_deserializer=None, response_serializer=handler.response_serializer
        )

    async def _parsed(
        self, deserializer: Deserializer, data: bytes, context: grpc.aio.ServicerContext
    ) -> Any:
        try:
            return await self._core.convert_message(len(data), _parse, deserializer, data)
        except CnnserveError as exc:
            await context.abort(grpc_status(exc), public_message(exc))

    def _unary_request(self, behavior: Any, deserializer: Deserializer) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def stream_answers(data: bytes, context: grpc.aio.ServicerContext) -> Any:
                request = await self._parsed(deserializer, data, context)
                async for answer in behavior(request, context):
                    yield answer

            return stream_answers

        async def answer(data: bytes, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(await self._parsed(deserializer, data, context), context)

        return answer

    def _stream_request(self, behavior: Any, deserializer: Deserializer) -> Any:
        async def requests(
            received: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for data in received:
                yield await self._parsed(deserializer, data, context)

        if inspect.isasyncgenfunction(behavior):

            async def stream_answers(
                received: AsyncIterator[bytes], context: grpc.aio.ServicerContext
            ) -> Any:
                async for answer in behavior(requests(received, context), context):
                    yield answer

            return stream_answers

        async def answer(received: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(requests(received, context), context)

        return answer
