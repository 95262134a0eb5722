"""The model runners run both artifact formats and refuses impossible options."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cnnserve.errors import UnavailableError
from cnnserve.gateway.memory_budget import MODEL_WORKING_MEMORY
from cnnserve.models.features import FEATURE_LAYERS, item_shapes, split_rows
from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import ARTIFACT_SUFFIX, ArtifactFormat, load_runner
from cnnserve.models.spec import Architecture
from cnnserve.models.steps import normalize
from tests.feature_maps import TOLERANCE, assert_close, demo_network, hooked_maps
from tests.gateway.memory_payloads import peak_rss, reset_peak


def test_both_formats_agree_on_uneven_batches(artifacts_dir: Path) -> None:
    ts = load_runner(artifacts_dir / "convnet.pt", "torchscript", device="cpu")
    ort = load_runner(artifacts_dir / "convnet.onnx", "onnx", device="cpu")
    assert ts.device == "cpu"
    assert ort.device == "CPUExecutionProvider"
    for n in (2, 3, 1):
        x = np.random.default_rng(n).standard_normal((n, 3, 28, 28), dtype=np.float32)
        a, b = ts.infer(x), ort.infer(x)
        assert a.shape == b.shape == (n, 10)
        assert np.abs(a - b).max() <= 1e-4


def test_half_precision_needs_cuda(artifacts_dir: Path) -> None:
    with pytest.raises(ValueError, match="half precision needs a CUDA device"):
        load_runner(artifacts_dir / "convnet.pt", "torchscript", device="cpu", half=True)
    with pytest.raises(ValueError, match="TorchScript artifacts only"):
        load_runner(artifacts_dir / "convnet.onnx", "onnx", half=True)


def test_torchscript_normalizes_uint8_pixels_exactly_as_the_edge(artifacts_dir: Path) -> None:
    runner = load_runner(artifacts_dir / "fcn.pt", "torchscript", device="cpu")
    assert runner.takes_pixels
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 16, 20), dtype=np.uint8)
    np.testing.assert_array_equal(runner.infer(pixels), runner.infer(normalize(pixels)))


def test_onnx_runner_takes_float32_only(artifacts_dir: Path) -> None:
    assert not load_runner(artifacts_dir / "convnet.onnx", "onnx", device="cpu").takes_pixels


def test_gpu_options_are_inert_and_correct_on_cpu(artifacts_dir: Path) -> None:
    plain = load_runner(artifacts_dir / "convnet.pt", "torchscript", device="cpu")
    tuned = load_runner(
        artifacts_dir / "convnet.pt",
        "torchscript",
        device="cpu",
        channels_last=False,
        pinned_memory=True,
        cuda_graph_batch_sizes=(1, 2, 4),
    )
    for n in (2, 3, 1, 7):
        x = np.random.default_rng(n).standard_normal((n, 3, 28, 28), dtype=np.float32)
        np.testing.assert_allclose(tuned.infer(x), plain.infer(x), atol=1e-5)


def test_onnx_threads_are_configurable(artifacts_dir: Path) -> None:
    one = load_runner(artifacts_dir / "convnet.onnx", "onnx", device="cpu", threads=1)
    default = load_runner(artifacts_dir / "convnet.onnx", "onnx", device="cpu")
    x = np.random.default_rng(5).standard_normal((3, 3, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(one.infer(x), default.infer(x), atol=1e-5)


def test_onnx_memory_stays_within_the_price_of_its_largest_batch(artifacts_dir: Path) -> None:
    """ONNX Runtime's arena keeps what it grew to; with memory patterns on, a 512×512 FCN
    batch of 2 run three times held 2.7 GiB. The shipped session stays within what
    ``MODEL_WORKING_MEMORY`` prices its largest batch at, however often and whatever shapes
    follow (measured: tools/memory_probe.py --runners)."""
    runner = load_runner(artifacts_dir / "fcn.onnx", "onnx", device="cpu", threads=1)
    runner.infer(np.zeros((1, 3, 32, 32), np.float32))  # the session's own setup
    pid = os.getpid()
    before = reset_peak(pid)
    for count, height, width in [(2, 512, 512)] * 3 + [(1, 500, 500), (4, 256, 256), (2, 512, 511)]:
        runner.infer(np.random.default_rng(count).random((count, 3, height, width), np.float32))
    priced = MODEL_WORKING_MEMORY["onnx", Architecture.FCN].batch_bytes(2, 512 * 512)
    grown = peak_rss(pid) - before
    assert grown <= priced, f"grew {grown >> 20} MiB, priced {priced >> 20} MiB"


@pytest.mark.parametrize("artifact_format", ["onnx", "torchscript"])
@pytest.mark.parametrize(("model", "side"), [("convnet", 28), ("fcn", 7), ("fcn", 45)])
def test_feature_maps_match_the_eager_network(
    artifacts_dir: Path, artifact_format: ArtifactFormat, model: str, side: int
) -> None:
    spec = get_spec(model)
    runner = load_runner(
        artifacts_dir / f"{model}{ARTIFACT_SUFFIX[artifact_format]}", artifact_format, "cpu"
    )
    x = np.random.default_rng(side).uniform(-1, 1, (3, 3, side, side)).astype(np.float32)
    eager = hooked_maps(demo_network(model), x)
    layers = FEATURE_LAYERS[spec.architecture]
    # All of them, then a subset in another order: the rows hold the maps asked, in order.
    for asked in (layers, layers[::-2]):
        rows = runner.infer_features(x, asked)
        parts = split_rows(rows, item_shapes(spec, asked, side, side))
        assert_close(dict(zip(("output", *asked), parts, strict=True)), eager)
    # The plain artifact is untouched: its output is the feature artifact's.
    np.testing.assert_allclose(runner.infer(x), eager["output"], atol=TOLERANCE)


def test_torchscript_feature_maps_take_uint8_pixels(artifacts_dir: Path) -> None:
    runner = load_runner(artifacts_dir / "fcn.pt", "torchscript", device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 20), dtype=np.uint8)
    layers = ("conv2",)
    np.testing.assert_array_equal(
        runner.infer_features(pixels, layers), runner.infer_features(normalize(pixels), layers)
    )


@pytest.mark.parametrize("artifact_format", ["onnx", "torchscript"])
def test_a_version_exported_without_feature_artifacts_says_so(
    artifacts_dir: Path, artifact_format: ArtifactFormat, tmp_path: Path
) -> None:
    name = f"convnet{ARTIFACT_SUFFIX[artifact_format]}"
    shutil.copyfile(artifacts_dir / name, tmp_path / name)
    runner = load_runner(tmp_path / name, artifact_format, device="cpu")
    x = np.zeros((1, 3, 28, 28), np.float32)
    assert runner.infer(x).shape == (1, 10)
    with pytest.raises(
        UnavailableError, match=r"convnet\.features\..* is missing .* export it again"
    ):
        runner.infer_features(x, ("conv1",))
