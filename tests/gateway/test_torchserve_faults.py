"""Faults behind a real gateway process: a TorchServe worker that hangs or crashes mid-batch,
a caller that goes away mid-batch, and the only TorchServe killed and started again.

One TorchServe (JVM + one worker per model, token authorization off, so the restart test
exercises the gateway's channel reconnecting to the same address; a new key after a restart
is the replica tests' subject) and one ``cnnserve serve --backend torchserve`` process for
the module. The tests run in file order; the last one kills
TorchServe and starts it again. (One of several replicas killed under load is
tests/deploy/test_scale_out.py's: the client retries such calls on another replica.)

What each fault must give, by the error table (docs/architecture.md, "Errors"):

- a hung worker: the gateway's own timeout (``torchserve_call_timeout_s``) answers
  DEADLINE_EXCEEDED / 504 — HTTP's "gateway timeout": the backend did not answer in time —
  or the caller's own deadline does, whichever comes first; the other model is unaffected;
- a worker killed mid-batch: that batch's callers get UNAVAILABLE / 503 saying the worker
  died (a retry succeeds once TorchServe has restarted it), later requests succeed;
- a caller cancelled mid-batch: the others in its batch get their answers;
- the only TorchServe killed: UNAVAILABLE at once (not a timeout), readiness false; started
  again on the same ports: ready and serving, the gateway process untouched.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.gateway.readiness import PROBE_TIMEOUT_S, REFRESH_INTERVAL_S
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import response_from_proto
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.process import ServerInfo, start, stop
from tests.conftest import torchserve_settings
from tests.gateway.harness import digit_pixels
from tests.support import GatewayProcess, gateway_process, starts_torchserve, wait_until_async

pytestmark = [pytest.mark.torchserve, pytest.mark.asyncio(loop_scope="session")]

#: The gateway's timeout on one TorchServe call (``torchserve_call_timeout_s``): short, so a
#: hang is answered within a test, and well above what an FCN batch below takes on a busy CPU;
#: TorchServe's own worker timeout stays at its default, far longer.
BACKEND_TIMEOUT_S = 15
#: Long enough that concurrent callers share one batch.
BATCH_DELAY_MS = 300
#: Bounds every wait on something that must happen (a restart, a recovery).
RECOVERY_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
#: FCN batches big enough to keep the worker busy for a while on a CPU.
FCN_CALLERS = 4
FCN_ITEMS = (3, 3, 192, 192)


@dataclass
class Deployment:
    """TorchServe (and how to start it again) behind a gateway process."""

    settings: Settings
    store: Path
    server: ServerInfo
    gateway: GatewayProcess

    def worker_pid(self, model: str) -> int:
        """The pid of ``model``'s (only) TorchServe worker, from the management API."""
        reply = httpx.get(f"{self.server.management_url}/models/{model}", timeout=10.0)
        reply.raise_for_status()
        (worker,) = reply.json()[0]["workers"]
        return int(worker["pid"])

    def ready(self) -> bool:
        """The gateway's HTTP readiness."""
        url = f"http://127.0.0.1:{self.gateway.http_port}/v2/health/ready"
        return httpx.get(url, timeout=30.0).status_code == 200


@pytest.fixture(scope="module")
@starts_torchserve
def deployment(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """A TorchServe on free ports (tokens off) and a gateway process in front of it, which
    registers the repository's versions in its (empty) model store."""
    store = tmp_path_factory.mktemp("faults_store")
    settings = torchserve_settings(store).model_copy(
        update={"torchserve_token_auth": False, "torchserve_key_file": None}
    )
    server = start(settings, store)
    try:
        with gateway_process(
            "torchserve",
            store / "gateway.log",
            model_repository=model_repository,
            model_store_dir=store,
            torchserve_grpc_target=server.grpc_target,
            torchserve_token_auth=False,
            torchserve_call_timeout_s=BACKEND_TIMEOUT_S,
            max_batch_delay_ms=BATCH_DELAY_MS,
            adaptive_batch_delay=False,
        ) as gateway:
            yield Deployment(settings, store, server, gateway)
    finally:
        stop(store)


@pytest.fixture
async def stub(deployment: Deployment) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """An OIP stub on the gateway's gRPC port."""
    options = [("grpc.max_receive_message_length", 1 << 28)]
    async with grpc.aio.insecure_channel(deployment.gateway.grpc_target, options=options) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)  # type: ignore[no-untyped-call]


