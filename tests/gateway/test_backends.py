"""The backends: in-process ones on the real exported artifacts (agreeing with each other);
the torchserve backend against a real TorchServe, without one, and against one that hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from cnnserve.errors import DeadlineExceededError, InvalidInputError, UnavailableError
from cnnserve.gateway.backends import Backend, InProcessBackend, RunnerOptions, create_backend
from cnnserve.gateway.torchserve_backend import TorchServeBackend
from cnnserve.models.pixels import Normalization
from cnnserve.models.repository import ModelVersion, Repository
from cnnserve.models.runtime import load_runner
from cnnserve.models.steps import normalize
from cnnserve.protocol import torchserve_inference_pb2 as ts_pb
from cnnserve.protocol import torchserve_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.process import KEY_FILE, run_dir_of
from tests.conftest import RunningTorchServe
from tests.support import free_ports

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARITY_TOLERANCE = 1e-4


def _batch(n: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3, height, width)).astype(np.float32)


def versions_of(repository: Path) -> dict[str, ModelVersion]:
    """Version 1 of each model in ``repository``."""
    return {name: Repository(repository).read(name).versions[1] for name in ("convnet", "fcn")}


@pytest.fixture(scope="module")
def models(model_repository: Path) -> dict[str, ModelVersion]:
    """Version 1 of both demo models, from the default repository."""
    return versions_of(model_repository)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backends(
    model_repository: Path, models: dict[str, ModelVersion]
) -> AsyncIterator[dict[str, Backend]]:
    """Both in-process backends, started on the CPU as ``cnnserve serve`` builds them, with
    both models loaded."""
    started: dict[str, Backend] = {}
    for name in ("onnxruntime", "torchscript"):
        settings = Settings(backend=name, model_repository=model_repository, device="cpu")
        backend = create_backend(settings)
        await backend.start()
        for model in models.values():
            await backend.load(model)
        started[name] = backend
    yield started
    for backend in started.values():
        await backend.close()


async def test_platforms_are_named_as_triton_names_them(backends: dict[str, Backend]) -> None:
    assert backends["onnxruntime"].describe() == "onnxruntime_onnx"
    assert backends["torchscript"].describe() == "pytorch_libtorch"


@pytest.mark.parametrize("model", ["convnet", "fcn"])
async def test_ready_runs_a_probe(
    backends: dict[str, Backend], models: dict[str, ModelVersion], model: str
) -> None:
    for backend in backends.values():
        assert await backend.ready(models[model])


async def test_convnet_parity_on_uneven_batches(
    backends: dict[str, Backend], models: dict[str, ModelVersion]
) -> None:
    for n in (2, 3, 1):
        x = _batch(n, 28, 28, seed=n)
        ort = await backends["onnxruntime"].infer_batch(models["convnet"], x)
        ts = await backends["torchscript"].infer_batch(models["convnet"], x)
        assert ort.shape == ts.shape == (n, 10)
        assert ort.dtype == ts.dtype == np.float32
        assert np.abs(ort - ts).max() <= PARITY_TOLERANCE


async def test_only_torchscript_takes_pixels_and_normalizes_them(
    backends: dict[str, Backend], models: dict[str, ModelVersion]
) -> None:
    convnet = models["convnet"]
    assert backends["torchscript"].takes_pixels(convnet)
    assert not backends["onnxruntime"].takes_pixels(convnet)
    pixels = np.random.default_rng(3).integers(0, 256, (3, 3, 28, 28), dtype=np.uint8)
    from_pixels = await backends["torchscript"].infer_batch(convnet, pixels)
    from_floats = await backends["onnxruntime"].infer_batch(convnet, normalize(pixels))
    assert np.abs(from_pixels - from_floats).max() <= PARITY_TOLERANCE


async def test_read_only_batches_as_transports_hand_them_over(
    backends: dict[str, Backend], models: dict[str, ModelVersion]
) -> None:
    """A lone request's batch is a read-only view of the received message (here one that
    starts at an odd offset, as raw contents inside a protobuf do): both backends answer it
    as they answer an owned copy, torch without warning about a non-writable array, and
    neither writes into it."""
    convnet = models["convnet"]
    for n in (2, 3, 1):
        owned = _batch(n, 28, 28, seed=10 + n)
        received = b"\x07" + owned.tobytes()
        view = np.frombuffer(memoryview(received)[1:], dtype="<f4").reshape(owned.shape)
        assert not view.flags.writeable
        for name, backend in backends.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                from_view = await backend.infer_batch(convnet, view)
            expected = await backend.infer_batch(convnet, owned.copy())
            np.testing.assert_array_equal(from_view, expected, err_msg=name)
        assert received == b"\x07" + owned.tobytes()


async def test_runner_options_come_from_settings(
    model_repository: Path, models: dict[str, ModelVersion]
) -> None:
    settings = Settings(
        backend="torchscript",
        model_repository=model_repository,
        device="cpu",
        inference_threads=2,
        channels_last=False,
        device_preprocess=False,
        cuda_graph_batch_sizes=[4, 1, 2],
    )
    assert RunnerOptions.from_settings(settings) == RunnerOptions(
        threads=2,
        channels_last=False,
        device_preprocess=False,
        pinned_memory=True,
        cuda_graph_batch_sizes=(4, 1, 2),
    )
    convnet = models["convnet"]
    backend = create_backend(settings)
    await backend.start()
    await backend.load(convnet)
    try:
        # device_preprocess off: the edge keeps normalizing; the CUDA options are inert here.
        assert not backend.takes_pixels(convnet)
        x = _batch(3, 28, 28, seed=9)
        reference = load_runner(convnet.artifact("torchscript"), "torchscript", "cpu").infer(x)
        out = await backend.infer_batch(convnet, x)
        assert np.abs(out - reference).max() <= PARITY_TOLERANCE
    finally:
        await backend.close()


@pytest.mark.parametrize(("n", "height", "width"), [(2, 7, 7), (3, 28, 45), (1, 64, 64)])
async def test_fcn_parity_at_several_sizes(
    backends: dict[str, Backend],
    models: dict[str, ModelVersion],
    n: int,
    height: int,
    width: int,
) -> None:
    x = _batch(n, height, width, seed=height * width)
    ort = await backends["onnxruntime"].infer_batch(models["fcn"], x)
    ts = await backends["torchscript"].infer_batch(models["fcn"], x)
    assert ort.shape == ts.shape == (n, 4, height, width)
    assert np.abs(ort - ts).max() <= PARITY_TOLERANCE


async def test_unloaded_or_closed_versions_are_unavailable(
    models: dict[str, ModelVersion],
) -> None:
    backend = InProcessBackend("onnx", "onnxruntime_onnx")
    await backend.start()
    await backend.load(models["convnet"])
    assert await backend.ready(models["convnet"])
    assert not await backend.ready(models["fcn"])
    with pytest.raises(UnavailableError, match="fcn version 1 is not loaded"):
        await backend.infer_batch(models["fcn"], _batch(1, 7, 7, 0))
    await backend.close()
    assert not await backend.ready(models["convnet"])
    with pytest.raises(UnavailableError, match="convnet version 1 is not loaded"):
        await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))


async def test_two_loads_of_one_version_are_kept_apart(model_repository: Path) -> None:
    """A reload loads the changed version while the old one still serves: the backend holds
    both, each with its own normalization, and unloading one leaves the other running."""
    old = versions_of(model_repository)["convnet"]
    spec = dataclasses.replace(old.spec, normalization=Normalization(0.0, 1.0))
    changed = dataclasses.replace(old, spec=spec)
    backend = InProcessBackend("torchscript", "pytorch_libtorch", device="cpu")
    await backend.start()
    try:
        await backend.load(old)
        await backend.load(changed)
        pixels = np.random.default_rng(5).integers(0, 256, (2, 3, 28, 28), dtype=np.uint8)
        before = await backend.infer_batch(old, pixels)
        after = await backend.infer_batch(changed, pixels)
        assert np.abs(before - after).max() > 1e-2  # each runner normalizes its own way
        await backend.unload(old)
        assert not await backend.ready(old)
        assert await backend.ready(changed)
        np.testing.assert_array_equal(await backend.infer_batch(changed, pixels), after)
    finally:
        await backend.close()


@pytest.mark.parametrize(
    ("backend_name", "damage", "message"),
    [
        ("torchscript", "missing", r"1/model\.pt is missing: the pytorch_libtorch backend needs"),
        ("onnxruntime", "garbage", r"1/model\.onnx: cannot be loaded: "),
        ("torchscript", "garbage", r"1/model\.pt: cannot be loaded: "),
        ("onnxruntime", "torchscript", "asks for the torchscript artifact, but the "),
    ],
)
async def test_a_version_that_cannot_load_says_why(
    model_repository: Path, tmp_path: Path, backend_name: str, damage: str, message: str
) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(model_repository, repository)
    folder = repository / "convnet" / "1"
    artifact = folder / ("model.pt" if backend_name == "torchscript" else "model.onnx")
    if damage == "missing":
        artifact.unlink()
    elif damage == "garbage":
        artifact.write_bytes(b"not a model at all")
    else:
        config = repository / "convnet" / "config.yaml"
        config.write_text(config.read_text() + "artifact_format: torchscript\n")
    model = versions_of(repository)["convnet"]
    backend = create_backend(
        Settings(backend=backend_name, model_repository=repository, device="cpu")
    )
    await backend.start()
    try:
        with pytest.raises(UnavailableError, match=message):
            await backend.load(model)
        assert not await backend.ready(model)
    finally:
        await backend.close()


async def test_torchserve_backend_without_torchserve_is_unavailable(
    models: dict[str, ModelVersion],
) -> None:
    settings = Settings(
        backend="torchserve",
        torchserve_grpc_target=f"127.0.0.1:{free_ports(1)[0]}",
        torchserve_token_auth=False,
        torchserve_call_timeout_s=5,
    )
    backend = create_backend(settings)
    assert backend.describe() == "torchserve"
    await backend.start()
    try:
        await backend.load(models["convnet"])  # a TorchServe not up yet is not a load failure
        assert not await backend.ready(models["convnet"])
        with pytest.raises(UnavailableError, match="is unavailable"):
            await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))
    finally:
        await backend.close()


async def test_torchserve_backend_reads_the_key_when_it_appears(
    models: dict[str, ModelVersion], tmp_path: Path
) -> None:
    key_file = tmp_path / "key_file.json"
    backend = TorchServeBackend(
        f"127.0.0.1:{free_ports(1)[0]}", key_file, max_message_bytes=2**20, timeout_s=5
    )
    await backend.start()  # TorchServe not started yet: not fatal
    try:
        await backend.load(models["convnet"])
        with pytest.raises(UnavailableError, match=r"key_file\.json not found"):
            await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))
        assert not await backend.ready(models["convnet"])
        key_file.write_text('{"inference": {"key": "k1"}, "management": {"key": "k2"}}')
        # With the key read, the call now gets as far as the (absent) server.
        with pytest.raises(UnavailableError, match="is unavailable"):
            await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))
    finally:
        await backend.close()


class HangingTorchServe(pb_grpc.InferenceAPIsServiceServicer):  # type: ignore[misc]
    """A TorchServe whose worker never answers: it notes each call's metadata and hangs."""

    def __init__(self) -> None:
        self.authorizations: list[str] = []

    async def Predictions(  # noqa: N802 (the gRPC method's name)
        self, request: ts_pb.PredictionsRequest, context: grpc.aio.ServicerContext
    ) -> ts_pb.PredictionResponse:
        self.authorizations += [v for k, v in context.invocation_metadata() if k == "authorization"]
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


