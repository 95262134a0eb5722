"""The gRPC transport: a real ``grpc.aio`` gateway on a free port, called with real stubs.

Every RPC, each row of the error table, deadlines, streams with a failure in the middle,
batching under concurrency, health, reflection, and the unmodified ``tritonclient``.
"""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cnnserve.errors import GENERIC_INTERNAL_MESSAGE
from cnnserve.gateway.grpc_service import deadline_of
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import VIEW_MIN_BYTES
from tests.gateway.harness import (
    ExplodingBackend,
    digit_input,
    digit_pixels,
    exploding_core,
    gateway_settings,
    holding_settings,
    metric,
    raw_bytes_elements,
    running_gateway,
    wait_for_metric,
)
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

Stub = pb_grpc.GRPCInferenceServiceStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module; a short batch delay so batches form."""
    settings = gateway_settings(model_repository, max_batch_delay_ms=20.0, max_items_per_request=40)
    async with running_gateway(settings) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    """A fresh channel to the module's gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    """The inference stub."""
    return Stub(channel)


def image_request(
    pngs: list[bytes], model: str = "convnet", **fields: object
) -> pb.ModelInferRequest:
    """ModelInferRequest with the images as a raw BYTES ``image`` input."""
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name="image", datatype="BYTES", shape=[len(pngs)])
    request.raw_input_contents.append(raw_bytes_elements(pngs))
    return request


