"""The shared handler core: TorchServe batches in, one reply per request out, errors isolated."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ts.context import Context

from cnnserve.errors import InvalidInputError
from cnnserve.handlers.packing import (
    LAYERS_INPUT_NAME,
    PACKED_CONTENT_TYPE,
    PACKED_INPUT_NAME,
    RESULTS_CONTENT_TYPE,
    pack,
    pack_images,
    unpack_response,
    unpack_results,
)
from cnnserve.handlers.service import ModelHandler, artifact_format_of
from cnnserve.models.features import FEATURE_LAYERS, item_shapes, split_rows
from cnnserve.models.pixels import Normalization
from cnnserve.models.registry import get_spec
from cnnserve.models.repository import ARTIFACT_FILES, Repository, RepositoryError
from cnnserve.models.runtime import ArtifactFormat, Runner, load_runner
from cnnserve.models.steps import normalize
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_version
from tests.feature_maps import assert_close, demo_network, hooked_maps
from tests.models import tutorial_classes as tutorial

from ..images import digit_png, encode, shapes_png
from .conftest import Unpacked
from .harness import Request, call, make_context, request, unpack

TOLERANCE = 1e-4


def items(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 3, height, width)).astype(np.float32)


def loaded(
    model_dir: Path, handler_options: dict[str, object] | None = None
) -> tuple[ModelHandler, Context]:
    """A handler that has loaded the archive unpacked in ``model_dir``, and its context."""
    handler = ModelHandler()
    context = make_context(model_dir, handler_options=handler_options)
    assert handler.handle(None, context) is None
    return handler, context


def convnet(
    unpacked: Unpacked, artifact_format: ArtifactFormat = "torchscript"
) -> tuple[ModelHandler, Context]:
    return loaded(unpacked("convnet", artifact_format))


def reference(
    unpacked: Unpacked, model: str, artifact_format: ArtifactFormat = "torchscript"
) -> Runner:
    """The archived artifact run in this process."""
    artifact = unpacked(model, artifact_format) / ARTIFACT_FILES[artifact_format]
    return load_runner(artifact, artifact_format, "cpu")


@pytest.mark.parametrize(
    ("artifact_format", "artifact"), [("torchscript", "model.pt"), ("onnx", "model.onnx")]
)
def test_initialization_loads_the_archived_artifact_on_the_cpu(
    unpacked: Unpacked, artifact_format: ArtifactFormat, artifact: str
) -> None:
    handler, _ = convnet(unpacked, artifact_format)
    assert handler.model is not None
    assert handler.model.artifact == unpacked("convnet", artifact_format) / artifact
    assert handler.model.artifact_format == artifact_format
    assert handler.model.runner.device in {"cpu", "CPUExecutionProvider"}
    assert not handler.model.half
    # The registry's spec, with the feature maps the archived export.json lists.
    demo = get_spec("convnet")
    layers = FEATURE_LAYERS[demo.architecture]
    assert handler.spec == dataclasses.replace(demo, feature_layers=layers)


def test_half_precision_without_a_gpu_runs_fp32(unpacked: Unpacked) -> None:
    handler, context = loaded(unpacked("convnet", "torchscript"), {"half": True})
    assert handler.model is not None and not handler.model.half
    (answer,) = call(handler.handle, context, [request(pack(items(2)), PACKED_INPUT_NAME)])
    assert unpack_response(answer.body).shape == (2, 10)


def test_threads_option_bounds_the_worker_s_torch_threads(unpacked: Unpacked) -> None:
    # A worker process serves one model, so the handler sets torch's process-wide count.
    before = torch.get_num_threads()
    try:
        handler, _ = loaded(unpacked("convnet", "torchscript"), {"threads": 1})
        assert torch.get_num_threads() == 1
        assert handler.model is not None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("artifact_format", ["torchscript", "onnx"])
def test_uneven_packed_batches_each_get_their_own_outputs(
    unpacked: Unpacked, artifact_format: ArtifactFormat
) -> None:
    handler, context = convnet(unpacked, artifact_format)
    runner = reference(unpacked, "convnet", artifact_format)
    batches = [items(2, seed=1), items(3, seed=2), items(1, seed=3)]
    answers = call(handler.handle, context, [request(pack(b), PACKED_INPUT_NAME) for b in batches])
    for batch, answer in zip(batches, answers, strict=True):
        assert answer.status == 200
        assert answer.content_type == PACKED_CONTENT_TYPE
        outputs = unpack_response(answer.body)
        assert outputs.shape == (len(batch), 10)
        assert np.abs(outputs - runner.infer(batch)).max() <= TOLERANCE


def test_direct_images_and_packed_batches_in_one_torchserve_batch(unpacked: Unpacked) -> None:
    handler, context = convnet(unpacked)
    spec = get_spec("convnet")
    png, label = digit_png(3)
    packed = normalize(spec.image_to_pixels(png))[np.newaxis].repeat(2, axis=0)
    answers = call(
        handler.handle,
        context,
        [request(png), request(pack(packed), PACKED_INPUT_NAME), request(png, "data")],
    )
    assert [a.status for a in answers] == [200, 200, 200]
    assert answers[0].body == answers[2].body  # same image, same answer, either input name
    logits = unpack_response(answers[1].body)
    best = int(np.argmax(logits[0]))
    assert answers[0].content_type == "application/json"
    assert json.loads(answers[0].body)["predictions"][0]["top_k"][0]["index"] == best
    assert np.array_equal(logits[0], logits[1])
    assert best == label


def test_a_bad_request_fails_alone(unpacked: Unpacked) -> None:
    handler, context = convnet(unpacked)
    png, _ = digit_png(0)
    good = items(2, seed=5)
    answers = call(
        handler.handle,
        context,
        [
            request(png),
            request(png[:60]),  # truncated PNG
            request(pack(items(2, 32, 32)), PACKED_INPUT_NAME),  # wrong size for the ConvNet
            request(pack(good), PACKED_INPUT_NAME),
            request({"json": "decoded"}),  # TorchServe decodes application/json bodies
            ({}, {}),  # no input at all
            request(b"GIF89a not accepted"),
        ],
    )
    assert [a.status for a in answers] == [200, 400, 400, 200, 400, 400, 400]
    errors = [a.body.decode() for a in answers if a.status == 400]
    assert all(a.content_type == "application/json" for a in answers if a.status == 400)
    assert "could not decode image" in errors[0]
    assert "convnet expects [N,3,28,28], got [N,3,32,32]" in errors[1]
    assert "must be binary" in errors[2]
    assert "request carries no input" in errors[3]
    assert "could not decode image" in errors[4]
    expected = reference(unpacked, "convnet").infer(good)
    assert np.abs(unpack_response(answers[3].body) - expected).max() <= TOLERANCE


def test_an_all_bad_batch_still_answers_every_request(unpacked: Unpacked) -> None:
    handler, context = convnet(unpacked)
    answers = call(handler.handle, context, [request(b""), request(b"x")])
    assert [a.status for a in answers] == [400, 400]
    assert "image is empty" in answers[0].body.decode()


def test_fcn_items_of_different_sizes_run_apart_and_come_back_in_order(
    unpacked: Unpacked,
) -> None:
    handler, context = loaded(unpacked("fcn", "torchscript"))
    runner = reference(unpacked, "fcn")
    batches = [items(2, 45, 64, seed=1), items(3, 7, 9, seed=2), items(1, 45, 64, seed=3)]
    png, _ = shapes_png(2, 40)
    answers = call(
        handler.handle,
        context,
        [*(request(pack(b), PACKED_INPUT_NAME) for b in batches), request(png)],
    )
    assert [a.status for a in answers] == [200, 200, 200, 200]
    for batch, answer in zip(batches, answers, strict=False):
        outputs = unpack_response(answer.body)
        assert outputs.shape == (len(batch), 4, *batch.shape[2:])
        assert np.abs(outputs - runner.infer(batch)).max() <= TOLERANCE
    assert answers[3].content_type == "image/png"


def test_artifact_format_follows_the_file_suffix() -> None:
    assert artifact_format_of(Path("m/convnet.pt")) == "torchscript"
    assert artifact_format_of(Path("fcn.onnx")) == "onnx"
    with pytest.raises(ValueError, match="not an exported artifact"):
        artifact_format_of(Path("fcn.pth"))


def test_the_spec_comes_from_the_archive_and_the_registered_name(
    model_repository: Path, tmp_path: Path
) -> None:
    """Labels, normalization and digit centring are read from the packed config.yaml, the
    name from TorchServe's registration: nothing about the model comes from code."""
    repository = tmp_path / "repository"
    shutil.copytree(model_repository, repository)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (repository / "convnet" / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "architecture": "convnet",
                "labels": words,
                "preprocessing": {"normalize": {"mean": 0.25, "std": 0.75}, "center_digit": False},
            }
        )
    )
    version = Repository(repository).read("convnet").versions[1]
    archive = archive_version(version, tmp_path / "store", Settings(), "torchscript")
    model_dir = unpack(archive.path, tmp_path / "unpacked")
    handler = ModelHandler()
    context = make_context(model_dir, name="digits")
    handler.handle(None, context)
    assert handler.spec.name == "digits"
    assert handler.spec.labels == tuple(words)
    assert handler.spec.normalization == Normalization(0.25, 0.75)
    png, _ = digit_png(3)
    # Without centring the digit is only resized to 28×28: other pixels than the demo's.
    pixels = handler.spec.image_to_pixels(png)
    assert not np.array_equal(pixels, get_spec("convnet").image_to_pixels(png))
    (answer,) = call(handler.handle, context, [request(png, headers={"X-Top-K": "10"})])
    reply = json.loads(answer.body)
    assert reply["model"] == "digits"
    (prediction,) = reply["predictions"]
    assert {entry["label"] for entry in prediction["top_k"]} == set(words)
    runner = load_runner(model_dir / ARTIFACT_FILES["torchscript"], "torchscript", "cpu")
    logits = runner.infer(normalize(pixels, Normalization(0.25, 0.75))[np.newaxis])
    assert prediction["top_k"][0]["index"] == int(np.argmax(logits[0]))