@pytest_asyncio.fixture(loop_scope="module")
async def hanging_torchserve() -> AsyncIterator[tuple[str, HangingTorchServe]]:
    """A hanging TorchServe on a free loopback port: its gRPC target and servicer."""
    server = grpc.aio.server()
    servicer = HangingTorchServe()
    pb_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", servicer
    await server.stop(grace=None)


async def test_the_gateway_gives_up_on_torchserve_after_its_call_timeout(
    hanging_torchserve: tuple[str, HangingTorchServe],
    models: dict[str, ModelVersion],
    tmp_path: Path,
) -> None:
    """The gateway's wait is torchserve_call_timeout_s, not TorchServe's worker timeout
    (torchserve_response_timeout_s); the key comes from where `torchserve start` leaves it."""
    target, servicer = hanging_torchserve
    key_file = run_dir_of(tmp_path) / KEY_FILE
    key_file.parent.mkdir()
    key_file.write_text('{"inference": {"key": "k-inference"}}')
    settings = Settings(
        backend="torchserve",
        model_store_dir=tmp_path,
        torchserve_grpc_target=target,
        torchserve_call_timeout_s=0.5,
        torchserve_response_timeout_s=600,
    )
    backend = create_backend(settings)
    await backend.start()
    try:
        started = time.monotonic()
        with pytest.raises(
            DeadlineExceededError, match=r"did not answer convnet version 1 within 0\.5 s"
        ):
            await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))
        assert 0.5 <= time.monotonic() - started < 10
    finally:
        await backend.close()
    assert servicer.authorizations == ["Bearer k-inference"]


