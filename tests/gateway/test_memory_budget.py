"""Memory budgets at the default settings: requests priced in bytes from image headers and
tensor shapes, refused before anything is decoded — INVALID_ARGUMENT when one request alone is
over max_request_bytes, RESOURCE_EXHAUSTED while the in-flight budget is taken — and a real
gateway process kept under its container's memory limit by the worst requests they accept.

The gateways use the torchserve backend in front of a stand-in TorchServe that answers zeros
(tests/gateway/null_torchserve.py), as the shipped deployment runs: the model's memory is
TorchServe's, everything the gateway does with a request is measured here. One more runs the
model in its own process (``--backend onnxruntime``), where max_batch_model_bytes bounds the
model's working memory as well.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.backends import run_in_parts
from cnnserve.gateway.memory_budget import MODEL_WORKING_MEMORY, request_cost
from cnnserve.gateway.server import Gateway
from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.spec import Architecture
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from tests.gateway.harness import (
    exploding_core,
    holding_settings,
    raw_bytes_elements,
    running_gateway,
)
from tests.gateway.memory_payloads import (
    BIG_CHANNEL,
    peak_rss,
    png,
    reset_peak,
    transparent_png,
)
from tests.gateway.memory_payloads import image_request as _request
from tests.gateway.null_torchserve import null_torchserve
from tests.support import GatewayProcess, gateway_process, wait_until_async

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Settings()
FCN = get_spec("fcn")
#: One 512×512 FCN image, 1 KB as PNG: what costs most gateway memory per byte sent.
FCN_SIDE = 512
#: The most 512×512 FCN images one request may carry at the defaults (the docs say six).
WORST_FCN_ITEMS = 6
#: Requests of WORST_FCN_ITEMS images that fit in the in-flight budget together.
WORST_CONCURRENT = 4
FCN_PNG = png(Image.new("RGB", (FCN_SIDE, FCN_SIDE), (40, 40, 40)))


def _fcn_cost(items: int) -> int:
    return request_cost(FCN, items, (3, FCN_SIDE, FCN_SIDE), FCN_SIDE * FCN_SIDE)


def test_the_documented_worst_requests_are_the_limits() -> None:
    """Six 512×512 FCN images are the most one request may carry, four such fill the
    in-flight budget, and the per-request item limit of large digits fits."""
    assert _fcn_cost(WORST_FCN_ITEMS) <= DEFAULTS.max_request_bytes < _fcn_cost(WORST_FCN_ITEMS + 1)
    in_flight = DEFAULTS.max_in_flight_bytes
    assert WORST_CONCURRENT * _fcn_cost(WORST_FCN_ITEMS) <= in_flight
    assert (WORST_CONCURRENT + 1) * _fcn_cost(WORST_FCN_ITEMS) > in_flight
    digits = request_cost(
        get_spec("convnet"), DEFAULTS.max_items_per_request, (3, 28, 28), 4096 * 4096
    )
    assert digits <= DEFAULTS.max_request_bytes


async def _call(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> str:
    """``OK`` or ``CODE: details``; a call may take minutes (24 of the largest FCN images
    on the onnxruntime backend, batched together, on two shared cores)."""
    try:
        await stub.ModelInfer(request, timeout=600)
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


@pytest.fixture(scope="module")
def torchserve_target() -> Iterator[str]:
    with null_torchserve() as target:
        yield target


def _torchserve_settings(target: str, store: Path) -> dict[str, Any]:
    """The torchserve backend's settings in front of the stand-in: nothing to register, no
    key."""
    return {
        "torchserve_grpc_target": target,
        "torchserve_token_auth": False,
        "torchserve_registration": False,
        "model_store_dir": store,
    }


def _holding_settings(model_repository: Path, torchserve_target: str, store: Path) -> Settings:
    """A long batch delay that holds requests in the queue, before the stand-in TorchServe."""
    return holding_settings(
        model_repository,
        5_000,
        backend="torchserve",
        **_torchserve_settings(torchserve_target, store),
    )


@asynccontextmanager
async def _holding_gateway(
    settings: Settings,
) -> AsyncIterator[tuple[Gateway, pb_grpc.GRPCInferenceServiceStub]]:
    """A gateway on ``settings`` and a stub on a channel that takes its largest messages."""
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=BIG_CHANNEL) as channel,
    ):
        yield gateway, pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


async def test_over_the_request_budget_is_invalid_and_a_full_budget_says_retry(
    model_repository: Path, torchserve_target: str, tmp_path: Path
) -> None:
    """While four of the largest requests wait in the queue (a long batch delay holds them),
    a fifth is refused at once with RESOURCE_EXHAUSTED; a request over max_request_bytes is
    INVALID_ARGUMENT (gRPC) / 400 (HTTP), whatever else is in flight; once the four are
    answered their bytes are free again."""
    settings = _holding_settings(model_repository, torchserve_target, tmp_path)
    async with _holding_gateway(settings) as (gateway, stub):
        memory = gateway.core.memory
        worst = _request("fcn", [FCN_PNG] * WORST_FCN_ITEMS, ("scores",))
        held = [asyncio.create_task(_call(stub, worst)) for _ in range(WORST_CONCURRENT)]
        held_bytes = WORST_CONCURRENT * _fcn_cost(WORST_FCN_ITEMS)
        await wait_until_async(lambda: memory.in_use == held_bytes, 60, "four held requests")
        refused = await _call(stub, worst)
        assert refused.startswith("RESOURCE_EXHAUSTED: the gateway's memory budget is taken")
        assert "retry later" in refused
        too_big = await _call(stub, _request("fcn", [FCN_PNG] * (WORST_FCN_ITEMS + 1)))
        assert too_big.startswith("INVALID_ARGUMENT: this request (7 items of fcn) would take")
        assert "(max_request_bytes)" in too_big
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
            raw = raw_bytes_elements([FCN_PNG] * (WORST_FCN_ITEMS + 1))
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "BYTES",
                            "shape": [WORST_FCN_ITEMS + 1],
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ]
                }
            ).encode()
            reply = await http.post(
                "/v2/models/fcn/infer",
                content=header + raw,
                headers={"Inference-Header-Content-Length": str(len(header))},
            )
            assert reply.status_code == 400 and "max_request_bytes" in reply.text
        assert await asyncio.gather(*held) == ["OK"] * WORST_CONCURRENT
        assert memory.in_use == 0
        assert await _call(stub, worst) == "OK"


async def test_the_bytes_come_back_however_a_request_ends(
    model_repository: Path, torchserve_target: str, tmp_path: Path
) -> None:
    """A caller whose deadline passes while its request waits in the queue, and one whose
    batch fails in the backend, leave nothing reserved behind them."""
    settings = _holding_settings(model_repository, torchserve_target, tmp_path)
    async with _holding_gateway(settings) as (gateway, stub):
        memory = gateway.core.memory
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await stub.ModelInfer(_request("fcn", [FCN_PNG] * 2), timeout=1.0)
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until_async(lambda: memory.in_use == 0, 10, "the expired request's bytes")
    async with (
        running_gateway(settings, exploding_core(settings)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        failed = await _call(stub, _request("fcn", [FCN_PNG]))
        assert failed.startswith("INTERNAL"), failed
        assert gateway.core.memory.in_use == 0


def _pod_memory_limit() -> int:
    """The gateway container's memory limit in deploy/k8s/gateway.yaml, in bytes."""
    documents = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text())
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limit = str(container["resources"]["limits"]["memory"])
    units = {"Gi": 2**30, "Mi": 2**20}
    return int(limit[:-2]) * units[limit[-2:]]


