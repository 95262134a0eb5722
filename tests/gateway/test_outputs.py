"""Feature maps as outputs, end to end: a real gateway over each in-process backend (ONNX
Runtime, TorchScript) called over gRPC and REST, every map held to the eager network's
(forward hooks, tests/feature_maps.py); computed only when named, in batches of their own;
refused before any compute when they would be over the request's byte budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio

from cnnserve.gateway.server import Gateway
from cnnserve.models.features import FEATURE_LAYERS
from cnnserve.models.registry import get_spec
from cnnserve.models.spec import Architecture
from cnnserve.models.steps import normalize
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.feature_maps import assert_close, demo_network, hooked_maps
from tests.gateway.harness import gateway_settings, running_gateway
from tests.gateway.test_grpc_service import image_request, outputs_of, rpc_error, tensor_request
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONVNET_LAYERS = FEATURE_LAYERS[Architecture.CONVNET]
FCN_LAYERS = FEATURE_LAYERS[Architecture.FCN]
#: Lone requests wait this long for company, so concurrent ones meet in batches for sure.
DELAY_MS = 100.0


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["onnxruntime", "torchscript"])
async def gateway(model_repository: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        model_repository,
        backend=request.param,
        max_batch_delay_ms=DELAY_MS,
        adaptive_batch_delay=False,
    )
    async with running_gateway(settings) as running:
        yield running


def asking(request: pb.ModelInferRequest, *names: str) -> pb.ModelInferRequest:
    """``request`` naming ``names`` as its outputs."""
    for name in names:
        request.outputs.add(name=name)
    return request


def items(side: int, count: int = 2) -> np.ndarray:
    return np.random.default_rng(side).uniform(-1, 1, (count, 3, side, side)).astype(np.float32)


def batches(gateway: Gateway, model: str) -> float:
    """Batches the gateway has run for ``model`` so far."""
    sample = gateway.core.metrics.registry.get_sample_value(
        "cnnserve_batch_size_count", {"model": model, "version": "1"}
    )
    return sample or 0.0


async def test_every_feature_map_matches_the_eager_network(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    for model, side, layers in (("convnet", 28, CONVNET_LAYERS), ("fcn", 23, FCN_LAYERS)):
        x = items(side)
        # Named in another order than the network's: answered in the order named.
        asked = layers[::-1]
        reply = await stub.ModelInfer(asking(tensor_request("input", x, model), *asked))
        got = outputs_of(reply)
        assert list(got) == list(asked)
        assert_close(got, hooked_maps(demo_network(model), x))


async def test_images_get_feature_maps_beside_other_outputs(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    cases = [
        ("fcn", [shapes_png(seed, side=40)[0] for seed in (3, 4)], ("mask", "conv1", "unsample2")),
        ("convnet", [digit_png(i)[0] for i in (1, 2, 3)], ("labels", "fc1", "pool1")),
    ]
    for model, pngs, asked in cases:
        spec = get_spec(model)
        reply = outputs_of(await stub.ModelInfer(asking(image_request(pngs, model), *asked)))
        assert list(reply) == list(asked)
        # The maps of the network input the gateway made of each image.
        x = np.stack([normalize(spec.image_to_pixels(png), spec.normalization) for png in pngs])
        eager = hooked_maps(demo_network(model), x)
        assert_close({name: reply[name] for name in asked[1:]}, eager)
        plain = outputs_of(await stub.ModelInfer(asking(image_request(pngs, model), asked[0])))
        np.testing.assert_array_equal(reply[asked[0]], plain[asked[0]])


async def test_rest_answers_feature_maps_like_any_output(gateway: Gateway) -> None:
    x = items(28, count=1)
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "pool2"}, {"name": "logits"}],
    }
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
        reply = await http.post("/v2/models/convnet/infer", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        pool2, logits = reply.json()["outputs"]
        meta = (await http.get("/v2/models/convnet")).json()
        config = (await http.get("/v2/models/convnet/config")).json()
    assert (pool2["name"], pool2["datatype"], pool2["shape"]) == ("pool2", "FP32", [1, 64, 7, 7])
    eager = hooked_maps(demo_network("convnet"), x)
    got = np.array(pool2["data"], np.float32).reshape(pool2["shape"])
    assert_close({"pool2": got}, eager)
    assert logits["name"] == "logits"
    listed = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert listed["fc1"] == [-1, 512]
    assert listed["conv2"] == [-1, 64, 14, 14]
    configured = {o["name"]: o["dims"] for o in config["output"]}
    assert configured["pool1"] == [32, 14, 14]


async def test_feature_requests_run_in_batches_apart_from_plain_ones(
    gateway: Gateway, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """Five concurrent requests: three plain ones share one batch, the two asking for feature
    maps another, which alone runs the feature artifact."""
    digits = [items(28, count=1) for _ in range(5)]
    before = batches(gateway, "convnet")
    calls = [asking(tensor_request("input", x, "convnet"), "logits") for x in digits[:3]]
    calls += [asking(tensor_request("input", x, "convnet"), "conv2") for x in digits[3:]]
    replies = await asyncio.gather(*(stub.ModelInfer(call, timeout=60) for call in calls))
    assert batches(gateway, "convnet") - before == 2
    network = demo_network("convnet")
    for x, reply in zip(digits, replies, strict=True):
        eager = hooked_maps(network, x)
        assert_close(outputs_of(reply), {"logits": eager["output"], "conv2": eager["conv2"]})


async def test_an_unknown_output_names_the_feature_maps(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    request = asking(tensor_request("input", items(9, count=1), "fcn"), "conv4")
    error = await rpc_error(stub.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid outputs: scores, mask, counts, conv1, conv2, conv3, unsample1, unsample2" in (
        error.details() or ""
    )


async def test_maps_over_the_byte_budget_are_refused_before_any_compute(
    model_repository: Path,
) -> None:
    """At the default settings, four maps of one 512×512 FCN image are refused from its
    header alone (no batch runs), the message saying what they weigh and what to ask instead."""
    png, _ = shapes_png(side=512)
    asked = ("conv1", "conv2", "unsample1", "unsample2")
    settings = gateway_settings(model_repository)
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        error = await rpc_error(stub.ModelInfer(asking(image_request([png], "fcn"), *asked)))
        shape = [1, 3, 512, 512]
        rest = await http.post(
            "/v2/models/fcn/infer",
            json={
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": shape, "data": [0] * 786432}
                ],
                "outputs": [{"name": name} for name in asked],
            },
            timeout=60,
        )
        assert batches(gateway, "fcn") == 0
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.details() or ""
    for part in (
        "conv1 [1,32,510,510], conv2 [1,64,508,508], unsample1 [1,64,508,508], "
        "unsample2 [1,32,510,510]",
        "are 198,714,368 bytes of FP32",
        "one request may take at most 268,435,456 bytes (256.0 MiB, max_request_bytes)",
        "ask for fewer images per request, one layer at a time, or send a smaller image",
    ):
        assert part in message, message
    assert rest.status_code == 400
    assert "are 198,714,368 bytes of FP32" in rest.json()["error"]
