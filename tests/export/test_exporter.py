"""Export writes self-contained artifacts whose outputs match the eager network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnnserve.export import ExportError
from cnnserve.export.exporter import check_parity
from cnnserve.models.checkpoint import load_network, sha256_file
from cnnserve.models.feature_network import FeatureNetwork
from cnnserve.models.features import FEATURE_LAYERS
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


@pytest.mark.parametrize("name", ["convnet", "fcn"])
def test_feature_artifacts_beside_the_artifacts(artifacts_dir: Path, name: str) -> None:
    spec = MODELS[name]
    meta = json.loads((artifacts_dir / f"{name}.json").read_text())
    layers = FEATURE_LAYERS[spec.architecture]
    assert [o["name"] for o in meta["feature_outputs"]] == list(layers)
    assert all(o["datatype"] == "FP32" and o["shape"][0] == -1 for o in meta["feature_outputs"])
    for kind, suffix in (("torchscript", "pt"), ("onnx", "onnx")):
        path = artifacts_dir / f"{name}.features.{suffix}"
        assert meta["files"][f"{kind}_features"] == {
            "file": path.name,
            "sha256": sha256_file(path),
        }
    # The plain ONNX artifact keeps its one output; the feature one names every map.
    plain = onnx.load(str(artifacts_dir / f"{name}.onnx"), load_external_data=False)
    assert [o.name for o in plain.graph.output] == [spec.output_name]
    features = onnx.load(str(artifacts_dir / f"{name}.features.onnx"), load_external_data=False)
    assert [o.name for o in features.graph.output] == [spec.output_name, *layers]


def test_feature_parity_failure_is_loud(artifacts_dir: Path, tmp_path: Path) -> None:
    """A feature artifact that is not the plain one's network fails the parity check."""
    spec = MODELS["convnet"]
    for suffix in ("pt", "onnx"):
        shutil.copyfile(artifacts_dir / f"convnet.{suffix}", tmp_path / f"convnet.{suffix}")
    # A TorchScript feature artifact of random weights beside the right plain artifacts.
    other = spec.network().eval()
    torch.jit.save(
        torch.jit.trace(FeatureNetwork(other), torch.zeros(1, 3, 28, 28), strict=False),
        str(tmp_path / "convnet.features.pt"),
    )
    shutil.copyfile(artifacts_dir / "convnet.features.onnx", tmp_path / "convnet.features.onnx")
    network = load_network(spec, weights_path("convnet"))
    with pytest.raises(ExportError, match=r"TorchScript's feature artifact \(output\) differs"):
        check_parity(spec, network, tmp_path / "convnet.pt", tmp_path / "convnet.onnx")
