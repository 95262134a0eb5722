"""The torchserve backend follows the model repository, live, behind a real gateway.

One TorchServe starts with an empty model store (tokens on); one ``cnnserve serve --backend
torchserve`` process in explicit model control mode serves a copy of the default repository
plus the tutorial's 3-class FCN and a model whose TorchScript file is broken, with only the
ConvNet loaded at start. The unmodified tritonclient loads and unloads models through Triton's
repository extension; TorchServe's management API shows what got registered.

Images travel encoded to TorchServe's workers, which decode them: the backend and an in-process
gateway on the session's TorchServe show a corrupt image failing only its own item (and only
its own caller), every other row equal to the float32 path's for the same image.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.batcher import PartialResults
from cnnserve.gateway.torchserve_backend import TorchServeBackend
from cnnserve.models.registry import get_spec
from cnnserve.models.repository import Repository
from cnnserve.models.steps import normalize
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import response_from_proto
from cnnserve.torchserve_engine.archive import store_archives
from cnnserve.torchserve_engine.process import ServerInfo, start, status, stop
from tests.conftest import RunningTorchServe, served_requests, torchserve_settings
from tests.feature_maps import assert_close, demo_network, hooked_maps
from tests.gateway.harness import running_gateway
from tests.images import digit_png, shapes_png
from tests.models import tutorial_classes as tutorial
from tests.support import GatewayProcess, gateway_process, starts_torchserve

pytestmark = pytest.mark.torchserve

READY_TIMEOUT_S = 120.0
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Deployment:
    """TorchServe (empty at start), the repository and the gateway in front."""

    store: Path
    server: ServerInfo
    repository: Path
    gateway: GatewayProcess

    def registered(self) -> set[str]:
        """The model versions TorchServe holds now (``<name>/<version>``)."""
        return set(status(self.store).workers)

    def client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(
            f"127.0.0.1:{self.gateway.http_port}", network_timeout=READY_TIMEOUT_S
        )


@pytest.fixture(scope="module")
@starts_torchserve
def deployment(
    model_repository: Path, tutorial_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("torchserve_backend")
    repository = root / "repository"
    shutil.copytree(model_repository, repository)
    shutil.copytree(tutorial_repository / "fcn3", repository / "fcn3")
    shutil.copytree(model_repository / "convnet", repository / "broken")
    (repository / "broken" / "1" / "model.pt").write_bytes(b"not a TorchScript file")
    store = root / "store"
    settings = torchserve_settings(store)
    server = start(settings, store)
    try:
        with gateway_process(
            "torchserve",
            root / "gateway.log",
            READY_TIMEOUT_S,
            model_repository=repository,
            model_control_mode="explicit",
            load_models=["convnet"],
            model_store_dir=store,
            torchserve_grpc_target=server.grpc_target,
            torchserve_token_auth=True,
        ) as gateway:
            yield Deployment(store, server, repository, gateway)
    finally:
        stop(store)


def test_the_gateway_registers_what_it_loads_at_start(deployment: Deployment) -> None:
    assert deployment.server.models == ()  # TorchServe started with nothing
    assert deployment.registered() == {"convnet/1"}
    assert [p.name for p in store_archives(deployment.store)] == ["convnet.1.mar"]


def test_a_tutorial_fcn_with_3_classes_loads_serves_and_unloads(
    deployment: Deployment, tutorial_checkpoints: dict[str, Path]
) -> None:
    client = deployment.client()
    client.load_model("fcn3")
    assert deployment.registered() == {"convnet/1", "fcn3/1"}
    items = np.random.default_rng(3).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(items.shape), "FP32")
    tensor.set_data_from_numpy(items, binary_data=True)
    result = client.infer("fcn3", [tensor], outputs=[httpclient.InferRequestedOutput("scores")])
    scores = result.as_numpy("scores")
    network = tutorial.FCN(3)
    network.load_state_dict(torch.load(tutorial_checkpoints["fcn3"], weights_only=True))
    with torch.inference_mode():
        expected = network.eval()(torch.from_numpy(items)).numpy()
    assert scores.shape == expected.shape == (2, 3, 24, 40)
    assert np.abs(scores - expected).max() < TOLERANCE
    client.unload_model("fcn3")
    assert deployment.registered() == {"convnet/1"}
    assert [p.name for p in store_archives(deployment.store)] == ["convnet.1.mar"]


def test_a_broken_version_fails_its_load_with_the_reason_and_the_others_serve(
    deployment: Deployment,
) -> None:
    client = deployment.client()
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("broken")
    assert "could not register broken version 1" in str(refused.value)
    assert "PytorchStreamReader failed reading zip archive" in str(refused.value)
    (row,) = [r for r in client.get_model_repository_index() if r["name"] == "broken"]
    assert row["state"] == "UNAVAILABLE"
    assert "the worker said" in row["reason"]
    assert deployment.registered() == {"convnet/1"}
    assert client.is_model_ready("convnet")


async def test_a_new_version_takes_over_while_the_old_one_serves(deployment: Deployment) -> None:
    """Version 2 appears; loading the model registers 2, routes to it, drains 1 and only then
    unregisters it — callers of the model never see a failure. (httpx here: tritonclient's
    HTTP client cannot be shared between the caller's loop and the load.)"""
    shutil.copytree(
        deployment.repository / "convnet" / "1", deployment.repository / "convnet" / "2"
    )
    base = f"http://127.0.0.1:{deployment.gateway.http_port}"
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 3, 28, 28],
                        "data": [0] * (2 * 3 * 28 * 28)}]}  # fmt: skip
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=base, timeout=READY_TIMEOUT_S) as http:

        async def classify() -> str:
            reply = await http.post("/v2/models/convnet/infer", json=body)
            assert reply.status_code == 200, reply.text
            return str(reply.json()["model_version"])

        async def steady_load() -> list[str]:
            versions = [await classify()]
            while not done.is_set():
                versions.append(await classify())
            return versions

        load = asyncio.create_task(steady_load())
        loaded = await http.post("/v2/repository/models/convnet/load")
        assert loaded.status_code == 200, loaded.text
        done.set()
        answered = await load
        assert set(answered) <= {"1", "2"} and answered[0] == "1"
        assert await classify() == "2"
    assert deployment.registered() == {"convnet/2"}
    index = deployment.client().get_model_repository_index()
    ready = {(r["name"], r.get("version")) for r in index if r.get("state") == "READY"}
    assert ("convnet", "2") in ready and ("convnet", "1") not in ready