@pytest.mark.parametrize(("model", "classes"), [("convnet10", 10), ("fcn10", 10), ("fcn3", 3)])
def test_tutorial_checkpoints_serve_with_their_class_count(
    tutorial_repository: Path,
    tutorial_checkpoints: dict[str, Path],
    tmp_path: Path,
    model: str,
    classes: int,
) -> None:
    """A tutorial state_dict exported into a repository and archived: the handler answers
    what the tutorial's own class computes, with as many classes as it was trained for."""
    version = Repository(tutorial_repository).read(model).versions[1]
    archive = archive_version(version, tmp_path / "store", Settings(), "torchscript")
    handler, context = loaded(unpack(archive.path, tmp_path / "unpacked"))
    assert handler.spec.num_classes == classes
    network = (tutorial.ConvNet if model.startswith("convnet") else tutorial.FCN)(classes)
    network.load_state_dict(torch.load(tutorial_checkpoints[model], weights_only=True))
    batch = items(3) if model.startswith("convnet") else items(2, 24, 40)
    with torch.inference_mode():
        expected = network.eval()(torch.from_numpy(batch)).numpy()
    (answer,) = call(handler.handle, context, [request(pack(batch), PACKED_INPUT_NAME)])
    outputs = unpack_response(answer.body)
    assert outputs.shape == expected.shape
    assert outputs.shape[1] == classes
    assert np.abs(outputs - expected).max() < TOLERANCE