async def _send_the_worst(gateway: GatewayProcess) -> tuple[int, int]:
    """Send a gateway at the default settings the audit's payloads and the next-bigger request
    (each refused from its headers, before its pixels cost anything: checked), then the worst
    requests the defaults accept — the in-flight budget filled with the largest FCN requests,
    scores asked for — all at once (all answered: checked). Its RSS before those and its peak
    RSS while they ran, in bytes."""
    pid = gateway.process.pid
    async with grpc.aio.insecure_channel(gateway.grpc_target, options=BIG_CHANNEL) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        assert await _call(stub, _request("fcn", [FCN_PNG])) == "OK"  # warm: first batch
        before = reset_peak(pid)
        refused = await asyncio.gather(
            _call(stub, _request("fcn", [FCN_PNG] * DEFAULTS.max_items_per_request)),
            _call(stub, _request("fcn", [FCN_PNG] * (WORST_FCN_ITEMS + 1), ("scores",))),
            _call(stub, _request("convnet", [transparent_png(4096)])),
        )
        assert [r.split(":")[0] for r in refused] == ["INVALID_ARGUMENT"] * 3, refused
        assert peak_rss(pid) - before < 32 << 20  # headers only: nothing decoded
        before = reset_peak(pid)
        worst = _request("fcn", [FCN_PNG] * WORST_FCN_ITEMS, ("scores",))
        answers = await asyncio.gather(*(_call(stub, worst) for _ in range(WORST_CONCURRENT)))
        assert answers == ["OK"] * WORST_CONCURRENT
        return before, peak_rss(pid)