# --- images decoded in TorchServe's workers: the session's TorchServe, in-process callers ---

DIGITS = [digit_png(i)[0] for i in range(6)]
#: A digit whose header is valid and whose pixel data is cut short.
CORRUPT = DIGITS[3][:90]
SCENES = [shapes_png(seed, 40)[0] for seed in (1, 2, 3)]
#: A 40×40 scene whose pixel data is cut short.
CORRUPT_SCENE = SCENES[1][:90]


def images(*items: bytes) -> np.ndarray:
    """An object array of encoded images, as the batcher hands the backend a batch."""
    batch = np.empty(len(items), dtype=object)
    batch[:] = items
    return batch


def float32_items(model: str, pngs: list[bytes]) -> np.ndarray:
    """The gateway's float32 path for ``pngs``: decoded, prepared and normalized here."""
    spec = get_spec(model)
    return np.stack([normalize(spec.image_to_pixels(png), spec.normalization) for png in pngs])


@pytest_asyncio.fixture(loop_scope="module", params=[1, 2], ids=["1 worker", "2 workers"])
async def backend(
    torchserve: RunningTorchServe, model_repository: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[TorchServeBackend, Repository]]:
    """The torchserve backend on the session's TorchServe (its versions already registered),
    told TorchServe runs 1 or 2 workers per model: with 2, an image batch of 8 or more goes as
    two concurrent calls (TorchServe queues the second for its one worker)."""
    settings = torchserve.gateway_settings(
        model_repository, torchserve_registration=False, torchserve_workers_per_model=request.param
    )
    backend = TorchServeBackend.from_settings(settings)
    await backend.start()
    try:
        yield backend, Repository(model_repository)
    finally:
        await backend.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_the_backend_sends_images_encoded_and_fails_only_the_corrupt_one(
    backend: tuple[TorchServeBackend, Repository],
) -> None:
    torchserve_backend, repository = backend
    cases = [
        ("convnet", [DIGITS[0], DIGITS[1], CORRUPT, DIGITS[4], DIGITS[5]], [2]),
        ("convnet", [DIGITS[2]], []),
        ("fcn", [SCENES[0], CORRUPT_SCENE, SCENES[1], SCENES[2]], [1]),
        # Shared by two calls with 2 workers: 0–4 and 5–9, a failure in each.
        ("convnet", [*DIGITS[:3], CORRUPT, DIGITS[4], DIGITS[5], CORRUPT, *DIGITS[:3]], [3, 6]),
        # Two calls, the first of which fails whole: placeholder rows for it.
        ("fcn", [CORRUPT_SCENE] * 4 + [*SCENES, SCENES[0]], [0, 1, 2, 3]),
    ]
    for model, pngs, failed in cases:
        version = repository.read(model).versions[1]
        await torchserve_backend.load(version)
        assert torchserve_backend.decodes_images(version)
        answer = await torchserve_backend.infer_batch(version, images(*pngs))
        good = [i for i in range(len(pngs)) if i not in failed]
        float32 = await torchserve_backend.infer_batch(
            version, float32_items(model, [pngs[i] for i in good])
        )
        if failed:
            assert isinstance(answer, PartialResults)
            assert sorted(answer.failures) == failed
            assert all(isinstance(e, InvalidInputError) for e in answer.failures.values())
            assert answer.item_noun == "image"
            rows = answer.rows
        else:
            assert isinstance(answer, np.ndarray)
            rows = answer
        assert len(rows) == len(pngs)
        assert np.abs(rows[good] - float32).max() < TOLERANCE


