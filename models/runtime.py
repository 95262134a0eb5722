"""Run an exported artifact: the inference core every backend and the TorchServe handler use.

A runner takes a float32 ``N×3×H×W`` batch (already normalized) and returns the network's
float32 output for the whole batch. It is not thread-safe for concurrent calls; callers run
one batch at a time per runner (the batcher does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArtifactFormat = Literal["torchscript", "onnx"]
ARTIFACT_SUFFIX: dict[ArtifactFormat, str] = {"torchscript": ".pt", "onnx": ".onnx"}


class Runner(Protocol):
    """Batch in, batch out."""

    #: Where the model runs, e.g. ``cpu``, ``cuda:0``, ``CUDAExecutionProvider``.
    device: str

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``N×3×H×W`` → float32 network output with the same N."""
        ...


def default_device() -> str:
    """``cuda:0`` when torch sees a GPU, else ``cpu``."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class TorchScriptRunner:
    """A ``torch.jit`` module, ``channels_last`` and optionally fp16 (GPU only)."""

    def __init__(self, path: Path, device: str | None = None, half: bool = False) -> None:
        self.device = device or default_device()
        if half and not self.device.startswith("cuda"):
            raise ValueError("half precision needs a CUDA device")
        self._half = half
        module = torch.jit.load(str(path), map_location=self.device).eval()
        module = module.to(memory_format=torch.channels_last)
        self._module = module.half() if half else module

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch under ``torch.inference_mode``."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            if self._half:
                x = x.half()
            y = self._module(x)
            return y.float().cpu().numpy()


class OnnxRunner:
    """An ONNX Runtime session: the CUDA execution provider when present, else CPU."""

    def __init__(self, path: Path, device: str | None = None, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        wanted = ["CPUExecutionProvider"]
        want_cuda = device is None or device.startswith("cuda")
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            gpu_id = int(device.split(":")[1]) if device and ":" in device else 0
            wanted = [("CUDAExecutionProvider", {"device_id": gpu_id}), "CPUExecutionProvider"]  # type: ignore[list-item]
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        active = self._session.get_providers()
        # ORT silently falls back to CPU when CUDA cannot start; say so instead of hiding it.
        if want_cuda and device is not None and active[0] != "CUDAExecutionProvider":
            logger.warning("onnxruntime: CUDA requested but running on %s", active[0])
        self.device = active[0]
        self._input = self._session.get_inputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the session."""
        (output,) = self._session.run(None, {self._input: batch})[:1]
        return np.asarray(output, dtype=np.float32)


def load_runner(
    path: Path, artifact_format: ArtifactFormat, device: str | None = None, half: bool = False
) -> Runner:
    """Open an exported artifact of either format."""
    if artifact_format == "torchscript":
        return TorchScriptRunner(path, device, half)
    if half:
        raise ValueError("half precision is offered for TorchScript artifacts only")
    return OnnxRunner(path, device)
