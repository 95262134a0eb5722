"""Scale-out for real: three TorchServe replicas behind one gateway process.

The deployments run several TorchServe replicas behind a gateway that resolves every replica
(``dns:///torchserve:7070`` in docker-compose.yml, the headless Service in Kubernetes) and
takes turns over them, one channel per replica. Here the same gateway (``cnnserve serve
--backend torchserve`` in its own process) gets a target that lists three local TorchServes,
``ipv4:127.0.0.1:A,127.0.0.1:B,127.0.0.1:C``: every address at once, exactly as DNS answers
with one A record per replica. One replica is then stopped and another killed, each in the
middle of the load.

Token authorization is on, as in the deployments: each replica draws its own random key and
publishes it in a shared key directory under its address (``CNNSERVE_TORCHSERVE_KEY_DIR``),
where the gateway finds the key to send each replica.

The replicas start with empty model stores: the gateway archives every version it loads into
each replica's store and registers it there (``torchserve_model_stores``), so each replica
gets each version.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest

from cnnserve.models.runtime import load_runner
from cnnserve.models.steps import normalize
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.torchserve_engine.archive import store_archives
from cnnserve.torchserve_engine.process import ServerInfo, start, status, stop
from tests.conftest import publish_key, served_requests, torchserve_settings
from tests.gateway.harness import digit_pixels
from tests.support import GatewayProcess, gateway_process, starts_torchserve, wait_until_async

pytestmark = [pytest.mark.torchserve, pytest.mark.asyncio(loop_scope="session")]

REPLICAS = 3
READY_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0
CALLERS = 6
#: Items per request, uneven so batches of different sizes form.
ITEM_COUNTS = (2, 3, 1)
#: Upper bound on one caller's requests in the stop test: the load always ends by itself.
MAX_REQUESTS_PER_CALLER = 400


@dataclass(frozen=True)
class Replica:
    """One TorchServe serving its own copy of the archives."""

    store: Path
    server: ServerInfo

    def inference_requests(self) -> float:
        """convnet inference requests this replica has answered (its metrics API)."""
        return served_requests(self.server)


@pytest.fixture(scope="module")
@starts_torchserve
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Three TorchServes on their own free ports, tokens on, nothing registered; stopped at
    the end."""
    started: list[Replica] = []
    try:
        for index in range(REPLICAS):
            store = tmp_path_factory.mktemp(f"replica{index}")
            started.append(Replica(store, start(torchserve_settings(store), store)))
        yield started
    finally:
        for replica in started:
            stop(replica.store)