def tensor_request(name: str, array: np.ndarray, model: str = "convnet") -> pb.ModelInferRequest:
    """ModelInferRequest with one raw FP32/UINT8 input."""
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.uint8): "UINT8"}[array.dtype]
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Raw outputs decoded by hand, independently of the server's codec."""
    decoded: dict[str, np.ndarray] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        shape = tuple(tensor.shape)
        if tensor.datatype == "BYTES":
            items, offset = [], 0
            while offset < len(raw):
                (length,) = struct.unpack_from("<I", raw, offset)
                items.append(raw[offset + 4 : offset + 4 + length])
                offset += 4 + length
            decoded[tensor.name] = np.array(items, dtype=object).reshape(shape)
        else:
            dtype = {"FP32": "<f4", "UINT8": "u1", "INT64": "<i8"}[tensor.datatype]
            decoded[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return decoded


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    """The error an awaited call fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# --- health, metadata ---


async def test_server_live_and_ready(stub: Stub) -> None:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready


async def test_model_ready(stub: Stub) -> None:
    for model in ("convnet", "fcn"):
        assert (await stub.ModelReady(pb.ModelReadyRequest(name=model))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="convnet", version="1"))).ready
    error = await rpc_error(stub.ModelReady(pb.ModelReadyRequest(name="resnet")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "convnet, fcn" in (error.details() or "")


async def test_server_metadata(stub: Stub) -> None:
    metadata = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert metadata.name == "cnnserve"
    assert metadata.version
    assert "binary_tensor_data" in metadata.extensions


async def test_model_metadata(stub: Stub) -> None:
    convnet = await stub.ModelMetadata(pb.ModelMetadataRequest(name="convnet"))
    assert list(convnet.versions) == ["1"]
    assert convnet.platform == "onnxruntime_onnx"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in convnet.inputs}
    assert inputs == {
        "input": ("FP32", [-1, 3, 28, 28]),
        "pixels": ("UINT8", [-1, 3, 28, 28]),
        "image": ("BYTES", [-1, 1]),
    }
    assert [t.name for t in convnet.outputs] == [
        "logits",
        "probabilities",
        "labels",
        *("conv1", "pool1", "conv2", "pool2", "fc1"),
    ]
    fcn = await stub.ModelMetadata(pb.ModelMetadataRequest(name="fcn", version="1"))
    assert {t.name: list(t.shape) for t in fcn.inputs}["input"] == [-1, 3, -1, -1]
    assert {t.name: t.datatype for t in fcn.outputs} == {
        "scores": "FP32",
        "mask": "UINT8",
        "counts": "INT64",
        **dict.fromkeys(("conv1", "conv2", "conv3", "unsample1", "unsample2"), "FP32"),
    }
    error = await rpc_error(stub.ModelMetadata(pb.ModelMetadataRequest(name="fcn", version="7")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# --- inference ---


async def test_classifies_digit_images(stub: Stub) -> None:
    pngs = [digit_png(i) for i in range(4)]
    request = image_request([png for png, _ in pngs], id="digits")
    request.outputs.add(name="labels")
    response = await stub.ModelInfer(request)
    assert response.id == "digits"
    assert response.model_name == "convnet"
    labels = outputs_of(response)["labels"]
    assert labels.shape == (4, 1)
    assert [int(row[0]) for row in labels] == [label for _, label in pngs]


async def test_default_outputs_and_top_k(stub: Stub) -> None:
    png, label = digit_png(5)
    response = await stub.ModelInfer(image_request([png]))
    assert [o.name for o in response.outputs] == ["labels", "probabilities"]
    request = image_request([png])
    request.outputs.add(name="labels").parameters["top_k"].int64_param = 3
    ranked = outputs_of(await stub.ModelInfer(request))["labels"]
    assert ranked.shape == (1, 3)
    assert int(ranked[0, 0]) == label


async def test_fp32_uint8_and_typed_inputs_agree(stub: Stub) -> None:
    pixels, labels = digit_pixels([0, 1])
    tensor, _ = digit_input([0, 1])
    by_pixels = tensor_request("pixels", pixels)
    by_tensor = tensor_request("input", tensor)
    typed = pb.ModelInferRequest(model_name="convnet")
    typed.inputs.add(
        name="input", datatype="FP32", shape=tensor.shape
    ).contents.fp32_contents.extend(tensor.ravel().tolist())
    logits = []
    for request in (by_pixels, by_tensor, typed):
        request.outputs.add(name="logits")
        logits.append(outputs_of(await stub.ModelInfer(request))["logits"])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    np.testing.assert_array_equal(logits[1], logits[2])
    assert logits[0].argmax(axis=1).tolist() == labels


async def test_fcn_mask_and_counts(stub: Stub) -> None:
    png, truth = shapes_png(3, side=48)
    request = image_request([png, png], model="fcn")
    request.outputs.add(name="mask")
    request.outputs.add(name="counts")
    outputs = outputs_of(await stub.ModelInfer(request))
    assert outputs["mask"].shape == (2, 48, 48) == (2, *truth.shape)
    assert outputs["counts"].shape == (2, 4)
    assert outputs["counts"].sum(axis=1).tolist() == [48 * 48, 48 * 48]
    np.testing.assert_array_equal(
        outputs["counts"][0], np.bincount(outputs["mask"][0].ravel(), minlength=4)
    )


async def test_uneven_concurrent_requests_get_their_own_rows(stub: Stub) -> None:
    """Requests of 2, 3 and 1 items batched together each get exactly their own answers."""
    sizes = (2, 3, 1)
    starts = (0, 2, 5)
    single = tensor_request("input", digit_input(range(6))[0])
    single.outputs.add(name="logits")
    expected = outputs_of(await stub.ModelInfer(single))["logits"]
    requests = []
    for start, size in zip(starts, sizes, strict=True):
        request = tensor_request("input", digit_input(range(start, start + size))[0])
        request.outputs.add(name="logits")
        requests.append(request)
    responses = await asyncio.gather(*(stub.ModelInfer(r) for r in requests))
    for start, size, response in zip(starts, sizes, responses, strict=True):
        got = outputs_of(response)["logits"]
        assert got.shape == (size, 10)
        np.testing.assert_allclose(got, expected[start : start + size], atol=1e-5)


async def test_requests_read_in_place_share_batches_and_streams(stub: Stub) -> None:
    """Requests over VIEW_MIN_BYTES keep their tensors in the received bytes: of 5, 7 and 4
    items (uneven, concurrent, batched together), over ModelInfer and ModelStreamInfer,
    each gets exactly its own rows, the rows of one request carrying all 16."""
    sizes = (5, 7, 4)
    assert min(sizes) * 3 * 28 * 28 * 4 >= VIEW_MIN_BYTES
    tensor, _ = digit_input(range(sum(sizes)))
    whole = tensor_request("input", tensor)
    whole.outputs.add(name="logits")
    expected = outputs_of(await stub.ModelInfer(whole))["logits"]
    requests = []
    start = 0
    for index, size in enumerate(sizes):
        request = tensor_request("input", tensor[start : start + size])
        request.id = str(index)
        request.outputs.add(name="logits")
        requests.append((start, size, request))
        start += size
    unary = await asyncio.gather(*(stub.ModelInfer(r) for _, _, r in requests))
    streamed = {
        a.infer_response.id: a.infer_response
        async for a in stub.ModelStreamInfer(iter([r for _, _, r in requests]))
    }
    for (start, size, request), response in zip(requests, unary, strict=True):
        for answer in (response, streamed[request.id]):
            got = outputs_of(answer)["logits"]
            np.testing.assert_allclose(got, expected[start : start + size], atol=1e-5)


async def test_a_request_larger_than_a_batch(stub: Stub, gateway: Gateway) -> None:
    assert gateway.settings.max_batch_size < 40
    tensor, labels = digit_input(list(range(10)) * 4)
    request = tensor_request("input", tensor)
    request.outputs.add(name="logits")
    logits = outputs_of(await stub.ModelInfer(request))["logits"]
    assert logits.shape == (40, 10)
    assert (logits.argmax(axis=1) == labels).mean() > 0.9


async def test_concurrent_callers_form_batches(stub: Stub, gateway: Gateway) -> None:
    port = gateway.metrics_port
    before_count = await metric(port, "cnnserve_batch_size_count", model="convnet")
    before_sum = await metric(port, "cnnserve_batch_size_sum", model="convnet")
    png, label = digit_png(2)
    responses = await asyncio.gather(*(stub.ModelInfer(image_request([png])) for _ in range(48)))
    assert all(int(outputs_of(r)["labels"][0, 0]) == label for r in responses)
    batches = await metric(port, "cnnserve_batch_size_count", model="convnet") - before_count
    items = await metric(port, "cnnserve_batch_size_sum", model="convnet") - before_sum
    assert items == 48
    assert batches < 48, "48 concurrent callers never shared a batch"


async def test_stream_answers_every_request_and_survives_an_error(stub: Stub) -> None:
    png, label = digit_png(3)
    requests = [
        image_request([png], id="first"),
        image_request([png], model="resnet", id="unknown-model"),
        image_request([b"not an image"], id="bad-image"),
        image_request([png, png], id="last"),
    ]
    answers = {}
    async for answer in stub.ModelStreamInfer(iter(requests)):
        answers[answer.infer_response.id] = answer
    assert set(answers) == {"first", "unknown-model", "bad-image", "last"}
    assert "unknown model 'resnet'" in answers["unknown-model"].error_message
    assert "image 0: could not decode image" in answers["bad-image"].error_message
    for ok, rows in (("first", 1), ("last", 2)):
        assert answers[ok].error_message == ""
        labels = outputs_of(answers[ok].infer_response)["labels"]
        assert [int(x) for x in labels[:, 0]] == [label] * rows


# --- the error table ---


async def test_invalid_input_is_invalid_argument(stub: Stub) -> None:
    wrong = tensor_request("input", np.zeros((1, 3, 32, 32), dtype=np.float32))
    error = await rpc_error(stub.ModelInfer(wrong))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "convnet expects FP32 [N,3,28,28], got FP32 [1,3,32,32]"
    short = tensor_request("input", np.zeros((1, 3, 28, 28), dtype=np.float32))
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    error = await rpc_error(stub.ModelInfer(short))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 9408 bytes of raw data, got 9404" in (error.details() or "")
    error = await rpc_error(stub.ModelInfer(image_request([b"\x89PNG broken"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = image_request([digit_png(0)[0]])
    request.outputs.add(name="mask")
    error = await rpc_error(stub.ModelInfer(request))
    assert "unknown output 'mask' for convnet" in (error.details() or "")


async def test_unknown_model_is_not_found(stub: Stub) -> None:
    error = await rpc_error(stub.ModelInfer(image_request([b"x"], model="resnet")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_too_many_items_is_resource_exhausted(stub: Stub) -> None:
    request = tensor_request("pixels", np.zeros((41, 3, 28, 28), dtype=np.uint8))
    error = await rpc_error(stub.ModelInfer(request))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "41 items; the limit is 40" in (error.details() or "")


async def test_expired_timeout_parameter_is_deadline_exceeded(model_repository: Path) -> None:
    # A long batch delay keeps a lone request queued well past its 50 ms budget.
    settings = holding_settings(model_repository, 2000.0)
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        request = image_request([digit_png(0)[0]])
        request.parameters["timeout"].int64_param = 50_000
        error = await rpc_error(Stub(channel).ModelInfer(request))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline exceeded" in (error.details() or "")


async def test_grpc_deadline_becomes_the_request_deadline() -> None:
    """deadline_of turns the caller's gRPC timeout into a monotonic instant (a real server)."""
    seen: list[float | None] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        deadline = deadline_of(context)
        seen.append(None if deadline is None else deadline - time.monotonic())
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/M")
            await call(b"", timeout=30)
            await call(b"")
    finally:
        await server.stop(None)
    remaining, none = seen
    assert remaining is not None and 0 < remaining <= 30
    assert none is None


async def test_full_queue_is_resource_exhausted_at_once(model_repository: Path) -> None:
    settings = holding_settings(model_repository, 1500.0, max_batch_size=8, max_queue_size=4)
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = Stub(channel)
        pixels = np.zeros((3, 3, 28, 28), dtype=np.uint8)
        waiting = asyncio.ensure_future(stub.ModelInfer(tensor_request("pixels", pixels)))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 3, model="convnet")
        error = await rpc_error(stub.ModelInfer(tensor_request("pixels", pixels[:2])))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in (error.details() or "")
        assert len((await waiting).outputs) == 2  # the queued one is still answered


