"""The model runners run both artifact formats and refuses impossible options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cnnserve.gateway.memory_budget import MODEL_WORKING_MEMORY
from cnnserve.models.runtime import load_runner
from cnnserve.models.spec import Architecture
from cnnserve.models.steps import normalize
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
