"""Several gateway processes on one set of ports: a real ``cnnserve serve`` supervisor with
two workers sharing gRPC and HTTP (SO_REUSEPORT), metrics summed, SIGTERM drains them all."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.bench.loadgen import infer_request
from cnnserve.gateway.processes import run_processes
from cnnserve.gateway.server import serve_forever
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.settings import Settings
from tests.support import gateway_process

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _requests_total(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "cnnserve_requests"
        for sample in family.samples
        if sample.name == "cnnserve_requests_total" and sample.labels["outcome"] == "success"
    )


def test_two_processes_share_the_ports_and_drain_on_sigterm(
    model_repository: Path, tmp_path: Path
) -> None:
    with gateway_process(
        "onnxruntime",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        gateway_processes=2,
        device="cpu",
    ) as gateway:
        assert gateway.grpc_listeners() == 2  # two workers; the supervisor serves nothing
        request = infer_request("convnet", np.zeros((1, 3, 28, 28), np.float32))
        # Separate connections: the kernel spreads connections, not calls, over the workers.
        for index in range(8):
            options = [("test.connection", index)]
            with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
                call = channel.unary_unary(MODEL_INFER)
                for _ in range(3):
                    reply = pb.ModelInferResponse.FromString(call(request, timeout=30))
                    assert reply.model_name == "convnet"
        for _ in range(4):
            ready = httpx.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/ready", timeout=10)
            assert ready.status_code == 200
        # One metrics port, every worker's requests summed.
        assert _requests_total(gateway.metrics_url) == 24
        children = gateway.processes()[1:]
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=60) == 0
        # Workers are joined before the supervisor exits; multiprocessing's resource tracker
        # follows it within moments.
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    log = gateway.output()
    assert "2 gateway processes" in log
    assert log.count("gateway stopped") == 2


def test_several_processes_need_fixed_ports() -> None:
    with pytest.raises(ValueError, match="fixed gRPC, HTTP and metrics ports"):
        run_processes(Settings(gateway_processes=2, grpc_port=0), serve_forever)