@pytest.mark.asyncio(loop_scope="module")
async def test_with_two_workers_a_batch_of_eight_images_is_two_calls(
    torchserve: RunningTorchServe, backend: tuple[TorchServeBackend, Repository]
) -> None:
    torchserve_backend, repository = backend
    version = repository.read("convnet").versions[1]
    await torchserve_backend.load(version)
    for count, calls in ((7, 1), (8, 1 + (torchserve_backend.workers_per_model > 1))):
        before = served_requests(torchserve.server)
        answer = await torchserve_backend.infer_batch(version, images(*(DIGITS[:4] * 2)[:count]))
        assert isinstance(answer, np.ndarray) and answer.shape == (count, 10)
        assert served_requests(torchserve.server) - before == calls


@pytest.mark.asyncio(loop_scope="module")
async def test_a_batch_of_only_corrupt_images_fails_every_item(
    backend: tuple[TorchServeBackend, Repository],
) -> None:
    torchserve_backend, repository = backend
    version = repository.read("convnet").versions[1]
    await torchserve_backend.load(version)
    answer = await torchserve_backend.infer_batch(version, images(CORRUPT, DIGITS[1][:70]))
    assert isinstance(answer, PartialResults)
    assert sorted(answer.failures) == [0, 1]
    assert len(answer.rows) == 2


def image_request(model: str, pngs: list[bytes], output: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(pngs), 1])
    tensor.contents.bytes_contents.extend(pngs)
    request.outputs.add(name=output)
    return request


def tensor_request(model: str, items: np.ndarray, output: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=items.shape)
    request.raw_input_contents.append(items.tobytes())
    request.outputs.add(name=output)
    return request


async def rows_of(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest
) -> np.ndarray:
    response = response_from_proto(await stub.ModelInfer(request, timeout=120))
    (output,) = response.outputs
    return output.data


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_callers_through_a_gateway_only_the_corrupt_image_s_caller_fails(
    torchserve: RunningTorchServe, model_repository: Path
) -> None:
    """Uneven image requests from concurrent callers share TorchServe batches; the one with a
    corrupt image gets INVALID_ARGUMENT naming it, every other caller its own rows, equal to
    what the gateway answers for the same images sent as float32 tensors."""
    settings = torchserve.gateway_settings(
        model_repository, max_batch_delay_ms=300.0, adaptive_batch_delay=False
    )
    requests = [
        ("convnet", [DIGITS[0], DIGITS[1]], "logits"),
        ("convnet", [DIGITS[2], CORRUPT, DIGITS[4]], "logits"),
        ("convnet", [DIGITS[5]], "logits"),
        ("fcn", SCENES[:2], "scores"),
        ("fcn", [SCENES[2]], "scores"),
        ("convnet", [DIGITS[4], DIGITS[3], DIGITS[2]], "logits"),
    ]
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = await asyncio.gather(
            *(rows_of(stub, image_request(m, pngs, out)) for m, pngs, out in requests),
            return_exceptions=True,
        )
        refused = answers[1]
        assert isinstance(refused, grpc.aio.AioRpcError)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1: could not decode image" in (refused.details() or "")
        for (model, pngs, output), answer in zip(requests, answers, strict=True):
            if answer is refused:
                continue
            assert isinstance(answer, np.ndarray), answer
            expected = await rows_of(
                stub, tensor_request(model, float32_items(model, pngs), output)
            )
            assert answer.shape == expected.shape
            assert np.abs(answer - expected).max() < TOLERANCE


@pytest.mark.asyncio(loop_scope="module")
async def test_feature_maps_come_from_the_handler_as_the_eager_network_computes_them(
    torchserve: RunningTorchServe, model_repository: Path
) -> None:
    """Through a gateway on the session's TorchServe: the handler runs the archive's feature
    artifact for the maps asked for — images decoded in its workers, a corrupt one failing
    alone — and plain requests still get the plain artifact's rows."""
    settings = torchserve.gateway_settings(model_repository)
    # Three scenes' five maps are 4.6 MB, over gRPC's default 4 MiB a client receives.
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with (
        running_gateway(settings) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}", options=options) as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model, pngs, layers in (
            ("convnet", DIGITS[:3], ("conv1", "pool1", "conv2", "pool2", "fc1")),
            ("fcn", SCENES, ("conv1", "conv2", "conv3", "unsample1", "unsample2")),
        ):
            x = float32_items(model, pngs)
            eager = hooked_maps(demo_network(model), x)
            for request in (
                image_request(model, pngs, layers[0]),
                tensor_request(model, x, layers[0]),
            ):
                for name in layers[1:]:
                    request.outputs.add(name=name)
                reply = response_from_proto(await stub.ModelInfer(request, timeout=120))
                assert_close({t.name: t.data for t in reply.outputs}, eager)
        corrupt = image_request("fcn", [SCENES[0], CORRUPT_SCENE], "conv1")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelInfer(corrupt, timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1: could not decode image" in (refused.value.details() or "")
