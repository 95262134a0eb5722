"""The shared batcher in one event loop: a real batching server (ONNX Runtime) on a Unix
socket, and real gateways over frontend data planes, called with real ``grpc.aio`` stubs.

The processes themselves (supervisor, kills, SIGTERM) are tested in test_processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from cnnserve.gateway.backends import create_backend
from cnnserve.gateway.batching_process import BatchingServer, socket_file
from cnnserve.gateway.metrics import GatewayMetrics
from cnnserve.gateway.remote_backend import create_frontend_core
from cnnserve.gateway.server import Gateway
from cnnserve.models.runtime import load_runner
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from tests.feature_maps import assert_close, demo_network, hooked_maps
from tests.gateway.harness import digit_input, gateway_settings
from tests.gateway.test_grpc_service import image_request, outputs_of, tensor_request
from tests.images import digit_png
from tests.support import wait_until_async

pytestmark = pytest.mark.asyncio


@dataclass
class Shared:
    """A batching server and the frontends feeding it."""

    server: BatchingServer
    frontends: list[Gateway]

    def stubs(self) -> list[pb_grpc.GRPCInferenceServiceStub]:
        """One stub per frontend, each on its own channel (closed with the fixture)."""
        return [
            pb_grpc.GRPCInferenceServiceStub(
                grpc.aio.insecure_channel(f"127.0.0.1:{frontend.grpc_port}")
            )
            for frontend in self.frontends
        ]

    def sample(self, name: str, model: str = "convnet") -> float:
        """A metric of the batching process (0 when it has no such sample)."""
        value = self.server.metrics.registry.get_sample_value(
            name, {"model": model, "version": "1"}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def shared_batcher(settings: Settings, frontends: int) -> AsyncIterator[Shared]:
    """A batching server and ``frontends`` started gateways over it."""
    # A short directory: a Unix socket's path has at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="cnnserve-test-") as directory:
        server = BatchingServer(settings, create_backend(settings), GatewayMetrics())
        await server.start(socket_file(directory))
        gateways: list[Gateway] = []
        try:
            for _ in range(frontends):
                gateway = Gateway(settings, create_frontend_core(settings, socket_file(directory)))
                await gateway.start()
                gateways.append(gateway)
            yield Shared(server, gateways)
        finally:
            for gateway in gateways:
                await gateway.stop(5.0)
            await server.stop(5.0)


def logits_request(batch: np.ndarray) -> pb.ModelInferRequest:
    """A ConvNet request for the raw ``logits`` of ``batch``."""
    request = tensor_request("input", batch)
    request.outputs.add(name="logits")
    return request


def reference_logits(model_repository: Path, batch: np.ndarray) -> np.ndarray:
    """The ConvNet's logits straight from ONNX Runtime, no gateway in between."""
    runner = load_runner(model_repository / "convnet" / "1" / "model.onnx", "onnx", "cpu")
    return runner.infer(batch)


async def test_two_frontends_load_once_and_answer_concurrent_callers_right(
    model_repository: Path,
) -> None:
    settings = gateway_settings(model_repository, max_batch_delay_ms=20.0)
    async with shared_batcher(settings, frontends=2) as shared:
        # Each version loaded once, held by both frontends.
        holds = shared.server.models.holds()
        assert sorted(key.split("/")[0] for key in holds) == ["convnet", "fcn"]
        assert set(holds.values()) == {2}
        sizes = [2, 3, 1] * 8
        inputs = [digit_input(range(i, i + n))[0] for i, n in enumerate(sizes)]
        stubs = shared.stubs()
        replies = await asyncio.gather(
            *(
                stubs[i % 2].ModelInfer(logits_request(batch), timeout=60)
                for i, batch in enumerate(inputs)
            )
        )
        for batch, reply in zip(inputs, replies, strict=True):
            logits = outputs_of(reply)["logits"]
            np.testing.assert_allclose(logits, reference_logits(model_repository, batch), atol=1e-4)
        # Every item ran in the batching process's batches; requests met in them.
        assert shared.sample("cnnserve_batch_size_sum") == sum(sizes)
        assert shared.sample("cnnserve_batch_size_count") < len(sizes)
        # Each frontend counted its own requests.
        counts = [
            f.core.metrics.registry.get_sample_value(
                "cnnserve_requests_total",
                {"model": "convnet", "version": "1", "outcome": "success"},
            )
            for f in shared.frontends
        ]
        assert counts == [len(sizes) / 2] * 2


