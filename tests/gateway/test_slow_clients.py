"""Slow, silent and greedy clients against a real gateway at the default limits: a stream
whose answers are never read, HTTP requests that never finish, callers that hang up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cnnserve.gateway.grpc_service import STREAM_MAX_PENDING
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.harness import gateway_settings, metric, raw_bytes_elements, running_gateway
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: A 64×64 scene: its FCN scores answer (FP32 per class and pixel) is 64 KB.
SCENE = shapes_png(side=64)[0]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway at the default settings (free ports only)."""
    async with running_gateway(gateway_settings(model_repository)) as running:
        yield running


def _scores_request(request_id: str) -> pb.ModelInferRequest:
    """An FCN request for its per-pixel scores: a small request with a big answer."""
    request = pb.ModelInferRequest(model_name="fcn", id=request_id)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw_bytes_elements([SCENE]))
    request.outputs.add(name="scores")
    return request


def _digit_request(request_id: str) -> pb.ModelInferRequest:
    """A one-digit ConvNet request: cheap to answer."""
    request = pb.ModelInferRequest(model_name="convnet", id=request_id)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(raw_bytes_elements([digit_png(1)[0]]))
    return request


async def _answered(gateway: Gateway) -> float:
    return await metric(gateway.metrics_port, "cnnserve_requests_total", model="fcn")


async def _settled(gateway: Gateway, above: float) -> float:
    """The answered count once it is above ``above`` and stopped growing for a second."""
    last = above
    while (now := await _answered(gateway)) == above or now != last:
        last = now
        await asyncio.sleep(1.0)
    return now


async def test_unread_stream_stops_being_read(gateway: Gateway) -> None:
    """1,000 requests written on one stream whose answers are never read: the gateway
    answers a bounded number, then stops reading; reading resumes it."""
    total = 1000
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        before = await _answered(gateway)
        call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()

        async def write_all() -> None:
            for i in range(total):
                await call.write(_scores_request(str(i)))
            await call.done_writing()

        writer = asyncio.create_task(write_all())
        answered = await asyncio.wait_for(_settled(gateway, before), 60) - before
        print(f"answered without a reader: {answered:.0f} of {total}")
        # The pending answers, plus what the HTTP/2 flow-control windows hold (a few MB).
        assert answered <= 2 * STREAM_MAX_PENDING, answered
        # Reading resumes the stream: answers come in order of reading, all well-formed.
        for _ in range(2 * STREAM_MAX_PENDING):
            answer = await asyncio.wait_for(call.read(), 30)
            assert answer.error_message == "", answer.error_message
        assert await _answered(gateway) - before > answered
        call.cancel()
        writer.cancel()


async def test_one_connection_holds_at_most_max_concurrent_streams(gateway: Gateway) -> None:
    """A client opening more calls on one connection than the limit: the extra one waits
    (on the client's side) until another ends, instead of growing the server's share."""
    limit = gateway.settings.grpc_max_concurrent_streams
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = _digit_request("held")
        held = [stub.ModelStreamInfer() for _ in range(limit)]
        for call in held:  # each is open on the server once it answered
            await call.write(request)
        for call in held:
            assert (await asyncio.wait_for(call.read(), 30)).error_message == ""
        extra = stub.ModelStreamInfer()

        async def answered() -> pb.ModelStreamInferResponse:
            await extra.write(request)  # waits, as the stream does, for room on the connection
            return await extra.read()

        answer = asyncio.ensure_future(answered())
        done, _ = await asyncio.wait({answer}, timeout=1.5)
        assert not done, "a call past the connection's stream limit was served"
        held[0].cancel()
        assert (await asyncio.wait_for(answer, 10)).error_message == ""
        for call in [*held, extra]:
            call.cancel()
