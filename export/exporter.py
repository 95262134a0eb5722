"""Export a trained network to TorchScript and ONNX, and prove the three agree.

Writes a TorchScript file, one self-contained ONNX file and a JSON description of what was
exported (architecture, class count, tensor names, shapes, datatypes, labels, checksums,
parity) — either flat (``DIR/<name>.pt``, ``.onnx``, ``.json``) or as a version folder of a
model repository (``model.pt``, ``model.onnx``, ``export.json``; see :mod:`.repository`),
where the server reads the class count back from the description.

Beside each artifact goes its feature artifact (``model.features.pt``,
``model.features.onnx``): the same network answering its output and every feature map
(:mod:`cnnserve.models.features`), which requests for feature maps run; plain requests run
the plain artifact exactly as before. Its parity is checked like the plain one's, every map
against the eager network's.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnserve.errors import require_extra
from cnnserve.models.checkpoint import sha256_file
from cnnserve.models.feature_network import FeatureNetwork
from cnnserve.models.features import (
    FEATURE_LAYERS,
    NETWORK_OUTPUT,
    feature_metadata,
    item_shapes,
    split_rows,
)
from cnnserve.models.repository import ARTIFACT_FILES, EXPORT_FILE
from cnnserve.models.runtime import OnnxRunner, Runner, features_artifact
from cnnserve.models.spec import ModelSpec
from cnnserve.models.torchscript import TorchScriptRunner

from . import ExportError

#: Largest max-abs difference tolerated between eager, TorchScript and ONNX Runtime.
PARITY_TOLERANCE = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)
FCN_PARITY_SIZES = ((7, 7), (28, 28), (45, 64))
ONNX_OPSET = 18


@dataclass(frozen=True)
class ExportPaths:
    """Where one export's three files go."""

    torchscript: Path
    onnx: Path
    metadata: Path

    @property
    def torchscript_features(self) -> Path:
        """The TorchScript feature artifact, beside the TorchScript one."""
        return features_artifact(self.torchscript)

    @property
    def onnx_features(self) -> Path:
        """The ONNX feature artifact, beside the ONNX one."""
        return features_artifact(self.onnx)

    @classmethod
    def flat(cls, out_dir: Path, name: str) -> ExportPaths:
        """``<name>.pt``, ``<name>.onnx`` and ``<name>.json`` in ``out_dir``."""
        return cls(out_dir / f"{name}.pt", out_dir / f"{name}.onnx", out_dir / f"{name}.json")

    @classmethod
    def version(cls, folder: Path) -> ExportPaths:
        """A repository version folder's ``model.pt``, ``model.onnx`` and ``export.json``."""
        return cls(
            folder / ARTIFACT_FILES["torchscript"],
            folder / ARTIFACT_FILES["onnx"],
            folder / EXPORT_FILE,
        )


@dataclass(frozen=True)
class ExportResult:
    """Paths written and the worst parity difference seen."""

    torchscript: Path
    onnx: Path
    metadata: Path
    max_abs_diff: float


def check_installed() -> None:
    """Raise :class:`~cnnserve.errors.MissingExtraError` unless the modules an export loads
    only while it runs are installed (torch imports onnx and onnxscript when it writes ONNX;
    ONNX Runtime checks parity): checked before anything is written, so a missing one leaves
    no half-made export behind."""
    require_extra("export", "an ONNX export", "onnx", "onnxscript", "onnxruntime")


def _example(spec: ModelSpec, batch: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 1000 + height + width)
    return torch.rand(batch, 3, height, width, generator=generator) * 2 - 1


def _trace_size(spec: ModelSpec) -> tuple[int, int]:
    return spec.fixed_size or (32, 32)


def export_model(
    spec: ModelSpec, network: nn.Module, paths: ExportPaths, checkpoint: Path
) -> ExportResult:
    """Export ``network`` (weights from ``checkpoint``) to ``paths`` and check parity."""
    check_installed()
    for path in (paths.torchscript, paths.onnx, paths.metadata):
        path.parent.mkdir(parents=True, exist_ok=True)
    network = network.eval()
    features = FeatureNetwork(network).eval()
    height, width = _trace_size(spec)
    example = _example(spec, 2, height, width)
    ts_path, onnx_path = paths.torchscript, paths.onnx
    with torch.inference_mode():
        traced = torch.jit.trace(network, example)  # type: ignore[no-untyped-call]
        # strict=False: the feature module answers a dict, its maps by name.
        traced_features = torch.jit.trace(features, example, strict=False)  # type: ignore[no-untyped-call]
    traced.save(str(ts_path))
    traced_features.save(str(paths.torchscript_features))
    _export_onnx(spec, network, example, onnx_path, [spec.output_name])
    _export_onnx(spec, features, example, paths.onnx_features, [spec.output_name, *features.layers])
    worst = check_parity(spec, network, ts_path, onnx_path)
    metadata_path = paths.metadata
    metadata_path.write_text(
        json.dumps(describe(spec, ts_path, onnx_path, checkpoint, worst), indent=2) + "\n"
    )
    return ExportResult(ts_path, onnx_path, metadata_path, worst)