async def test_a_caller_gone_mid_queue_strands_no_one(model_repository: Path) -> None:
    """A client cancels while queued with another: the other is answered, the gone one never
    computed (counted as cancelled)."""
    settings = holding_settings(model_repository, 1500.0)
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = Stub(channel)
        pixels, labels = digit_pixels([0, 1])
        leaving = stub.ModelInfer(tensor_request("pixels", pixels[:1]))
        staying = asyncio.ensure_future(stub.ModelInfer(tensor_request("pixels", pixels[1:])))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 2, model="convnet")
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        answer = outputs_of(await staying)
        assert [int(x) for x in answer["labels"][:, 0]] == labels[1:]
        await wait_for_metric(
            gateway.metrics_port, "cnnserve_requests_total", 1, model="convnet", outcome="cancelled"
        )
        assert await metric(gateway.metrics_port, "cnnserve_batch_size_sum", model="convnet") == 1


async def test_message_over_the_limit_is_resource_exhausted(model_repository: Path) -> None:
    settings = gateway_settings(model_repository, max_message_bytes=64 * 1024)
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = Stub(channel)
        big = tensor_request("input", np.zeros((8, 3, 28, 28), dtype=np.float32))  # 75 KB
        error = await rpc_error(stub.ModelInfer(big))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = tensor_request("input", np.zeros((2, 3, 28, 28), dtype=np.float32))
        assert len((await stub.ModelInfer(small)).outputs) == 2