async def test_encoded_images_are_decoded_in_the_batching_process_and_fail_alone(
    model_repository: Path,
) -> None:
    settings = gateway_settings(model_repository, max_batch_delay_ms=20.0)
    async with shared_batcher(settings, frontends=2) as shared:
        digits = [digit_png(i) for i in range(6)]
        sizes = [2, 3, 1] * 4
        requests = [[digits[(i + k) % 6] for k in range(n)] for i, n in enumerate(sizes)]
        # Its header is whole (the frontend prices it), its pixels are cut short: only the
        # decoder, in the batching process, finds out.
        broken = digits[0][0][: len(digits[0][0]) // 2]
        stubs = shared.stubs()
        calls = [
            stubs[i % 2].ModelInfer(image_request([png for png, _ in pngs]), timeout=60)
            for i, pngs in enumerate(requests)
        ]
        calls.append(stubs[1].ModelInfer(image_request([digits[1][0], broken]), timeout=60))
        replies = await asyncio.gather(*calls, return_exceptions=True)
        failed = replies.pop()
        assert isinstance(failed, grpc.aio.AioRpcError)
        assert failed.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1" in (failed.details() or "")
        for pngs, reply in zip(requests, replies, strict=True):
            assert isinstance(reply, pb.ModelInferResponse)
            labels = outputs_of(reply)["labels"]
            assert [int(x) for x in labels[:, 0]] == [label for _, label in pngs]
        assert shared.sample("cnnserve_batch_size_sum") == sum(sizes) + 2


async def test_deadline_travels_and_cancelled_callers_items_leave_the_shared_queue(
    model_repository: Path,
) -> None:
    # Batches wait 2 s for company: requests sit in the batching process's queue meanwhile.
    settings = gateway_settings(
        model_repository, max_batch_delay_ms=2000.0, adaptive_batch_delay=False
    )
    async with shared_batcher(settings, frontends=1) as shared:
        (stub,) = shared.stubs()
        batch = digit_input([0, 1, 2])[0]
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.ModelInfer(tensor_request("input", batch), timeout=0.3)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Counted once, where it expired: in the batching process.
        assert shared.sample("cnnserve_expired_before_compute_total") == 1
        frontend_expired = shared.frontends[0].core.metrics.registry.get_sample_value(
            "cnnserve_expired_before_compute_total", {"model": "convnet", "version": "1"}
        )
        assert frontend_expired == 0

        call = stub.ModelInfer(tensor_request("input", batch), timeout=60)
        await wait_until_async(
            lambda: shared.sample("cnnserve_queue_depth") == 3, 30, "the request to queue"
        )
        call.cancel()
        await wait_until_async(
            lambda: shared.sample("cnnserve_queue_depth") == 0, 30, "its items to leave"
        )
        # Neither request's items ever reached the model.
        assert shared.sample("cnnserve_batch_size_count") == 0
        assert await call.code() == grpc.StatusCode.CANCELLED


async def test_a_stopped_batching_server_answers_unavailable_and_liveness_turns_false(
    model_repository: Path,
) -> None:
    settings = gateway_settings(model_repository)
    async with shared_batcher(settings, frontends=1) as shared:
        (stub,) = shared.stubs()
        frontend = shared.frontends[0]
        await stub.ModelInfer(tensor_request("input", digit_input([0, 1])[0]), timeout=60)
        assert frontend.core.server_live()
        await shared.server.stop(5.0)
        await wait_until_async(lambda: not frontend.core.server_live(), 30, "liveness to turn")
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await stub.ModelInfer(tensor_request("input", digit_input([3])[0]), timeout=60)
        assert later.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_repository_load_or_unload_on_one_frontend_reaches_the_others(
    model_repository: Path,
) -> None:
    settings = gateway_settings(
        model_repository, model_control_mode="explicit", load_models=["convnet"]
    )
    async with shared_batcher(settings, frontends=2) as shared:
        first, second = shared.stubs()

        async def ready_on_second(name: str) -> bool:
            reply = await second.ModelReady(pb.ModelReadyRequest(name=name), timeout=10)
            return bool(reply.ready)

        assert not await ready_on_second("fcn")
        await first.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="fcn"))
        await wait_until_async(lambda: ready_on_second("fcn"), 30, "fcn on the second frontend")
        # Loaded once, held by both frontends.
        holds = shared.server.models.holds()
        assert [refs for key, refs in holds.items() if key.startswith("fcn/")] == [2]

        await first.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="fcn"))
        await wait_until_async(
            lambda: not any(k.startswith("fcn/") for k in shared.server.models.holds()),
            30,
            "fcn to be unloaded by both frontends",
        )
        assert not await ready_on_second("fcn")


async def test_feature_maps_through_the_shared_batcher(model_repository: Path) -> None:
    """Requests for feature maps from both frontends run in the batching process's batches
    (their own, beside plain ones) and come back as the eager network's maps."""
    settings = gateway_settings(
        model_repository, max_batch_delay_ms=50.0, adaptive_batch_delay=False
    )
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 17, 19)).astype(np.float32)
    eager = hooked_maps(demo_network("fcn"), x)
    digits, _ = digit_input(range(3))
    async with shared_batcher(settings, frontends=2) as shared:
        stubs = shared.stubs()
        features = [tensor_request("input", x, "fcn") for _ in stubs]
        for request, name in zip(features, ("conv3", "unsample1"), strict=True):
            request.outputs.add(name=name)
        replies = await asyncio.gather(
            *(stub.ModelInfer(r, timeout=60) for stub, r in zip(stubs, features, strict=True)),
            stubs[0].ModelInfer(logits_request(digits), timeout=60),
        )
    for reply in replies[:2]:
        assert_close(outputs_of(reply), eager)
    np.testing.assert_allclose(
        outputs_of(replies[2])["logits"], reference_logits(model_repository, digits), atol=1e-4
    )
