"""The Python client against a real gateway, over gRPC and over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from cnnserve.client.inference import (
    InferenceClient,
    ServerError,
    connect,
    datatype_of,
)
from cnnserve.gateway.server import Gateway
from tests.gateway.harness import digit_pixels, gateway_settings, running_gateway
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module."""
    settings = gateway_settings(model_repository, max_batch_delay_ms=20.0)
    async with running_gateway(settings) as running:
        yield running


@pytest.fixture(params=["grpc", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each test runs over both transports."""
    return str(request.param)


def _client(gateway: Gateway, transport: str) -> InferenceClient:
    http = transport == "http"
    return connect("127.0.0.1", gateway.http_port if http else gateway.grpc_port, http=http)


async def test_classify(gateway: Gateway, transport: str) -> None:
    digits = [digit_png(i) for i in range(5)]
    with _client(gateway, transport) as client:
        assert await asyncio.to_thread(client.server_ready)
        results = await asyncio.to_thread(client.classify, [png for png, _ in digits])
    assert [r.label for r in results] == [str(label) for _, label in digits]
    assert all(0.5 < r.probability <= 1.0 for r in results)


async def test_segment(gateway: Gateway, transport: str) -> None:
    png, truth = shapes_png(4, side=36)
    with _client(gateway, transport) as client:
        mask = await asyncio.to_thread(client.segment, png)
    assert mask.shape == truth.shape
    assert mask.dtype == np.uint8
    assert mask.max() < 4


async def test_raw_tensor_infer(gateway: Gateway, transport: str) -> None:
    pixels, labels = digit_pixels([0, 1, 2])
    with _client(gateway, transport) as client:
        outputs = await asyncio.to_thread(
            client.infer, "convnet", {"pixels": pixels}, ["logits", "labels"]
        )
    assert outputs["logits"].shape == (3, 10)
    assert outputs["logits"].argmax(axis=1).tolist() == labels
    assert [row[0] for row in outputs["labels"]] == [str(x).encode() for x in labels]


async def test_server_errors_carry_status_and_message(gateway: Gateway, transport: str) -> None:
    with _client(gateway, transport) as client, pytest.raises(ServerError) as caught:
        await asyncio.to_thread(client.classify, [b"not an image"])
    assert caught.value.status == ("INVALID_ARGUMENT" if transport == "grpc" else "400")
    assert "could not decode image" in caught.value.message


async def test_unreachable_server_is_not_ready(transport: str) -> None:
    with connect("127.0.0.1", 1, http=transport == "http") as client:
        assert not await asyncio.to_thread(client.server_ready)


async def test_datatype_of() -> None:
    assert datatype_of(np.zeros(1, np.float32)) == "FP32"
    assert datatype_of(np.zeros(1, np.uint8)) == "UINT8"
    assert datatype_of(np.array([b"a"], dtype=object)) == "BYTES"
    with pytest.raises(ValueError, match="complex128"):
        datatype_of(np.zeros(1, np.complex128))