async def test_draining_serves_accepted_calls_and_is_not_serving(model_repository: Path) -> None:
    """The data plane drains (here without the gateway's GOAWAY): a unary call that reaches
    the servicer was accepted before the GOAWAY, so it is served; a new request on a stream
    is answered UNAVAILABLE in the stream; readiness and health say not serving."""
    async with (
        running_gateway(gateway_settings(model_repository)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        gateway.core.begin_drain()
        request = image_request([digit_png(0)[0]])
        assert (await Stub(channel).ModelInfer(request)).outputs

        async def one_request() -> AsyncIterator[pb.ModelInferRequest]:
            yield request

        (refused,) = [r async for r in Stub(channel).ModelStreamInfer(one_request())]
        assert "not accepting requests" in refused.error_message
        assert not (await Stub(channel).ServerReady(pb.ServerReadyRequest())).ready
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        model = health_pb2.HealthCheckRequest(service="convnet")
        assert (await health.Check(model)).status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_unexpected_failure_is_internal_without_details(
    model_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(model_repository)
    async with (
        running_gateway(settings, exploding_core(settings)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        error = await rpc_error(Stub(channel).ModelInfer(image_request([digit_png(0)[0]])))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == GENERIC_INTERNAL_MESSAGE
    assert ExplodingBackend.SECRET in caplog.text  # the details are logged, not sent


# --- health and reflection ---


async def test_health_per_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "inference.GRPCInferenceService", "convnet", "fcn"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == serving, service
    error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="resnet")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service="fcn"))
    first = await anext(aiter(watch))
    watch.cancel()
    assert first.status == serving


async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel) -> None:
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.GRPCInferenceService"
        ),
    ]
    replies = [reply async for reply in reflect.ServerReflectionInfo(iter(asks))]
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in replies[1].file_descriptor_response.file_descriptor_proto
    ]
    methods = {m.name for f in files for s in f.service for m in s.method}
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata"} <= methods


