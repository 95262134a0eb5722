"""The gateway serves a model repository: tutorial checkpoints of any class count, versions
routed by ``model_version``, and models that come and go (poll and explicit mode) without a
dropped request; broken models are reported and never stop the others.

Real exports (tutorial state_dicts and the demo weights) in a copy of the default repository,
real gateways on free ports, real gRPC stubs.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cnnserve.errors import InvalidInputError, UnavailableError, UnknownModelError
from cnnserve.export.repository import export_to_repository
from cnnserve.gateway.dataplane import DataPlane, create_core
from cnnserve.gateway.model_manager import ModelState, VersionState
from cnnserve.models.checkpoint import load_network
from cnnserve.models.registry import get_spec, weights_path
from cnnserve.models.repository import CONFIG_FILE, EXPORT_FILE, RepositoryError
from cnnserve.models.spec import Architecture
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.domain import InferRequest, InferResponse, RequestedOutput, Tensor
from cnnserve.protocol.grpc_codec import request_to_proto, response_from_proto
from tests.gateway.harness import gateway_settings, metric_samples, running_gateway
from tests.images import digit_png, shapes_png
from tests.models import tutorial_classes as tutorial
from tests.support import wait_until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

PARITY_TOLERANCE = 1e-4
CONVNET = Architecture.CONVNET
FCN = Architecture.FCN
#: The tutorial checkpoints of the session's ``tutorial_repository`` (each served under its
#: own name): name, architecture, classes.
TUTORIAL_MODELS = (("convnet10", CONVNET, 10), ("fcn10", FCN, 10), ("fcn3", FCN, 3))


def copy_repository(source: Path, target: Path) -> Path:
    """A copy of ``source`` to change freely."""
    shutil.copytree(source, target)
    return target


def edit_config(repository: Path, model: str, **fields: Any) -> None:
    """Set top-level fields of a model's config.yaml."""
    path = repository / model / CONFIG_FILE
    config = yaml.safe_load(path.read_text()) or {}
    config.update(fields)
    path.write_text(yaml.safe_dump(config))


