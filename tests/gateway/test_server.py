"""The running gateway: three listeners over one data plane, metrics, a real TorchServe behind it.

Deadlines and draining on shutdown: test_server_deadlines_and_drain.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.client.inference import connect
from tests.conftest import RunningTorchServe
from tests.gateway.harness import (
    gateway_settings,
    metric,
    running_gateway,
)
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_metrics_port_serves_prometheus_text(model_repository: Path) -> None:
    async with running_gateway(gateway_settings(model_repository)) as gateway:
        assert len({gateway.grpc_port, gateway.http_port, gateway.metrics_port}) == 3
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
            reply = await http.post(
                "/v2/models/convnet/infer",
                json={
                    "inputs": [
                        {
                            "name": "pixels",
                            "datatype": "UINT8",
                            "shape": [1, 3, 28, 28],
                            "data": [0] * 2352,
                        }
                    ]
                },
            )
            assert reply.status_code == 200
        assert (
            await metric(
                gateway.metrics_port, "cnnserve_requests_total", model="convnet", outcome="success"
            )
            == 1
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.metrics_port}") as client:
            text = (await client.get("/metrics")).text
            # Health as on the HTTP port, in plaintext (probes under mutual TLS ask here).
            ready, live = await client.get("/v2/health/ready"), await client.get("/v2/health/live")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        assert (live.status_code, live.json()) == (200, {"live": True})
        types = {family.name: family.type for family in text_string_to_metric_families(text)}
        for family in (
            "cnnserve_batch_size",
            "cnnserve_queue_seconds",
            "cnnserve_inference_seconds",
        ):
            assert types[family] == "histogram"


async def test_a_taken_port_fails_the_start(model_repository: Path) -> None:
    async with running_gateway(gateway_settings(model_repository)) as first:
        taken = gateway_settings(model_repository, grpc_port=first.grpc_port)
        with pytest.raises(RuntimeError):
            async with running_gateway(taken):
                pass


@pytest.mark.torchserve
async def test_gateway_over_a_real_torchserve(
    torchserve: RunningTorchServe, model_repository: Path
) -> None:
    """``--backend torchserve`` end to end: both transports, both models, a real TorchServe."""
    settings = torchserve.gateway_settings(model_repository)
    digits = [digit_png(i) for i in (0, 1, 2)]
    scene, truth = shapes_png(5, side=40)
    async with running_gateway(settings) as gateway:
        assert await gateway.core.server_ready()
        for http in (False, True):
            port = gateway.http_port if http else gateway.grpc_port
            with connect("127.0.0.1", port, http=http) as client:
                results = await asyncio.to_thread(client.classify, [png for png, _ in digits])
                mask = await asyncio.to_thread(client.segment, scene)
            assert [r.label for r in results] == [str(label) for _, label in digits]
            assert mask.shape == truth.shape
        batches = await metric(gateway.metrics_port, "cnnserve_batch_size_count", model="convnet")
        assert batches >= 2