# --- a standard client, unmodified ---

# tritonclient's stubs declare the same inference.* protobuf symbols as ours, so the client
# runs in its own interpreter (as any client program would).
TRITON_GRPC_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, pngs = sys.argv[1], [bytes.fromhex(h) for h in sys.argv[2:]]
client = grpcclient.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("convnet")}
meta = client.get_model_metadata("convnet", as_json=True)
out["inputs"] = [i["name"] for i in meta["inputs"]]
images = grpcclient.InferInput("image", [len(pngs)], "BYTES")
images.set_data_from_numpy(np.array(pngs, dtype=np.object_))
wanted = [grpcclient.InferRequestedOutput("labels"),
          grpcclient.InferRequestedOutput("probabilities", class_count=2)]
result = client.infer("convnet", [images], outputs=wanted)
out["labels"] = [row[0].decode() for row in result.as_numpy("labels")]
out["classes"] = [row[0].decode() for row in result.as_numpy("probabilities")]
pixels = grpcclient.InferInput("pixels", [1, 3, 28, 28], "UINT8")
pixels.set_data_from_numpy(np.zeros((1, 3, 28, 28), dtype=np.uint8))
out["logits_shape"] = list(client.infer("convnet", [pixels], outputs=[
    grpcclient.InferRequestedOutput("logits")]).as_numpy("logits").shape)
try:
    client.get_model_metadata("resnet")
except InferenceServerException as exc:
    out["error"] = exc.status()
streamed = []
client.start_stream(callback=lambda result, error: streamed.append(
    str(error) if error else result.as_numpy("labels")[0][0].decode()))
client.async_stream_infer("convnet", [images], request_id="s1")
client.stop_stream()
out["streamed"] = streamed
print(json.dumps(out))
"""


async def test_tritonclient_grpc_works_unmodified(gateway: Gateway) -> None:
    digits = [digit_png(i) for i in (0, 1, 2)]
    argv = [sys.executable, "-c", TRITON_GRPC_SCRIPT, f"127.0.0.1:{gateway.grpc_port}"]
    argv += [png.hex() for png, _ in digits]
    completed = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout)
    truth = [str(label) for _, label in digits]
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    assert out["inputs"] == ["input", "pixels", "image"]
    assert out["labels"] == truth
    # Triton's classification extension: "<probability>:<index>:<label>", best first.
    assert [c.split(":")[2] for c in out["classes"]] == truth
    assert out["logits_shape"] == [1, 10]
    assert out["error"] == "StatusCode.NOT_FOUND"
    assert out["streamed"] == [truth[0]]