def pixels_request(model: str, pixels: np.ndarray, output: str) -> pb.ModelInferRequest:
    """A request carrying UINT8 pixels and asking for one output."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
    request.outputs.add(name=output)
    return request


DIGITS, LABELS = digit_pixels(range(3))


async def classify(stub: pb_grpc.GRPCInferenceServiceStub, timeout: float = CALL_TIMEOUT_S) -> None:
    """Three digits through convnet; their labels must be the true ones."""
    response = await stub.ModelInfer(pixels_request("convnet", DIGITS, "labels"), timeout=timeout)
    (labels,) = response_from_proto(response).outputs
    assert [int(row[0]) for row in labels.data] == LABELS


def fcn_pixels(seed: int) -> np.ndarray:
    """Random FCN input of :data:`FCN_ITEMS`."""
    return np.random.default_rng(seed).integers(0, 256, FCN_ITEMS, dtype=np.uint8)


async def segment(stub: pb_grpc.GRPCInferenceServiceStub, seed: int) -> bytes:
    """The mask bytes the gateway answers for :func:`fcn_pixels` ``(seed)``."""
    request = pixels_request("fcn", fcn_pixels(seed), "mask")
    response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    return bytes(response.raw_output_contents[0])


async def until_running(pid: int) -> None:
    """Wait until process ``pid`` computes (a batch reached the worker)."""
    process = psutil.Process(pid)
    process.cpu_percent()
    await wait_until_async(
        lambda: process.cpu_percent() >= 50, RECOVERY_TIMEOUT_S, f"worker {pid} to compute"
    )


async def test_a_hung_worker_is_answered_by_the_gateways_timeout(
    deployment: Deployment, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """SIGSTOP convnet's worker: a call without a deadline gets DEADLINE_EXCEEDED from the
    gateway's own backend timeout, a call with a shorter deadline gets it at its deadline,
    HTTP callers get 504; fcn keeps serving; after SIGCONT convnet serves again."""
    pid = deployment.worker_pid("convnet")
    os.kill(pid, signal.SIGSTOP)
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": list(DIGITS.shape)}
    try:
        own, short, other, reply = await asyncio.gather(
            stub.ModelInfer(pixels_request("convnet", DIGITS, "labels"), timeout=CALL_TIMEOUT_S),
            stub.ModelInfer(pixels_request("convnet", DIGITS, "labels"), timeout=1.0),
            segment(stub, 0),
            asyncio.to_thread(
                httpx.post,
                f"http://127.0.0.1:{deployment.gateway.http_port}/v2/models/convnet/infer",
                json={"inputs": [{**tensor, "data": DIGITS.ravel().tolist()}]},
                timeout=CALL_TIMEOUT_S,
            ),
            return_exceptions=True,
        )
        assert isinstance(own, grpc.aio.AioRpcError), own
        assert own.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"did not answer convnet version 1 within {BACKEND_TIMEOUT_S}" in (
            own.details() or ""
        )
        assert isinstance(short, grpc.aio.AioRpcError), short
        assert short.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert isinstance(other, bytes), other  # the other model is not held up
        assert isinstance(reply, httpx.Response), reply
        assert reply.status_code == 504, reply.text
        assert "did not answer convnet" in reply.json()["error"]
    finally:
        os.kill(pid, signal.SIGCONT)
    await classify(stub)


async def test_a_worker_killed_mid_batch_fails_that_batch_only(
    deployment: Deployment, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """SIGKILL fcn's worker while it computes one batch of several callers: each of them
    gets UNAVAILABLE saying the worker died; convnet is unaffected; once TorchServe has
    restarted the worker, fcn answers again."""
    pid = deployment.worker_pid("fcn")
    callers = [asyncio.create_task(segment(stub, seed)) for seed in range(FCN_CALLERS)]
    await until_running(pid)
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*callers, return_exceptions=True)
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError), "a caller of the killed batch got data"
        assert result.code() == grpc.StatusCode.UNAVAILABLE, result
        assert "fcn version 1 worker died while running this batch" in (result.details() or "")
    await classify(stub)

    async def fcn_answers() -> bool:
        try:
            await segment(stub, 0)
        except grpc.aio.AioRpcError as exc:
            # While the worker restarts: refused, or held by TorchServe past the backend
            # timeout on a busy machine — rows of the table, never INTERNAL.
            assert exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), exc
            return False
        return True

    await wait_until_async(
        fcn_answers, RECOVERY_TIMEOUT_S, "fcn answering after its worker was restarted", 0.5
    )
    assert deployment.worker_pid("fcn") != pid


async def test_a_caller_gone_mid_batch_leaves_the_others_their_answers(
    stub: pb_grpc.GRPCInferenceServiceStub, deployment: Deployment
) -> None:
    """Callers share one fcn batch; one cancels while the worker computes it; the others
    get exactly the masks they get alone."""
    alone = [await segment(stub, seed) for seed in range(FCN_CALLERS)]
    pid = deployment.worker_pid("fcn")
    callers = [asyncio.create_task(segment(stub, seed)) for seed in range(FCN_CALLERS)]
    await until_running(pid)
    callers[0].cancel()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == alone[1:]
    assert await segment(stub, 0) == alone[0]


async def test_the_only_torchserve_killed_then_started_again(
    deployment: Deployment, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """SIGKILL TorchServe (JVM and workers): calls fail UNAVAILABLE without waiting for
    their deadline, readiness turns false on both transports; TorchServe started again
    on the same ports: readiness and traffic come back, the same gateway process serving."""
    jvm = psutil.Process(deployment.server.pid)
    processes = [jvm, *jvm.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=30)

    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await classify(stub, timeout=CALL_TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "TorchServe at" in (caught.value.details() or "")

    async def not_ready() -> bool:
        return not await asyncio.to_thread(deployment.ready)

    # Readiness is a cached state: the next background refresh's probe sees TorchServe gone.
    await wait_until_async(
        not_ready, 2 * REFRESH_INTERVAL_S + PROBE_TIMEOUT_S, "readiness to turn false", 0.2
    )
    async with grpc.aio.insecure_channel(deployment.gateway.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

    gateway_pid = deployment.gateway.process.pid
    deployment.server = await asyncio.to_thread(start, deployment.settings, deployment.store)

    async def ready() -> bool:
        return await asyncio.to_thread(deployment.ready)

    await wait_until_async(ready, RECOVERY_TIMEOUT_S, "readiness after TorchServe came back", 0.5)
    await classify(stub)
    assert await segment(stub, 1)
    assert deployment.gateway.process.pid == gateway_pid
    assert deployment.gateway.process.poll() is None
