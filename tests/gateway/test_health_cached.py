"""Health checks read a cached readiness: a real gateway whose backend has one worker that
probes wait for, as TorchServe's do, called at the default settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.gateway.dataplane import DataPlane
from cnnserve.gateway.grpc_service import HEALTH_MAX_WATCHES
from cnnserve.gateway.readiness import PROBE_TIMEOUT_S, REFRESH_INTERVAL_S
from cnnserve.gateway.server import Gateway
from cnnserve.models.repository import ModelVersion
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.gateway.harness import StubBackend, digit_pixels, gateway_settings, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Seconds one batch holds the worker.
BATCH_S = 0.5


class OneWorkerBackend(StubBackend):
    """One worker: a batch holds it ``BATCH_S``; a readiness probe waits for it too."""

    def __init__(self) -> None:
        self.worker = asyncio.Lock()
        self.probes = 0
        self.answering = True

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """Zero logits for every item, after ``BATCH_S`` on the worker."""
        async with self.worker:
            await asyncio.sleep(BATCH_S)
            return np.zeros((len(batch), 10), dtype=np.float32)

    async def ready(self, model: ModelVersion) -> bool:
        """Counted; answered by the worker once it is free."""
        self.probes += 1
        async with self.worker:
            return self.answering

    def describe(self) -> str:
        """Platform name for metadata."""
        return "one-worker"

    def decodes_images(self, model: ModelVersion) -> bool:
        return False

    def takes_pixels(self, model: ModelVersion) -> bool:
        """Float32 batches only."""
        return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """A gateway at the default settings (free ports) over :class:`OneWorkerBackend`."""
    settings = gateway_settings(model_repository)
    async with running_gateway(settings, DataPlane(settings, OneWorkerBackend())) as running:
        yield running


def _backend(gateway: Gateway) -> OneWorkerBackend:
    backend = gateway.core.backend
    assert isinstance(backend, OneWorkerBackend)
    return backend


async def test_health_calls_run_no_probe(gateway: Gateway) -> None:
    """300 readiness calls (HTTP, ServerReady, grpc.health Check) cost the background
    refreshes' probes only — before, each call probed every model."""
    backend = _backend(gateway)
    before, started = backend.probes, time.monotonic()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        oip = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            assert (await http.get("/v2/health/ready")).status_code == 200
            assert (await oip.ServerReady(pb.ServerReadyRequest())).ready
            check = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    refreshes = (time.monotonic() - started) / REFRESH_INTERVAL_S + 1
    models = len(gateway.core.models.served_versions())
    assert backend.probes - before <= refreshes * models, backend.probes - before


async def test_readiness_holds_under_load(gateway: Gateway) -> None:
    """Callers keep the one worker busy: readiness answers at once, and stays ready —
    before, each check waited for the worker behind the batches (past a probe's 1 s)."""
    pixels, _ = digit_pixels([0])
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=1.0) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                await stub.ModelInfer(request)

        callers = [asyncio.ensure_future(caller()) for _ in range(4)]
        try:
            slowest = 0.0
            deadline = time.monotonic() + 3 * REFRESH_INTERVAL_S
            while time.monotonic() < deadline:
                asked = time.monotonic()
                assert (await http.get("/v2/health/ready")).status_code == 200
                slowest = max(slowest, time.monotonic() - asked)
                await asyncio.sleep(0.1)
            assert slowest < 0.25, slowest
        finally:
            stop.set()
            await asyncio.gather(*callers)


async def test_a_backend_that_stops_answering_turns_not_ready(gateway: Gateway) -> None:
    """The background probe still sees a backend that no longer answers (and its return)."""
    backend = _backend(gateway)

    async def status_within(expected: int, within_s: float) -> None:
        give_up = time.monotonic() + within_s
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
            while (await http.get("/v2/health/ready")).status_code != expected:
                assert time.monotonic() < give_up, f"readiness not {expected} in {within_s} s"
                await asyncio.sleep(0.1)

    backend.answering = False
    try:
        await status_within(503, 2 * REFRESH_INTERVAL_S + PROBE_TIMEOUT_S)
    finally:
        backend.answering = True
    await status_within(200, 2 * REFRESH_INTERVAL_S + PROBE_TIMEOUT_S)


async def test_health_watch_streams_are_bounded(gateway: Gateway) -> None:
    """HEALTH_MAX_WATCHES Watch streams open: one more is RESOURCE_EXHAUSTED."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        watches = [health.Watch(request) for _ in range(HEALTH_MAX_WATCHES)]
        try:
            for watch in watches:
                first = await asyncio.wait_for(watch.read(), 10)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
            extra = health.Watch(request)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(extra.read(), 10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Watch streams" in (refused.value.details() or "")
        finally:
            for watch in watches:
                watch.cancel()
