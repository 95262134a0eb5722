"""Images travel encoded through the batcher and are decoded a batch at a time in the decode
processes: a real ``grpc.aio`` gateway at its default settings (onnxruntime), real stubs,
concurrent callers of 2, 3 and 1 images."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from cnnserve.gateway.dataplane import DataPlane, create_core
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.harness import gateway_settings, metric, running_gateway
from tests.gateway.test_grpc_service import image_request, outputs_of
from tests.images import digit_png, png_declaring, shapes_png
from tests.support import wait_until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

Stub = pb_grpc.GRPCInferenceServiceStub


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(model_repository: Path) -> AsyncIterator[tuple[Gateway, DataPlane]]:
    """One gateway at the default settings, and its data plane."""
    settings = gateway_settings(model_repository)
    core = await create_core(settings)
    async with running_gateway(settings, core) as gateway:
        yield gateway, core


@pytest_asyncio.fixture(loop_scope="module")
async def stub(served: tuple[Gateway, DataPlane]) -> AsyncIterator[Stub]:
    """An inference stub on a fresh channel to the module's gateway."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served[0].grpc_port}") as channel:
        yield Stub(channel)


def garbled(png: bytes) -> bytes:
    """``png`` with a valid header and its image data zeroed: only a decode finds out."""
    middle = len(png) // 2
    return png[:middle] + bytes(len(png) - middle)


def asking(request: pb.ModelInferRequest, output: str) -> pb.ModelInferRequest:
    """``request`` asking for ``output`` only."""
    request.outputs.add(name=output)
    return request


async def answers(stub: Stub, requests: list[pb.ModelInferRequest]) -> list[object]:
    """Every request sent at once; each one's output array, or the error it got."""
    replies = await asyncio.gather(*(stub.ModelInfer(r) for r in requests), return_exceptions=True)
    return [
        r if isinstance(r, BaseException) else next(iter(outputs_of(r).values())) for r in replies
    ]


async def test_a_garbled_image_fails_only_its_caller(
    stub: Stub, served: tuple[Gateway, DataPlane]
) -> None:
    digits = [digit_png(i)[0] for i in range(12)]
    # Twelve callers of 2, 3 and 1 images; the fifth caller's third image is garbled.
    counts = [2, 3, 1] * 4
    starts = [sum(counts[:i]) for i in range(len(counts))]
    groups = [[digits[(s + j) % 12] for j in range(c)] for s, c in zip(starts, counts, strict=True)]
    alone = [outputs_of(await stub.ModelInfer(asking(image_request(g), "logits"))) for g in groups]
    broken = [*groups[4][:2], garbled(groups[4][2])]
    requests = [
        asking(image_request(broken if i == 4 else g), "logits") for i, g in enumerate(groups)
    ]
    port = served[0].metrics_port
    batches_before = await metric(port, "cnnserve_batch_size_count", model="convnet")
    got = await answers(stub, requests)
    batches = await metric(port, "cnnserve_batch_size_count", model="convnet") - batches_before
    failed = got[4]
    assert isinstance(failed, grpc.aio.AioRpcError)
    assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.details().startswith("image 2: could not decode image")
    for index, result in enumerate(got):
        if index != 4:
            assert isinstance(result, np.ndarray), result
            np.testing.assert_allclose(result, alone[index]["logits"], atol=1e-4)
    # The broken request shared a batch with others: fewer batches than callers.
    assert batches < len(requests)


async def test_fcn_images_of_two_sizes_never_share_a_batch(stub: Stub) -> None:
    sizes = [40, 48, 40, 48, 40, 48]
    counts = [2, 3, 1, 2, 3, 1]
    groups = [
        [shapes_png(seed=10 * i + j, side=side)[0] for j in range(count)]
        for i, (side, count) in enumerate(zip(sizes, counts, strict=True))
    ]
    requests = [asking(image_request(g, model="fcn"), "scores") for g in groups]
    alone = [outputs_of(await stub.ModelInfer(r))["scores"] for r in requests]
    got = await answers(stub, requests)
    # An image decoded in a batch of the other size would have been refused from its header.
    for side, count, result, expected in zip(sizes, counts, got, alone, strict=True):
        assert isinstance(result, np.ndarray), result
        assert result.shape[0] == count and result.shape[2:] == (side, side)
        np.testing.assert_allclose(result, expected, atol=1e-4)


async def test_a_killed_decode_process_fails_only_its_batch(
    stub: Stub, served: tuple[Gateway, DataPlane]
) -> None:
    core = served[1]
    digits = [digit_png(i)[0] for i in range(8)]
    # Eight images are shared by both decode processes, so both are running.
    await stub.ModelInfer(image_request(digits))
    pids = core.images.pids()
    assert len(pids) == core.settings.decode_processes == 2
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    held = asyncio.ensure_future(stub.ModelInfer(image_request(digits[:1])))
    await wait_until_async(core.images.holding, 30, "a decode process holding it")
    [victim] = core.images.holding()
    os.kill(victim, signal.SIGKILL)
    for pid in pids:
        if pid != victim:
            os.kill(pid, signal.SIGCONT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await held
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "died" in str(caught.value.details())
    got = await answers(stub, [asking(image_request(digits[:n]), "labels") for n in (2, 3, 1, 8)])
    assert all(isinstance(r, np.ndarray) for r in got), got
    assert victim not in core.images.pids()


async def test_header_and_memory_checks_refuse_before_anything_is_decoded(
    model_repository: Path,
) -> None:
    # A gateway of its own: its decode processes start with the first batch of images.
    settings = gateway_settings(model_repository)
    core = await create_core(settings)
    async with (
        running_gateway(settings, core) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = Stub(channel)
        scene, _ = shapes_png(side=40)
        refused = [
            image_request([png_declaring(2048, 2048)]),  # over the ConvNet's PNG size
            image_request([png_declaring(512, 512)] * 64, model="fcn"),  # over the budget
            image_request([scene, png_declaring(41, 40)], model="fcn"),  # two sizes
            image_request([b"GIF89a" + bytes(20)]),
        ]
        got = await answers(stub, refused)
        assert core.images.pids() == []
    for result in got:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.INVALID_ARGUMENT, result.details()
    assert "at most 1048576 pixels" in str(got[0].details())
    assert "max_request_bytes" in str(got[1].details())
    assert "must share one size" in str(got[2].details())