async def test_a_real_gateway_stays_under_its_pod_limit_at_the_worst_it_accepts(
    model_repository: Path, torchserve_target: str, tmp_path: Path
) -> None:
    """``cnnserve serve --backend torchserve`` at the default settings, the model in (a
    stand-in) TorchServe: the worst requests the defaults accept keep its peak RSS under the
    container limit shipped in deploy/k8s/gateway.yaml, and its growth under what the
    budget reserved for them (:func:`_send_the_worst`)."""
    limit = _pod_memory_limit()
    with gateway_process(
        "torchserve",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        **_torchserve_settings(torchserve_target, tmp_path / "store"),
    ) as gateway:
        before, peak = await _send_the_worst(gateway)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, the pod's limit {limit >> 20} MiB"
    assert peak - before <= WORST_CONCURRENT * _fcn_cost(WORST_FCN_ITEMS)


async def test_an_in_process_model_stays_under_the_same_limit_at_the_worst_it_accepts(
    model_repository: Path, tmp_path: Path
) -> None:
    """``cnnserve serve --backend onnxruntime`` at the default settings, the model in the
    process: the same worst requests (24 of the largest FCN images, batched together, run in
    parts of max_batch_model_bytes) keep its peak RSS under the gateway container's limit
    too, and its growth under the in-flight budget plus one batch's model memory."""
    limit = _pod_memory_limit()
    with gateway_process(
        "onnxruntime", tmp_path / "gateway.log", model_repository=model_repository
    ) as gateway:
        before, peak = await _send_the_worst(gateway)
    assert peak < limit, f"peak RSS {peak >> 20} MiB, the pod's limit {limit >> 20} MiB"
    budget = DEFAULTS.max_in_flight_bytes + DEFAULTS.max_batch_model_bytes
    assert peak - before <= budget, f"grew {(peak - before) >> 20} MiB"


def test_the_model_memory_limit_takes_the_largest_image_on_either_runtime() -> None:
    """One 512×512 FCN image fits in max_batch_model_bytes on ONNX Runtime, two on
    TorchScript (the settings' description says so); a ConvNet batch of max_batch_size
    digits runs whole."""
    limit = DEFAULTS.max_batch_model_bytes
    fcn_pixels = FCN_SIDE * FCN_SIDE
    assert MODEL_WORKING_MEMORY["onnx", Architecture.FCN].max_items(fcn_pixels, limit) == 1
    assert MODEL_WORKING_MEMORY["torchscript", Architecture.FCN].max_items(fcn_pixels, limit) == 2
    for artifact_format in ("onnx", "torchscript"):
        convnet = MODEL_WORKING_MEMORY[artifact_format, Architecture.CONVNET]
        assert convnet.max_items(28 * 28, limit) >= DEFAULTS.max_batch_size


def test_a_batch_runs_in_parts_within_the_limit_and_an_image_over_it_is_refused(
    model_repository: Path,
) -> None:
    """A real ONNX Runtime FCN: a batch over max_batch_model_bytes runs in parts, each
    within it, with the whole batch's numbers; an image that alone is over it is refused as
    INVALID_ARGUMENT naming the setting."""
    runner = load_runner(model_repository / "fcn" / "1" / "model.onnx", "onnx", "cpu", threads=1)
    memory = MODEL_WORKING_MEMORY["onnx", Architecture.FCN]
    limit = memory.batch_bytes(2, 64 * 64)
    parts: list[int] = []

    def counted(batch: np.ndarray) -> np.ndarray:
        parts.append(len(batch))
        return runner.infer(batch)

    batch = np.random.default_rng(0).random((5, 3, 64, 64), np.float32)
    scores = run_in_parts(counted, batch, memory, limit, "fcn version 1")
    assert parts == [2, 2, 1]
    np.testing.assert_allclose(scores, runner.infer(batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"96×96 image .* \(max_batch_model_bytes\)"):
        run_in_parts(counted, np.zeros((1, 3, 96, 96), np.float32), memory, limit, "fcn")