def test_an_archive_whose_config_contradicts_its_export_fails_to_load(
    unpacked: Unpacked,
) -> None:
    model_dir = unpacked("fcn", "torchscript")
    (model_dir / "config.yaml").write_text(
        yaml.safe_dump({"architecture": "fcn", "num_classes": 7})
    )
    with pytest.raises(RepositoryError, match=r"the network has 4 classes but config\.yaml says 7"):
        ModelHandler().handle(None, make_context(model_dir))


# --- packed image batches: decoded in the worker, each failed image kept to its index ---


def float32_path(handler: ModelHandler, pngs: list[bytes]) -> np.ndarray:
    """What the gateway's own decoding sends for ``pngs``: normalized float32 items."""
    spec = handler.spec
    return np.stack([normalize(spec.image_to_pixels(png), spec.normalization) for png in pngs])


class CountingRunner:
    """The loaded runner, counting the batches it runs."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.device = runner.device
        self.takes_pixels = runner.takes_pixels
        self.batches: list[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        return self.runner.infer(batch)


def counted(handler: ModelHandler) -> CountingRunner:
    assert handler.model is not None
    runner = CountingRunner(handler.model.runner)
    handler.model = dataclasses.replace(handler.model, runner=runner)
    return runner


def test_uneven_image_batches_with_a_corrupt_image_fail_only_that_image(
    unpacked: Unpacked,
) -> None:
    handler, context = convnet(unpacked)
    runner = counted(handler)
    digits = [digit_png(i, invert=i == 4)[0] for i in range(6)]
    corrupt = digits[4][:80]  # a valid header, its pixel data cut short
    batches = [[digits[0], digits[1]], [digits[2], digits[3], corrupt], [digits[5]]]
    answers = call(
        handler.handle, context, [request(pack_images(b), PACKED_INPUT_NAME) for b in batches]
    )
    assert [a.status for a in answers] == [200, 200, 200]
    assert runner.batches == [6]  # the three requests ran as one forward pass
    results = [unpack_results(a.body, len(b)) for a, b in zip(answers, batches, strict=True)]
    assert [sorted(r.failures) for r in results] == [[], [2], []]
    assert "could not decode image" in str(results[1].failures[2])
    assert answers[1].content_type == RESULTS_CONTENT_TYPE
    assert answers[0].content_type == PACKED_CONTENT_TYPE
    reference_runner = reference(unpacked, "convnet")
    for pngs, result in zip(batches, results, strict=True):
        assert result.outputs is not None and result.outputs.shape == (len(pngs), 10)
        good = [i for i in range(len(pngs)) if i not in result.failures]
        expected = reference_runner.infer(float32_path(handler, [pngs[i] for i in good]))
        assert np.abs(result.outputs[good] - expected).max() <= TOLERANCE


def test_an_image_batch_whose_every_image_fails_runs_nothing(unpacked: Unpacked) -> None:
    handler, context = convnet(unpacked)
    runner = counted(handler)
    png, _ = digit_png(1)
    bad = [png[:60], b"GIF89a not accepted", png[:100]]
    (answer,) = call(handler.handle, context, [request(pack_images(bad), PACKED_INPUT_NAME)])
    assert answer.status == 200
    results = unpack_results(answer.body, 3)
    assert results.outputs is None
    assert sorted(results.failures) == [0, 1, 2]
    assert all(isinstance(e, InvalidInputError) for e in results.failures.values())
    assert runner.batches == []


def test_fcn_image_batches_are_held_to_their_declared_size(unpacked: Unpacked) -> None:
    handler, context = loaded(unpacked("fcn", "torchscript"))
    scenes = [shapes_png(seed, 40)[0] for seed in (1, 2, 3)]
    other_size, _ = shapes_png(4, 48)
    sent = [scenes[0], other_size, scenes[1], scenes[2]]
    answers = call(
        handler.handle,
        context,
        [
            request(pack_images(sent, (40, 40)), PACKED_INPUT_NAME),
            request(pack_images(scenes[:2]), PACKED_INPUT_NAME),  # no declared size
            request(pack_images([scenes[0]], (5, 40)), PACKED_INPUT_NAME),  # too small for it
        ],
    )
    assert [a.status for a in answers] == [200, 400, 400]
    results = unpack_results(answers[0].body, 4)
    assert sorted(results.failures) == [1]
    assert "48×48, but its batch was formed for 40×40" in str(results.failures[1])
    assert results.outputs is not None and results.outputs.shape == (4, 4, 40, 40)
    expected = reference(unpacked, "fcn").infer(float32_path(handler, scenes))
    assert np.abs(results.outputs[[0, 2, 3]] - expected).max() <= TOLERANCE
    assert "must declare the size its images share" in answers[1].body.decode()
    assert "fcn expects [N,3,H,W] with 7 ≤ H, W ≤ 512, got [N,3,40,5]" in answers[2].body.decode()


def test_an_image_batch_too_big_to_run_is_refused_before_decoding(unpacked: Unpacked) -> None:
    handler, context = loaded(unpacked("fcn", "torchscript"))
    runner = counted(handler)
    # 65 items of 512×512 would be 4 MiB of network output each; none is even an image.
    batch = pack_images([b"x"] * 65, (512, 512))
    (answer,) = call(handler.handle, context, [request(batch, PACKED_INPUT_NAME)])
    assert answer.status == 413
    assert "65 images of 512×512 need 272629760 bytes" in answer.body.decode()
    assert runner.batches == []


def test_the_archive_s_max_image_pixels_bounds_what_an_image_batch_decodes(
    unpacked: Unpacked,
) -> None:
    handler, context = loaded(unpacked("convnet", "torchscript"), {"max_image_pixels": 64 * 64})
    small, _ = digit_png(0)  # 64×64
    large = encode(np.zeros((65, 64, 3), np.uint8))
    (answer,) = call(
        handler.handle, context, [request(pack_images([small, large]), PACKED_INPUT_NAME)]
    )
    results = unpack_results(answer.body, 2)
    assert sorted(results.failures) == [1]
    assert "4160" in str(results.failures[1]) and "4096" in str(results.failures[1])


@pytest.mark.parametrize("artifact_format", ["torchscript", "onnx"])
@pytest.mark.parametrize(("model", "side"), [("convnet", 28), ("fcn", 21)])
def test_feature_maps_asked_beside_a_packed_batch(
    unpacked: Unpacked, artifact_format: ArtifactFormat, model: str, side: int
) -> None:
    """A ``layers`` input beside a packed batch (or image batch) is answered with packed rows
    of output and maps from the archive's feature artifact, grouped apart from plain requests
    in one TorchServe batch; a map the version does not offer fails only its request."""
    handler, context = loaded(unpacked(model, artifact_format))
    spec = handler.spec
    layers = FEATURE_LAYERS[spec.architecture][1::2]
    x = items(2, side, side, seed=side)
    png = digit_png(0)[0] if model == "convnet" else shapes_png(2, side)[0]
    declared = None if model == "convnet" else (side, side)

    def asking(payload: bytes, names: str) -> Request:
        inputs, headers = request(payload, PACKED_INPUT_NAME)
        return {**inputs, LAYERS_INPUT_NAME: bytearray(names.encode())}, headers

    answers = call(
        handler.handle,
        context,
        [
            asking(pack(x), ",".join(layers)),
            request(pack(x), PACKED_INPUT_NAME),
            asking(pack_images([png], declared), ",".join(layers)),
            asking(pack(x), "conv1,conv1"),
            asking(pack(x), "fc2"),
        ],
    )
    shapes = item_shapes(spec, layers, side, side)
    rows = split_rows(unpack_response(answers[0].body), shapes)
    assert_close(
        dict(zip(("output", *layers), rows, strict=True)), hooked_maps(demo_network(model), x)
    )
    np.testing.assert_allclose(unpack_response(answers[1].body), rows[0], atol=TOLERANCE)
    pixels = normalize(spec.image_to_pixels(png), spec.normalization)[np.newaxis]
    image_rows = split_rows(unpack_response(answers[2].body), shapes)
    assert_close(
        dict(zip(("output", *layers), image_rows, strict=True)),
        hooked_maps(demo_network(model), pixels),
    )
    for refused in answers[3:]:
        assert refused.status == 400
        assert f"{model} offers the feature maps" in json.loads(refused.body)["message"]
