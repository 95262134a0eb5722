"""Slow, silent and greedy clients against a real gateway at the default limits: a stream
whose answers are never read, many calls on one connection, HTTP requests that never finish,
many HTTP connections, callers that hang up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from cnnserve.gateway.grpc_service import STREAM_MAX_PENDING
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.harness import (
    gateway_settings,
    holding_settings,
    metric,
    raw_bytes_elements,
    running_gateway,
    wait_for_metric,
)
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


async def _trickle(
    port: int, head: bytes, then: bytes, every_s: float = 1.0
) -> tuple[float, bytes]:
    """Send ``head``, then ``then`` one byte every ``every_s`` (a slowloris client) until
    the server closes the connection: how long it held it, and what it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = asyncio.get_running_loop().time()
    writer.write(head)

    async def drip() -> None:
        for byte in then:
            await asyncio.sleep(every_s)
            writer.write(bytes([byte]))

    dripping = asyncio.ensure_future(drip())
    try:
        answer = await asyncio.wait_for(reader.read(), 60)  # until the server closes
    finally:
        dripping.cancel()
        writer.close()
    return asyncio.get_running_loop().time() - started, answer


async def test_slow_headers_and_bodies_time_out(gateway: Gateway) -> None:
    """Slowloris: headers trickled a byte a second, and a POST whose body trickles after
    complete headers, are each answered 408 and closed at their deadline."""
    s = gateway.settings
    head = b"POST /v2/models/convnet/infer HTTP/1.1\r\nhost: gateway\r\n"
    headers, body = await asyncio.gather(
        _trickle(gateway.http_port, head, b"x-slow: " + b"y" * 100),
        _trickle(gateway.http_port, head + b"content-length: 1000\r\n\r\n{", b" " * 100),
    )
    for (held, answer), limit, what in (
        (headers, s.http_header_timeout_s, b"http_header_timeout_s"),
        (body, s.http_body_timeout_s, b"http_body_timeout_s"),
    ):
        assert limit <= held < limit + 3, (held, limit)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert what in answer, answer
    # A quick caller on the same listener meanwhile is unaffected.
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/live")
    assert reply.status_code == 200


async def test_http_connections_past_the_cap_are_refused(gateway: Gateway) -> None:
    """http_max_connections idle connections open: the next is answered 503 and closed
    before it sends anything; once they close, callers are served again."""
    limit = gateway.settings.http_max_connections
    opened = [await asyncio.open_connection("127.0.0.1", gateway.http_port) for _ in range(limit)]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"http_max_connections" in answer
    finally:
        for _, idle in opened:
            idle.close()
    async with httpx.AsyncClient() as client:
        for _ in range(50):  # the server sees the closes a moment later
            reply = await client.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/live")
            if reply.status_code == 200:
                break
            await asyncio.sleep(0.1)
    assert reply.status_code == 200


async def test_http_caller_gone_mid_queue_is_cancelled(model_repository: Path) -> None:
    """An HTTP caller hangs up while its request is queued: the request leaves the queue
    unseen by the model and counts as cancelled, as a cancelled gRPC call does."""
    async with (
        running_gateway(holding_settings(model_repository, 1500.0)) as gateway,
        httpx.AsyncClient() as client,
    ):
        port = gateway.metrics_port
        png = digit_png(4)[0]
        leaving = asyncio.ensure_future(
            client.post(f"http://127.0.0.1:{gateway.http_port}/predict/convnet", content=png)
        )
        await wait_for_metric(port, "cnnserve_queue_depth", 1, model="convnet")
        leaving.cancel()  # httpx closes the connection
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await wait_for_metric(
            port, "cnnserve_requests_total", 1, model="convnet", outcome="cancelled"
        )
        await asyncio.sleep(2.0)  # past the batch delay: had it stayed, it would have run
        assert await metric(port, "cnnserve_batch_size_sum", model="convnet") == 0
