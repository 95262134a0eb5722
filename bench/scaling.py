"""Frontend processes and the shared batcher, side by side: one gateway process, N frontends
feeding one batching process, and N independent gateways, under the same closed-loop load.

For each: requests/s, p50/p99, the mean batch the backend ran, the resident memory of all the
gateway's processes, the frontends' CPU time per request, and the batching process's — all
of it, and less what the model itself takes for batches of the mean size (timed in this
process through the same ONNX Runtime artifact): its own IPC, batching and reply work. The
ratio of the two says how many frontends one batching process can feed.

    cnnserve scaling --concurrency 64 --duration-s 10 --out docs/bench/scaling.json
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc

from .gateway_process import GatewayProcess, demo_repository, free_ports, start_gateway
from .loadgen import LoadSpec, check_request, infer_request, run_load
from .scrape import batch_sizes

#: (label, gateway_processes, shared_batcher)
LAYOUTS: tuple[tuple[str, int, bool], ...] = (
    ("1 process", 1, False),
    ("1 frontend + batching process", 1, True),
    ("2 frontends + batching process", 2, True),
    ("2 independent gateways", 2, False),
)


def _batching_process(gateway: GatewayProcess) -> psutil.Process | None:
    """The child listening on the batching socket, if the gateway has one."""
    for process in gateway.processes()[1:]:
        try:
            if any(str(c.laddr).endswith("batching.sock") for c in process.net_connections("unix")):
                return process
        except psutil.Error:
            continue
    return None


def _frontends(gateway: GatewayProcess) -> list[psutil.Process]:
    """The processes listening on the gRPC port."""
    found = []
    for process in gateway.processes():
        try:
            if any(
                c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == gateway.grpc_port
                for c in process.net_connections(kind="tcp")
            ):
                found.append(process)
        except psutil.Error:
            continue
    return found


def _cpu_s(*processes: psutil.Process | None) -> float:
    total = 0.0
    for process in processes:
        if process is not None:
            times = process.cpu_times()
            total += times.user + times.system
    return total


def model_cpu_ms_per_item(artifacts: Path, batch: int, repeats: int = 300) -> float:
    """CPU milliseconds per item the ConvNet takes in ONNX Runtime for batches of ``batch``."""
    import numpy as np

    from cnnserve.models.runtime import load_runner

    path = demo_repository(artifacts) / "convnet" / "1" / "model.onnx"
    runner = load_runner(path, "onnx", "cpu")
    items = np.zeros((max(1, batch), 3, 28, 28), np.float32)
    runner.infer(items)
    started = time.process_time()
    for _ in range(repeats):
        runner.infer(items)
    return (time.process_time() - started) * 1000 / (repeats * max(1, batch))


#: ``cnnserve serve`` runs one process without a batching process; the supervisor itself can
#: run one frontend beside one, which isolates what the hop to the batching process costs.
ONE_FRONTEND = (
    "from cnnserve.gateway.processes import run_processes;"
    "from cnnserve.gateway.server import serve_forever;"
    "from cnnserve.settings import Settings;"
    "run_processes(Settings(), serve_forever)"
)


def _one_frontend(env: dict[str, str], log: Path, timeout_s: float = 120.0) -> GatewayProcess:
    """The supervisor with one frontend and the batching process, ready to serve."""
    grpc_port, http_port, metrics_port = free_ports(3)
    ports = {
        "CNNSERVE_BACKEND": "onnxruntime",
        "CNNSERVE_HOST": "127.0.0.1",
        "CNNSERVE_GRPC_PORT": str(grpc_port),
        "CNNSERVE_HTTP_PORT": str(http_port),
        "CNNSERVE_METRICS_PORT": str(metrics_port),
    }
    with log.open("ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", ONE_FRONTEND],
            env={**os.environ, **env, **ports},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    gateway = GatewayProcess(process, grpc_port, http_port, metrics_port, log)
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at and process.poll() is None:
        try:
            with grpc.insecure_channel(gateway.grpc_target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                    return gateway
        except grpc.RpcError:
            time.sleep(0.5)
    gateway.stop()
    raise RuntimeError(f"one frontend and a batching process did not start; see {log}")


def measure(
    artifacts: Path,
    label: str,
    processes: int,
    shared: bool,
    concurrency: int,
    duration_s: float,
    log: Path,
) -> dict[str, Any]:
    """One layout under ``concurrency`` closed-loop callers of one FP32 ConvNet tensor."""
    import numpy as np

    env = {
        "CNNSERVE_MODEL_REPOSITORY": str(demo_repository(artifacts)),
        "CNNSERVE_DEVICE": "cpu",
        "CNNSERVE_GATEWAY_PROCESSES": str(processes),
        "CNNSERVE_SHARED_BATCHER": "true" if shared else "false",
        "CNNSERVE_MAX_QUEUE_SIZE": "8192",
    }
    gateway = (
        _one_frontend(env, log)
        if processes == 1 and shared
        else start_gateway("onnxruntime", env, log)
    )
    try:
        request = infer_request("convnet", np.zeros((1, 3, 28, 28), np.float32))
        check_request(gateway.grpc_target, request)
        batching = _batching_process(gateway)
        before = batch_sizes(gateway.metrics_url, "convnet")
        frontends = _frontends(gateway) if batching else []
        cpu_before = _cpu_s(batching)
        frontends_before = _cpu_s(*frontends)
        spec = LoadSpec(gateway.grpc_target, request, 1, duration_s, 2.0, concurrency, channels=4)
        started = time.monotonic()
        result = run_load(spec)
        cpu = _cpu_s(batching) - cpu_before
        frontends_cpu = _cpu_s(*frontends) - frontends_before
        formed = batch_sizes(gateway.metrics_url, "convnet").minus(before)
        total = result.requests + result.requests_per_s * spec.warmup_s  # warm-up counted too
        per_request = cpu * 1000 / total if batching else None
        model = model_cpu_ms_per_item(artifacts, round(formed.mean)) if batching else None
        return {
            "layout": label,
            "requests_per_s": result.requests_per_s,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "errors": result.errors,
            "mean_batch_size": formed.mean,
            "rss_mb": gateway.rss_bytes() / 2**20,
            "batching_cpu_ms_per_request": per_request,
            "model_cpu_ms_per_item": model,
            "frontends_cpu_ms_per_request": frontends_cpu * 1000 / total if batching else None,
            "batching_own_cpu_ms_per_request": (
                per_request - model if per_request is not None and model is not None else None
            ),
            "wall_s": time.monotonic() - started,
        }
    finally:
        gateway.stop()


def run_scaling(artifacts: Path, concurrency: int, duration_s: float) -> Iterator[dict[str, Any]]:
    """Measure every layout once, in turn; each layout's figures as it is measured."""
    with tempfile.TemporaryDirectory(prefix="cnnserve-scaling-") as directory:
        for label, processes, shared in LAYOUTS:
            log = Path(directory) / "g.log"
            yield measure(artifacts, label, processes, shared, concurrency, duration_s, log)