def _export_onnx(
    spec: ModelSpec, network: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]
) -> None:
    """``network`` as one ONNX file whose outputs are named ``outputs``, in the order the
    network answers them."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    dims: dict[int, Any] = {0: batch}
    if spec.fixed_size is None:
        dims[2] = torch.export.Dim("height", min=spec.min_side, max=spec.max_side)
        dims[3] = torch.export.Dim("width", min=spec.min_side, max=spec.max_side)
    exporter_log = logging.getLogger("torch.onnx")
    previous_level = exporter_log.level
    # The exporter warns about every optional torchvision op it cannot register; noise here.
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                network,
                (example,),
                input_names=[spec.input_name],
                output_names=outputs,
                dynamic_shapes={"x": dims},
                opset_version=ONNX_OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(previous_level)
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    # torch 2.13 would write weights to a separate .onnx.data file; keep one file instead.
    program.save(str(path), external_data=False)


def check_parity(spec: ModelSpec, network: nn.Module, ts_path: Path, onnx_path: Path) -> float:
    """Max-abs difference over several batch sizes (and sizes for the FCN); raise if too big.

    The feature artifacts beside ``ts_path`` and ``onnx_path`` are held to the eager network
    too: their output, and every feature map against :class:`FeatureNetwork`'s."""
    ts_runner = TorchScriptRunner(ts_path, device="cpu")
    onnx_runner = OnnxRunner(onnx_path, device="cpu")
    features = FeatureNetwork(network).eval()
    layers = FEATURE_LAYERS[spec.architecture]
    sizes = [spec.fixed_size] if spec.fixed_size else list(FCN_PARITY_SIZES)
    worst = 0.0
    for batch in PARITY_BATCH_SIZES:
        for height, width in sizes:
            x = _example(spec, batch, height, width)
            with torch.inference_mode():
                eager = network(x).numpy()
                eager_maps = {name: t.numpy() for name, t in features(x).items()}
            shapes = item_shapes(spec, layers, height, width)
            runners: tuple[tuple[str, Runner], ...] = (
                ("TorchScript", ts_runner),
                ("ONNX Runtime", onnx_runner),
            )
            for label, runner in runners:
                worst = max(worst, _difference(label, runner.infer(x.numpy()), eager, x))
                answered = split_rows(runner.infer_features(x.numpy(), layers), shapes)
                for name, got in zip((NETWORK_OUTPUT, *layers), answered, strict=True):
                    where = f"{label}'s feature artifact ({name})"
                    worst = max(worst, _difference(where, got, eager_maps[name], x))
    return worst


def _difference(label: str, got: np.ndarray, eager: np.ndarray, x: torch.Tensor) -> float:
    """Max-abs difference of ``got`` from ``eager``; :class:`ExportError` when the shapes
    differ or it is over :data:`PARITY_TOLERANCE`."""
    if got.shape != eager.shape:
        raise ExportError(
            f"{label} output shape {list(got.shape)} != eager {list(eager.shape)} "
            f"for input {list(x.shape)}"
        )
    diff = float(np.abs(got - eager).max())
    if diff > PARITY_TOLERANCE:
        raise ExportError(
            f"{label} differs from eager by {diff:.3g} (> {PARITY_TOLERANCE}) "
            f"for input {list(x.shape)}"
        )
    return diff


def describe(
    spec: ModelSpec, ts_path: Path, onnx_path: Path, checkpoint: Path, worst: float
) -> dict[str, Any]:
    """The exported model's contract, as written to ``<name>.json``; the feature artifacts
    are the ones beside ``ts_path`` and ``onnx_path``."""
    height, width = spec.fixed_size or (-1, -1)
    num_classes = spec.num_classes
    output_shape = [-1, num_classes] if spec.fixed_size else [-1, num_classes, -1, -1]
    layers = FEATURE_LAYERS[spec.architecture]
    files = {"torchscript": ts_path, "onnx": onnx_path}
    files.update({f"{kind}_features": features_artifact(p) for kind, p in list(files.items())})
    return {
        "name": spec.name,
        "architecture": spec.architecture.value,
        "num_classes": num_classes,
        "inputs": [{"name": spec.input_name, "datatype": "FP32", "shape": [-1, 3, height, width]}],
        "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": output_shape}],
        "feature_outputs": [
            {"name": name, "datatype": "FP32", "shape": list(shape)}
            for name, shape in feature_metadata(spec.architecture, layers, spec.fixed_size)
        ],
        "min_side": spec.min_side,
        "max_side": spec.max_side,
        "labels": list(spec.labels),
        "normalization": {
            "scale": 1 / 255,
            "mean": spec.normalization.mean,
            "std": spec.normalization.std,
        },
        "files": {
            **{kind: {"file": p.name, "sha256": sha256_file(p)} for kind, p in files.items()},
            "checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint)},
        },
        "parity_max_abs_diff": worst,
        "onnx_opset": ONNX_OPSET,
        "torch_version": torch.__version__,
    }
