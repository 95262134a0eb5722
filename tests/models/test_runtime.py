"""The inference core runs both artifact formats and refuses impossible options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnserve.models.runtime import load_runner


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