@pytest.mark.torchserve
async def test_torchserve_backend_agrees_with_the_in_process_ones(
    torchserve: RunningTorchServe,
    backends: dict[str, Backend],
    models: dict[str, ModelVersion],
) -> None:
    backend = create_backend(torchserve.settings.model_copy(update={"backend": "torchserve"}))
    await backend.start()
    try:
        for model in models.values():
            await backend.load(model)
            assert await backend.ready(model)
        cases = [("convnet", n, 28, 28) for n in (2, 3, 1)]
        cases += [("fcn", 2, 7, 7), ("fcn", 3, 28, 45)]
        for model, n, height, width in cases:
            x = _batch(n, height, width, seed=n + height)
            remote = await backend.infer_batch(models[model], x)
            local = await backends["onnxruntime"].infer_batch(models[model], x)
            assert remote.shape == local.shape
            assert np.abs(remote - local).max() <= PARITY_TOLERANCE
    finally:
        await backend.close()


@pytest.mark.torchserve
async def test_torchserve_backend_with_a_wrong_key_is_unavailable(
    torchserve: RunningTorchServe, models: dict[str, ModelVersion], tmp_path: Path
) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text('{"inference": {"key": "wrong"}, "management": {"key": "wrong"}}')
    backend = TorchServeBackend(
        torchserve.grpc_target, key_file, max_message_bytes=2**24, timeout_s=30
    )
    await backend.start()
    try:
        await backend.load(models["convnet"])
        assert not await backend.ready(models["convnet"])
        with pytest.raises(UnavailableError, match="refused the inference key"):
            await backend.infer_batch(models["convnet"], _batch(1, 28, 28, 0))
    finally:
        await backend.close()


