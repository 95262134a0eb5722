"""The running gateway: three listeners on one core, metrics, and draining on shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from cnnserve.client.inference import connect
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.conftest import RunningTorchServe
from tests.gateway.harness import (
    digit_pixels,
    free_port,
    gateway_settings,
    holding_settings,
    metric,
    running_gateway,
    wait_for_metric,
)
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _pixels_request(count: int) -> pb.ModelInferRequest:
    pixels, _ = digit_pixels(range(count))
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="labels")
    return request


async def test_metrics_port_serves_prometheus_text(artifacts_dir: Path) -> None:
    async with running_gateway(gateway_settings(artifacts_dir)) as gateway:
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
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")).text
        for family in (
            "cnnserve_batch_size",
            "cnnserve_queue_seconds",
            "cnnserve_inference_seconds",
        ):
            assert f"# TYPE {family} histogram" in text


async def test_a_taken_port_fails_the_start(artifacts_dir: Path) -> None:
    async with running_gateway(gateway_settings(artifacts_dir)) as first:
        taken = gateway_settings(artifacts_dir, grpc_port=first.grpc_port)
        with pytest.raises(RuntimeError):
            async with running_gateway(taken):
                pass


async def test_stop_lets_in_flight_calls_finish(artifacts_dir: Path) -> None:
    """Stop while a call waits in the batcher: the call is answered, new ones are refused."""
    settings = holding_settings(artifacts_dir, 1500.0)
    async with running_gateway(settings) as gateway:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}")
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.ModelInfer(_pixels_request(2)))
        await wait_for_metric(gateway.metrics_port, "cnnserve_queue_depth", 2, model="convnet")
        stopping = asyncio.ensure_future(gateway.stop(10.0))
        await asyncio.sleep(0)  # let stop() flip readiness before the next call
        assert not await gateway.core.server_ready()
        response = await in_flight
        assert list(response.outputs[0].shape) == [2, 1]
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(_pixels_request(1), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await channel.close()


async def test_sigterm_drains_a_real_process(artifacts_dir: Path) -> None:
    """``cnnserve serve`` in its own process: SIGTERM mid-call, the call is answered, exit 0."""
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "CNNSERVE_ARTIFACTS_DIR": str(artifacts_dir),
        "CNNSERVE_DEVICE": "cpu",
        # A lone call waits this long for company: long enough to be in flight at SIGTERM.
        "CNNSERVE_MAX_BATCH_DELAY_MS": "2000",
        "CNNSERVE_ADAPTIVE_BATCH_DELAY": "false",
        "CNNSERVE_DRAIN_GRACE_S": "20",
    }
    command = [
        sys.executable, "-m", "cnnserve", "serve", "--backend", "onnxruntime",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await asyncio.wait_for(channel.channel_ready(), 60)
            in_flight = asyncio.ensure_future(stub.ModelInfer(_pixels_request(3), timeout=30))
            await wait_for_metric(metrics_port, "cnnserve_queue_depth", 3, model="convnet")
            process.send_signal(signal.SIGTERM)
            response = await in_flight
        # Three one-character labels, each after its 4-byte length.
        labels = [int(c) for c in response.raw_output_contents[0][4::5].decode()]
        assert labels == digit_pixels(range(3))[1]
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "SIGTERM received" in output
    assert "gateway stopped" in output


@pytest.mark.torchserve
async def test_gateway_over_a_real_torchserve(torchserve: RunningTorchServe) -> None:
    """``--backend torchserve`` end to end: both transports, both models, a real TorchServe."""
    settings = torchserve.settings.model_copy(
        update={
            "backend": "torchserve",
            "artifacts_dir": torchserve.artifacts_dir,
            "host": "127.0.0.1",
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
        }
    )
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
