"""The RPC ceiling: a bare ``grpc.aio`` server whose ModelInfer echoes the request's tensors.

It parses and builds protobufs like a real server but computes nothing, so its requests/s is
what gRPC alone allows on this machine; the gateway is measured as a fraction of it.
"""

from __future__ import annotations

import asyncio

import grpc

from cnnserve.protocol import open_inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"


async def _echo(
    request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
    for tensor in request.inputs:
        out = response.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.shape)
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


async def start_echo_server(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the echo server; returns it and the port it bound."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 256 << 20),
            ("grpc.max_send_message_length", 256 << 20),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                _echo,
                request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def serve_echo_forever(host: str, port: int, event_loop: str = "uvloop") -> None:
    """Run the echo server in the foreground (used by the suite in a separate process), on
    the same kind of event loop as the gateway (``settings.event_loop``)."""

    async def main() -> None:
        server, _ = await start_echo_server(host, port)
        await server.wait_for_termination()

    if event_loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