@pytest.fixture(scope="module")
def gateway(
    replicas: list[Replica], model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend torchserve`` with a gRPC target listing every replica, the
    key directory every replica published its own inference key in, and every replica's
    model store to register the repository's versions in."""
    key_dir = tmp_path_factory.mktemp("keys")
    for replica in replicas:
        publish_key(replica.server, key_dir)
    assert len({replica.server.key("inference") for replica in replicas}) == REPLICAS
    target = "ipv4:" + ",".join(replica.server.grpc_target for replica in replicas)
    # The settings docker-compose.yml's gateway runs with, on this test's ports, but its API
    # key (tests/gateway/test_auth.py covers keys; here every call would only carry one).
    with gateway_process(
        "torchserve",
        tmp_path_factory.mktemp("gateway") / "gateway.log",
        READY_TIMEOUT_S,
        torchserve_grpc_target=target,
        torchserve_token_auth=True,
        torchserve_key_dir=key_dir,
        torchserve_model_stores=[replica.store for replica in replicas],
        model_repository=model_repository,
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def stub(gateway: GatewayProcess) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """An Open Inference Protocol stub on the gateway's gRPC port."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def digits(model_repository: Path) -> tuple[np.ndarray, list[int]]:
    """Six digit images as UINT8 pixels, and the label the exported model gives each.

    The labels come from the same TorchScript artifact run in this process, so an answer
    from any replica must match them exactly.
    """
    pixels, _ = digit_pixels(range(6))
    runner = load_runner(model_repository / "convnet" / "1" / "model.pt", "torchscript", "cpu")
    expected = runner.infer(normalize(pixels)).argmax(axis=1).tolist()
    return pixels, expected


async def classify(stub: pb_grpc.GRPCInferenceServiceStub, pixels: np.ndarray) -> list[int]:
    """Top-1 label indices of ``pixels`` from the gateway (its ``logits`` output)."""
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="logits")
    response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
    (output,) = response.outputs
    logits = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    return [int(label) for label in logits.reshape(tuple(output.shape)).argmax(axis=1)]


def request_items(
    caller: int, number: int, digits: tuple[np.ndarray, list[int]]
) -> tuple[np.ndarray, list[int]]:
    """The pixels and expected labels of a caller's ``number``-th request (2, 3 or 1 items)."""
    pixels, expected = digits
    count = ITEM_COUNTS[(caller + number) % len(ITEM_COUNTS)]
    rows = [(caller + number + i) % len(expected) for i in range(count)]
    return pixels[rows], [expected[row] for row in rows]


async def test_the_gateway_registered_every_version_with_every_replica(
    replicas: list[Replica], gateway: GatewayProcess
) -> None:
    for replica in replicas:
        assert status(replica.store).workers == {"convnet/1": ["READY"], "fcn/1": ["READY"]}
        assert [p.name for p in store_archives(replica.store)] == ["convnet.1.mar", "fcn.1.mar"]


async def test_batches_spread_over_every_replica(
    replicas: list[Replica],
    stub: pb_grpc.GRPCInferenceServiceStub,
    digits: tuple[np.ndarray, list[int]],
) -> None:
    """Concurrent callers' batches reach every replica, and every answer is right."""
    before = [replica.inference_requests() for replica in replicas]

    async def caller(index: int) -> None:
        for number in range(12):
            pixels, expected = request_items(index, number, digits)
            assert await classify(stub, pixels) == expected

    await asyncio.gather(*(caller(index) for index in range(CALLERS)))
    served = [replica.inference_requests() - b for replica, b in zip(replicas, before, strict=True)]
    # Round robin takes turns; half a fair share each leaves room for probes and batching.
    assert all(count >= sum(served) / (2 * REPLICAS) for count in served), served


async def load_through(
    disruption: Callable[[], Awaitable[None]],
    victim: Replica,
    stub: pb_grpc.GRPCInferenceServiceStub,
    digits: tuple[np.ndarray, list[int]],
) -> tuple[list[str], int]:
    """Callers send requests; once ``victim`` is serving them, ``disruption`` runs.

    Every caller goes on until it has had 10 answers after the disruption (bounded by
    MAX_REQUESTS_PER_CALLER). Returns the failures (errors, wrong labels) and the number
    of answers after the disruption.
    """
    victim_before = victim.inference_requests()
    disrupted = asyncio.Event()
    failures: list[str] = []
    answered_after = 0

    async def caller(index: int) -> None:
        nonlocal answered_after
        after = 0
        for number in range(MAX_REQUESTS_PER_CALLER):
            pixels, expected = request_items(index, number, digits)
            try:
                labels = await classify(stub, pixels)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                continue
            if labels != expected:
                failures.append(f"labels {labels}, expected {expected}")
            if disrupted.is_set():
                after += 1
                answered_after += 1
                if after >= 10:
                    return

    load = [asyncio.create_task(caller(index)) for index in range(CALLERS)]

    def reached() -> bool:
        assert not any(task.done() for task in load), "the load ended before the disruption"
        return victim.inference_requests() > victim_before

    # Disrupt the victim only once the load demonstrably reaches it.
    await wait_until_async(reached, READY_TIMEOUT_S, "the load to reach the victim", 0.05)
    await disruption()
    disrupted.set()
    await asyncio.gather(*load)
    return failures, answered_after


async def assert_survivors_serve(
    survivors: list[Replica],
    gateway: GatewayProcess,
    stub: pb_grpc.GRPCInferenceServiceStub,
    digits: tuple[np.ndarray, list[int]],
) -> None:
    """The gateway stays ready and the replicas still running answer every new call."""
    before = sum(replica.inference_requests() for replica in survivors)
    calls = 4
    for number in range(calls):  # one after another: one batch each
        pixels, expected = request_items(0, number, digits)
        assert await classify(stub, pixels) == expected
    assert sum(replica.inference_requests() for replica in survivors) >= before + calls
    reply = httpx.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/ready", timeout=10.0)
    assert reply.status_code == 200


async def test_a_replica_stopped_mid_load_fails_no_request(
    replicas: list[Replica],
    gateway: GatewayProcess,
    stub: pb_grpc.GRPCInferenceServiceStub,
    digits: tuple[np.ndarray, list[int]],
) -> None:
    """Stop a replica (`cnnserve torchserve stop`, as `docker compose stop` or a scale-down
    would) while callers keep sending: every call still gets its right answer.

    Leaves that replica stopped: the tests below run with the others.
    """
    victim = replicas[1]
    failures, answered_after = await load_through(
        lambda: asyncio.to_thread(stop, victim.store), victim, stub, digits
    )
    assert failures == []
    assert answered_after >= 10 * CALLERS
    await assert_survivors_serve([replicas[0], replicas[2]], gateway, stub, digits)


async def test_a_replica_killed_mid_load_fails_no_request(
    replicas: list[Replica],
    gateway: GatewayProcess,
    stub: pb_grpc.GRPCInferenceServiceStub,
    digits: tuple[np.ndarray, list[int]],
) -> None:
    """SIGKILL a replica's JVM and workers mid-load: calls it held are retried elsewhere."""
    victim = replicas[2]

    async def kill() -> None:
        jvm = psutil.Process(victim.server.pid)
        processes = [jvm, *jvm.children(recursive=True)]
        for process in processes:
            process.kill()
        await asyncio.to_thread(psutil.wait_procs, processes, 30)

    failures, answered_after = await load_through(kill, victim, stub, digits)
    assert failures == []
    assert answered_after >= 10 * CALLERS
    await assert_survivors_serve([replicas[0]], gateway, stub, digits)