def fp32(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """A normalized-looking FP32 batch."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, height, width)).astype(np.float32)


def raw_request(model: str, x: np.ndarray, output: str, version: str = "") -> InferRequest:
    """A request for the raw network output of the FP32 batch ``x``."""
    return InferRequest(
        model,
        [Tensor("input", "FP32", tuple(x.shape), x)],
        [RequestedOutput(output)],
        model_version=version,
    )


async def grpc_infer(
    stub: pb_grpc.GRPCInferenceServiceStub, request: InferRequest
) -> InferResponse:
    """One ModelInfer call through the real gRPC stub."""
    return response_from_proto(await stub.ModelInfer(request_to_proto(request), timeout=60))


@asynccontextmanager
async def grpc_stub(port: int) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """A stub on the gateway's gRPC port."""
    options = [("grpc.max_receive_message_length", 1 << 28)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def eager(network: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """What ``network`` itself computes for ``x``."""
    with torch.inference_mode():
        return network.eval()(torch.from_numpy(x)).numpy()


def rows(core: DataPlane, name: str) -> dict[str, VersionState]:
    """The repository index rows of one model, by version."""
    return {row.version: row for row in core.models.index() if row.name == name}


@asynccontextmanager
async def started_core(repository: Path, **overrides: Any) -> AsyncIterator[DataPlane]:
    """A started data plane (onnxruntime on the CPU) over ``repository``; stopped after."""
    core = await create_core(gateway_settings(repository, **overrides))
    await core.start()
    try:
        yield core
    finally:
        await core.stop(grace_s=10)


# --- tutorial checkpoints of any class count ---


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
async def test_tutorial_checkpoints_serve_what_the_tutorial_class_computes(
    tutorial_repository: Path, tutorial_checkpoints: dict[str, Path], backend: str
) -> None:
    settings = gateway_settings(tutorial_repository, backend=backend)
    async with running_gateway(settings) as gateway, grpc_stub(gateway.grpc_port) as stub:
        for name, architecture, classes in TUTORIAL_MODELS:
            network = (tutorial.ConvNet if architecture is CONVNET else tutorial.FCN)(classes)
            network.load_state_dict(torch.load(tutorial_checkpoints[name]))
            side = 28 if architecture is CONVNET else 23
            x = fp32(3, side, side, seed=classes)
            output = "logits" if architecture is CONVNET else "scores"
            response = await grpc_infer(stub, raw_request(name, x, output))
            (served,) = response.outputs
            expected = eager(network, x)
            assert served.data.shape == expected.shape
            assert served.data.shape[1] == classes
            assert np.abs(served.data - expected).max() < PARITY_TOLERANCE
            assert response.model_version == "1"
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
            assert metadata.platform == gateway.core.backend.describe()
            assert metadata.outputs[0].shape[1] == classes


async def test_the_friendly_route_answers_with_the_repository_model_s_classes(
    tutorial_repository: Path,
) -> None:
    """``/predict`` takes a model's classes and labels from its config and export: three
    classes for the 3-class FCN, the ConvNet's ten for the tutorial digits."""
    scene, _ = shapes_png(seed=2, side=32)
    digit, _ = digit_png(3)
    async with (
        running_gateway(gateway_settings(tutorial_repository)) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        masked = await http.post("/predict/fcn3", content=scene)
        counted = await http.post("/predict/fcn3?format=json", content=scene)
        ranked = await http.post("/predict/convnet10?top_k=10", content=digit)
    assert masked.status_code == 200, masked.text
    mask = np.asarray(Image.open(io.BytesIO(masked.content)))
    assert mask.shape == (32, 32)
    assert int(mask.max()) < 3
    assert set(json.loads(masked.headers["x-pixel-counts"])) == {"0", "1", "2"}
    (counts,) = counted.json()["predictions"]
    assert sum(counts["counts"].values()) == 32 * 32
    (prediction,) = ranked.json()["predictions"]
    assert sorted(entry["label"] for entry in prediction["top_k"]) == [str(i) for i in range(10)]


# --- versions ---


@pytest.fixture(scope="module")
def two_versions(
    model_repository: Path,
    tutorial_checkpoints: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """convnet version 1 (the demo weights) and 2 (the tutorial checkpoint), both served."""
    repository = copy_repository(model_repository, tmp_path_factory.mktemp("two") / "repo")
    export_to_repository(CONVNET, tutorial_checkpoints["convnet10"], "convnet", repository)
    edit_config(repository, "convnet", version_policy={"all": {}})
    return repository


async def test_requests_go_to_the_version_they_name(
    two_versions: Path, tutorial_checkpoints: dict[str, Path]
) -> None:
    demo = load_network(get_spec("convnet"), weights_path("convnet"))
    second = tutorial.ConvNet(10)
    second.load_state_dict(torch.load(tutorial_checkpoints["convnet10"]))
    x = fp32(2, 28, 28, seed=7)
    async with (
        running_gateway(gateway_settings(two_versions)) as gateway,
        grpc_stub(gateway.grpc_port) as stub,
    ):
        for version, network, answered in (("1", demo, "1"), ("2", second, "2"), ("", second, "2")):
            response = await grpc_infer(stub, raw_request("convnet", x, "logits", version))
            assert response.model_version == answered
            assert np.abs(response.outputs[0].data - eager(network, x)).max() < PARITY_TOLERANCE
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="convnet"))
        assert list(metadata.versions) == ["1", "2"]
        for version in ("1", "2"):
            ready = await stub.ModelReady(pb.ModelReadyRequest(name="convnet", version=version))
            assert ready.ready
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await grpc_infer(stub, raw_request("convnet", x, "logits", "3"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert unknown.value.details() == (
            "model convnet has no version '3'; available versions: 1, 2"
        )
        with pytest.raises(grpc.aio.AioRpcError) as not_ready:
            await stub.ModelReady(pb.ModelReadyRequest(name="convnet", version="3"))
        assert not_ready.value.code() == grpc.StatusCode.NOT_FOUND
        # Statistics and metrics are kept per version.
        stats = {s.version: s for s in gateway.core.models.statistics("convnet")}
        assert (stats["1"].success.count, stats["2"].success.count) == (1, 2)
        assert (stats["1"].inference_count, stats["2"].inference_count) == (2, 4)
        samples = await metric_samples(gateway.metrics_port)
        for version, count in (("1", 1), ("2", 2)):
            labels = {"model": "convnet", "version": version, "outcome": "success"}
            assert samples[("cnnserve_requests_total", frozenset(labels.items()))] == count


async def test_predict_answers_from_the_version_it_names(two_versions: Path) -> None:
    """``POST /predict/{model}?version=`` as the protocol's routes: the named version
    answers, the highest ready one without a name, and one not served is 404 naming those
    that are."""
    digit, _ = digit_png(0)
    async with (
        running_gateway(gateway_settings(two_versions)) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http,
    ):
        answers = {}
        for version in ("1", "2", ""):
            reply = await http.post("/predict/convnet", params={"version": version}, content=digit)
            assert reply.status_code == 200, reply.text
            answers[version] = reply.json()
        missing = await http.post("/predict/convnet", params={"version": "3"}, content=digit)
        stats = {s.version: s.success.count for s in gateway.core.models.statistics("convnet")}
    # The demo weights and the tutorial checkpoint rank the digit differently.
    assert answers["1"] != answers["2"] == answers[""]
    assert missing.status_code == 404
    assert missing.json()["error"] == "model convnet has no version '3'; available versions: 1, 2"
    assert stats == {"1": 1, "2": 2}


# --- poll mode ---


async def test_poll_mode_swaps_versions_under_load_without_a_failed_request(
    model_repository: Path, tmp_path: Path
) -> None:
    """Four gRPC callers in a loop; version 2 is exported into the repository, then version 1
    removed: no call fails, the new version answers, the old one is gone from the index."""
    repository = copy_repository(model_repository, tmp_path / "repo")
    settings = gateway_settings(
        repository, model_control_mode="poll", repository_poll_interval_s=0.2
    )
    x = fp32(1, 28, 28, seed=1)
    answered: dict[str, int] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        while not stop.is_set():
            try:
                response = await grpc_infer(stub, raw_request("convnet", x, "logits"))
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")
            else:
                answered[response.model_version] = answered.get(response.model_version, 0) + 1

    async with running_gateway(settings) as gateway, grpc_stub(gateway.grpc_port) as stub:
        callers = [asyncio.create_task(caller(stub)) for _ in range(4)]
        await wait_until_async(lambda: answered.get("1", 0) >= 20, 30, "version 1 to answer")
        await asyncio.to_thread(
            export_to_repository, CONVNET, weights_path("convnet"), "convnet", repository
        )
        await wait_until_async(
            lambda: (
                rows(gateway.core, "convnet").get("2")
                == VersionState("convnet", "2", ModelState.READY)
            ),
            30,
            "version 2 to be READY",
        )
        shutil.rmtree(repository / "convnet" / "1")
        only_two = {"2": VersionState("convnet", "2", ModelState.READY)}
        await wait_until_async(
            lambda: rows(gateway.core, "convnet") == only_two, 30, "version 1 to go"
        )
        seen = answered.get("2", 0)
        await wait_until_async(lambda: answered.get("2", 0) >= seen + 50, 30, "more answers")
        stop.set()
        await asyncio.gather(*callers)
        samples = await metric_samples(gateway.metrics_port)
    assert failures == []
    assert answered["1"] >= 20
    assert answered["2"] >= 50
    series = [dict(labels) for _, labels in samples]
    versions = {labels["version"] for labels in series if labels.get("model") == "convnet"}
    assert "2" in versions
    assert "1" not in versions, "version 1's metric series outlived its unload"


async def test_poll_mode_follows_new_removed_and_changed_models(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(model_repository, tmp_path / "repo")
    async with started_core(
        repository, model_control_mode="poll", repository_poll_interval_s=0.1
    ) as core:
        x = fp32(1, 28, 28, seed=3)
        # A new model appears.
        shutil.copytree(repository / "convnet", repository / "digits")
        await wait_until_async(lambda: "digits" in core.model_names(), 30, "digits to load")
        labels = [RequestedOutput("labels", {"top_k": 10})]
        before = await core.infer(
            InferRequest("digits", [Tensor("input", "FP32", x.shape, x)], labels)
        )
        # Its config changes: the version is loaded again with the new labels.
        edit_config(repository, "digits", labels=[f"digit {i}" for i in range(10)])
        loaded = core.models.version("digits")
        await wait_until_async(lambda: core.models.version("digits") is not loaded, 30, "reload")
        after = await core.infer(
            InferRequest("digits", [Tensor("input", "FP32", x.shape, x)], labels)
        )
        renamed = [f"digit {label.decode()}".encode() for label in before.outputs[0].data[0]]
        assert list(after.outputs[0].data[0]) == renamed
        # The model goes away.
        shutil.rmtree(repository / "digits")
        await wait_until_async(lambda: "digits" not in core.model_names(), 30, "digits to go")
        with pytest.raises(UnknownModelError, match="unknown model 'digits'"):
            core.models.version("digits")
        assert "digits" not in {row.name for row in core.models.index()}
        assert core.model_names() == ["convnet", "fcn"]


async def test_a_changed_version_that_fails_to_load_keeps_the_old_files_serving(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(model_repository, tmp_path / "repo")
    async with started_core(
        repository, model_control_mode="poll", repository_poll_interval_s=0.1
    ) as core:
        (repository / "fcn" / "1" / "model.onnx").write_bytes(b"truncated")
        await wait_until_async(
            lambda: "reloading changed files failed" in rows(core, "fcn")["1"].reason,
            30,
            "the failed reload to be reported",
        )
        row = rows(core, "fcn")["1"]
        assert row.state is ModelState.READY
        assert "model.onnx: cannot be loaded" in row.reason
        x = fp32(1, 9, 9, seed=0)
        response = await core.infer(raw_request("fcn", x, "scores"))
        assert response.outputs[0].data.shape == (1, 4, 9, 9)


# --- explicit mode ---


async def test_explicit_mode_loads_and_unloads_on_request(model_repository: Path) -> None:
    async with started_core(
        model_repository, model_control_mode="explicit", load_models=["convnet"]
    ) as core:
        models = core.models
        index = models.index()
        assert [(row.name, row.version, row.state) for row in index] == [
            ("convnet", "1", ModelState.READY),
            ("fcn", "", ModelState.UNAVAILABLE),
        ]
        assert index[1].reason.startswith("not loaded; load it through the repository API")
        x = fp32(1, 9, 9, seed=0)
        with pytest.raises(UnavailableError, match="model fcn has no ready version: not loaded"):
            await core.infer(raw_request("fcn", x, "scores"))
        await models.load("fcn")
        assert (await core.infer(raw_request("fcn", x, "scores"))).model_version == "1"
        await models.unload("convnet")
        assert rows(core, "convnet") == {
            "1": VersionState("convnet", "1", ModelState.UNAVAILABLE, "unloaded")
        }
        with pytest.raises(UnavailableError, match="convnet has no ready version"):
            await core.infer(raw_request("convnet", fp32(1, 28, 28, 0), "logits"))
        with pytest.raises(UnknownModelError, match="'convnet' is not loaded; loaded models: fcn"):
            await models.unload("convnet")
        with pytest.raises(
            UnknownModelError, match="has no model 'resnet'; it holds: convnet, fcn"
        ):
            await models.load("resnet")
        await models.load("convnet")
        assert core.model_names() == ["convnet", "fcn"]
        assert await core.server_ready()


@pytest.mark.parametrize("name", ["..", "../fcn", "a/b", "fcn\x00", ".hidden", "-x", "x" * 300])
async def test_unsafe_names_are_refused(model_repository: Path, name: str) -> None:
    async with started_core(model_repository, model_control_mode="explicit") as core:
        for call in (core.models.load, core.models.unload):
            with pytest.raises(InvalidInputError, match="model name"):
                await call(name)
        with pytest.raises(UnknownModelError, match="unknown model"):
            await core.infer(raw_request(name, fp32(1, 9, 9, 0), "scores"))


async def test_load_and_unload_need_explicit_mode(model_repository: Path) -> None:
    async with started_core(model_repository) as core:
        with pytest.raises(UnavailableError, match="model_control_mode none; start it with"):
            await core.models.load("fcn")
        with pytest.raises(UnavailableError, match="model_control_mode none"):
            await core.models.unload("fcn")
        assert core.model_names() == ["convnet", "fcn"]


async def test_load_models_must_name_models_of_the_repository(model_repository: Path) -> None:
    core = await create_core(
        gateway_settings(model_repository, model_control_mode="explicit", load_models=["fnc"])
    )
    with pytest.raises(UnknownModelError, match="load_models names fnc, which the repository"):
        await core.start()


async def test_load_and_unload_of_one_model_are_serialized(model_repository: Path) -> None:
    """Load and unload of one model never overlap (a lock per model), in the order asked;
    two models load side by side."""
    async with started_core(model_repository, model_control_mode="explicit") as core:
        events: list[str] = []
        backend = core.backend
        load, unload = backend.load, backend.unload

        async def slow_load(model: Any) -> None:
            events.append(f"load {model.spec.name} begins")
            await asyncio.sleep(0.3)
            await load(model)
            events.append(f"load {model.spec.name} ends")

        async def recorded_unload(model: Any) -> None:
            events.append(f"unload {model.spec.name} begins")
            await unload(model)
            events.append(f"unload {model.spec.name} ends")

        backend.load = slow_load  # type: ignore[method-assign]
        backend.unload = recorded_unload  # type: ignore[method-assign]
        await asyncio.gather(core.models.load("fcn"), core.models.unload("fcn"))
        assert events == [
            "load fcn begins",
            "load fcn ends",
            "unload fcn begins",
            "unload fcn ends",
        ]
        assert "fcn" not in core.model_names()
        events.clear()
        await asyncio.gather(core.models.load("fcn"), core.models.load("convnet"))
        assert set(events[:2]) == {"load fcn begins", "load convnet begins"}


async def test_unload_lets_the_calls_in_flight_finish(model_repository: Path) -> None:
    """Calls queued when the unload starts are answered; the version is UNLOADING meanwhile
    and takes no new call; then it is unloaded."""
    async with started_core(
        model_repository,
        model_control_mode="explicit",
        load_models=["*"],
        max_batch_delay_ms=1500.0,
        adaptive_batch_delay=False,
    ) as core:
        x = fp32(1, 28, 28, seed=2)
        calls = [
            asyncio.create_task(core.infer(raw_request("convnet", x, "logits"))) for _ in range(3)
        ]
        served = core.models.route("convnet")
        depth = {"model": "convnet", "version": "1"}

        def queued() -> float | None:
            return core.metrics.registry.get_sample_value("cnnserve_queue_depth", depth)

        await wait_until_async(lambda: queued() == 3, 10, "three queued calls", 0.01)
        unloading = asyncio.create_task(core.models.unload("convnet"))
        await wait_until_async(
            lambda: rows(core, "convnet")["1"].state is ModelState.UNLOADING, 10, "UNLOADING", 0.01
        )
        with pytest.raises(UnavailableError, match="no ready version"):
            await core.infer(raw_request("convnet", x, "logits"))
        assert not unloading.done()
        for response in await asyncio.gather(*calls):
            assert response.outputs[0].data.shape == (1, 10)
        await unloading
        assert rows(core, "convnet")["1"].state is ModelState.UNAVAILABLE
        assert not await core.backend.ready(served.model)


# --- broken models ---


async def test_broken_models_are_reported_and_the_others_serve(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(model_repository, tmp_path / "repo")
    for name in ("bad_config", "no_export", "bad_artifact", "no_versions"):
        shutil.copytree(repository / "convnet", repository / name)
    (repository / "bad_config" / CONFIG_FILE).write_text("architecture: resnet\n")
    (repository / "no_export" / "1" / EXPORT_FILE).unlink()
    (repository / "bad_artifact" / "1" / "model.onnx").write_bytes(b"\x00" * 64)
    shutil.rmtree(repository / "no_versions" / "1")
    (repository / "bad name").mkdir()
    # A broken newer version leaves the usable older one serving.
    shutil.copytree(repository / "fcn" / "1", repository / "fcn" / "2")
    (repository / "fcn" / "2" / EXPORT_FILE).write_text("{not json")
    async with started_core(repository) as core:
        assert core.model_names() == ["convnet", "fcn"]
        # Models that were to be served and serve no version: the server is not ready.
        assert core.models.unservable() == [
            "bad name",
            "bad_artifact",
            "bad_config",
            "no_export",
            "no_versions",
        ]
        assert not await core.server_ready()
        index = {(row.name, row.version): row for row in core.models.index()}
        reasons = {key: (row.state, row.reason) for key, row in index.items()}
        assert reasons[("convnet", "1")] == (ModelState.READY, "")
        assert reasons[("fcn", "1")] == (ModelState.READY, "")
        expected = {
            ("bad_config", ""): "config.yaml: architecture: Input should be 'convnet' or 'fcn'",
            ("no_export", "1"): "export.json: missing; export the version with cnnserve export",
            ("bad_artifact", "1"): "model.onnx: cannot be loaded",
            ("no_versions", ""): "the model folder holds no version",
            ("bad name", ""): "model name 'bad name' is not allowed",
            ("fcn", "2"): "export.json: cannot be read",
        }
        for key, reason in expected.items():
            state, text = reasons[key]
            assert state is ModelState.UNAVAILABLE, key
            assert reason in text, (key, text)
        with pytest.raises(UnavailableError, match="bad_artifact has no ready version: version 1"):
            await core.infer(raw_request("bad_artifact", fp32(1, 28, 28, 0), "logits"))
        response = await core.infer(raw_request("fcn", fp32(1, 9, 9, 0), "scores"))
        assert response.model_version == "1"


async def test_a_broken_newer_version_leaves_the_server_ready(
    model_repository: Path, tmp_path: Path
) -> None:
    """Readiness asks that every model serve, not that every file be loadable: an older
    version serving is enough."""
    repository = copy_repository(model_repository, tmp_path / "repo")
    shutil.copytree(repository / "fcn" / "1", repository / "fcn" / "2")
    (repository / "fcn" / "2" / EXPORT_FILE).write_text("{not json")
    async with started_core(repository) as core:
        assert core.models.unservable() == []
        assert await core.server_ready()


async def test_a_repository_that_is_not_there_fails_the_start(tmp_path: Path) -> None:
    core = await create_core(gateway_settings(tmp_path / "missing"))
    with pytest.raises(RepositoryError, match="missing: the model repository is not a folder"):
        await core.start()
