"""Export a trained network to TorchScript and ONNX, and prove the three agree.

Writes a TorchScript file, one self-contained ONNX file and a JSON description of what was
exported (architecture, class count, tensor names, shapes, datatypes, labels, checksums,
parity) — either flat (``DIR/<name>.pt``, ``.onnx``, ``.json``) or as a version folder of a
model repository (``model.pt``, ``model.onnx``, ``export.json``; see :mod:`.repository`),
where the server reads the class count back from the description.
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
from cnnserve.models.repository import ARTIFACT_FILES, EXPORT_FILE
from cnnserve.models.runtime import OnnxRunner
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
    height, width = _trace_size(spec)
    example = _example(spec, 2, height, width)
    ts_path, onnx_path = paths.torchscript, paths.onnx
    with torch.inference_mode():
        traced = torch.jit.trace(network, example)  # type: ignore[no-untyped-call]
    traced.save(str(ts_path))
    _export_onnx(spec, network, example, onnx_path)
    worst = check_parity(spec, network, ts_path, onnx_path)
    metadata_path = paths.metadata
    metadata_path.write_text(
        json.dumps(describe(spec, ts_path, onnx_path, checkpoint, worst), indent=2) + "\n"
    )
    return ExportResult(ts_path, onnx_path, metadata_path, worst)


def _export_onnx(spec: ModelSpec, network: nn.Module, example: torch.Tensor, path: Path) -> None:
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
                output_names=[spec.output_name],
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
    """Max-abs difference over several batch sizes (and sizes for the FCN); raise if too big."""
    ts_runner = TorchScriptRunner(ts_path, device="cpu")
    onnx_runner = OnnxRunner(onnx_path, device="cpu")
    sizes = [spec.fixed_size] if spec.fixed_size else list(FCN_PARITY_SIZES)
    worst = 0.0
    for batch in PARITY_BATCH_SIZES:
        for height, width in sizes:
            x = _example(spec, batch, height, width)
            with torch.inference_mode():
                eager = network(x).numpy()
            for label, runner in (("TorchScript", ts_runner), ("ONNX Runtime", onnx_runner)):
                got = runner.infer(x.numpy())
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
                worst = max(worst, diff)
    return worst


def describe(
    spec: ModelSpec, ts_path: Path, onnx_path: Path, checkpoint: Path, worst: float
) -> dict[str, Any]:
    """The exported model's contract, as written to ``<name>.json``."""
    height, width = spec.fixed_size or (-1, -1)
    num_classes = spec.num_classes
    output_shape = [-1, num_classes] if spec.fixed_size else [-1, num_classes, -1, -1]
    return {
        "name": spec.name,
        "architecture": spec.architecture.value,
        "num_classes": num_classes,
        "inputs": [{"name": spec.input_name, "datatype": "FP32", "shape": [-1, 3, height, width]}],
        "outputs": [{"name": spec.output_name, "datatype": "FP32", "shape": output_shape}],
        "min_side": spec.min_side,
        "max_side": spec.max_side,
        "labels": list(spec.labels),
        "normalization": {
            "scale": 1 / 255,
            "mean": spec.normalization.mean,
            "std": spec.normalization.std,
        },
        "files": {
            "torchscript": {"file": ts_path.name, "sha256": sha256_file(ts_path)},
            "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
            "checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint)},
        },
        "parity_max_abs_diff": worst,
        "onnx_opset": ONNX_OPSET,
        "torch_version": torch.__version__,
    }
