"""Export writes self-contained artifacts whose outputs match the eager network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnnserve.export import ExportError
from cnnserve.export.exporter import check_parity
from cnnserve.models.checkpoint import sha256_file
from cnnserve.models.registry import MODELS, weights_path
from cnnserve.models.runtime import load_runner


@pytest.mark.parametrize("name", ["convnet", "fcn"])
def test_artifacts_and_metadata(artifacts_dir: Path, name: str) -> None:
    spec = MODELS[name]
    meta = json.loads((artifacts_dir / f"{name}.json").read_text())
    assert meta["labels"] == list(spec.labels)
    assert meta["inputs"][0]["name"] == spec.input_name
    assert meta["outputs"][0]["name"] == spec.output_name
    assert meta["files"]["onnx"]["sha256"] == sha256_file(artifacts_dir / f"{name}.onnx")
    assert meta["parity_max_abs_diff"] <= 1e-4
    # One self-contained file: no external-data side file was written.
    assert not list(artifacts_dir.glob(f"{name}.onnx.data"))
    model = onnx.load(str(artifacts_dir / f"{name}.onnx"), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # dynamic batch
    if spec.fixed_size is None:
        assert dims[2].dim_param and dims[3].dim_param


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_fcn_runs_at_sizes_never_traced(artifacts_dir: Path, fmt: str) -> None:
    spec = MODELS["fcn"]
    suffix = ".pt" if fmt == "torchscript" else ".onnx"
    runner = load_runner(artifacts_dir / f"fcn{suffix}", fmt, device="cpu")  # type: ignore[arg-type]
    x = np.random.default_rng(0).standard_normal((5, 3, 11, 70), dtype=np.float32)
    eager = spec.network()
    eager.load_state_dict(torch.load(weights_path(spec.name), weights_only=True)["state_dict"])
    with torch.inference_mode():
        expected = eager.eval()(torch.from_numpy(x)).numpy()
    got = runner.infer(x)
    assert got.shape == (5, spec.num_classes, 11, 70)
    assert np.abs(got - expected).max() <= 1e-4


def test_parity_failure_is_loud(artifacts_dir: Path) -> None:
    spec = MODELS["convnet"]
    other = spec.network().eval()  # random weights: nothing like the exported ones
    with pytest.raises(ExportError, match=r"differs from eager by .* for input \[1, 3, 28, 28\]"):
        check_parity(spec, other, artifacts_dir / "convnet.pt", artifacts_dir / "convnet.onnx")