async def test_feature_batches_are_priced_with_their_maps(models: dict[str, ModelVersion]) -> None:
    """A batch of feature maps takes every map twice on top of a plain batch's working memory
    (the feature artifact holds them all, the rows copy them): at the smallest
    max_batch_model_bytes a 128×128 FCN item runs plain but its maps are refused, and a batch
    of 64×64 items runs in parts, with the rows of one whole batch."""
    options = RunnerOptions(max_batch_model_bytes=64 << 20)
    backend = InProcessBackend("onnx", "onnxruntime_onnx", device="cpu", options=options)
    await backend.start()
    fcn = models["fcn"]
    await backend.load(fcn)
    try:
        assert len(await backend.infer_batch(fcn, _batch(1, 128, 128, 0))) == 1
        with pytest.raises(InvalidInputError, match=r"one 128×128 image takes .* working memory"):
            await backend.infer_features(fcn, _batch(1, 128, 128, 0), ("conv1",))
        batch = _batch(9, 64, 64, 1)
        rows = await backend.infer_features(fcn, batch, ("conv3",))
        whole = load_runner(fcn.artifact("onnx"), "onnx", "cpu").infer_features(batch, ("conv3",))
        assert rows.shape == whole.shape
        assert np.abs(rows - whole).max() < PARITY_TOLERANCE
    finally:
        await backend.close()
