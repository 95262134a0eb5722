"""Run an exported artifact: the runners the in-process backends and the TorchServe handler use.

A runner takes a float32 ``N×3×H×W`` batch (already normalized; the TorchScript runner also
takes uint8 pixels and normalizes them on its device) and returns the network's float32
output for the whole batch. It is not thread-safe for concurrent calls; callers run
one batch at a time per runner (the in-process backends give each model one worker thread;
a TorchServe worker process handles one request list at a time).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol, cast

import numpy as np
import torch

from .batch_buckets import StaticBatches, cuda_graph_step, normalize_buckets
from .pixels import DEFAULT_NORMALIZATION, Normalization

logger = logging.getLogger(__name__)

ArtifactFormat = Literal["torchscript", "onnx"]
ARTIFACT_SUFFIX: dict[ArtifactFormat, str] = {"torchscript": ".pt", "onnx": ".onnx"}
#: Pinned staging buffers kept per runner (one per batch shape seen).
MAX_PINNED_BUFFERS = 16


class Runner(Protocol):
    """Batch in, batch out."""

    #: Where the model runs, e.g. ``cpu``, ``cuda:0``, ``CUDAExecutionProvider``.
    device: str
    #: Whether :meth:`infer` also takes uint8 pixel batches and normalizes them itself.
    takes_pixels: bool

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 ``N×3×H×W`` (or uint8 pixels, see ``takes_pixels``) → float32 network
        output with the same N."""
        ...


def default_device() -> str:
    """``cuda:0`` when torch sees a GPU, else ``cpu``."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class TorchScriptRunner:
    """A ``torch.jit`` module, with the GPU path's options (each inert on a CPU but correct).

    - ``channels_last``: NHWC memory layout, which cuDNN and oneDNN convolutions prefer;
    - ``half``: fp16 weights and activations (CUDA only; outputs come back as float32);
    - uint8 pixel batches are normalized on the runner's device (4× less to copy to a GPU
      than float32, and the arithmetic leaves the CPU);
    - ``pinned_memory``: host batches are staged in page-locked buffers so the copy to the
      GPU is a fast asynchronous DMA (CUDA only);
    - ``cuda_graph_batch_sizes``: batch-size buckets replayed as CUDA graphs; a batch is
      padded up to the next bucket (:mod:`cnnserve.models.batch_buckets`); larger batches
      run eagerly (CUDA only).
    """

    takes_pixels = True

    def __init__(
        self,
        path: Path,
        device: str | None = None,
        half: bool = False,
        *,
        channels_last: bool = True,
        pinned_memory: bool = True,
        cuda_graph_batch_sizes: Iterable[int] = (),
        normalization: Normalization = DEFAULT_NORMALIZATION,
    ) -> None:
        self.device = device or default_device()
        self._normalization = normalization
        on_cuda = self.device.startswith("cuda")
        if half and not on_cuda:
            raise ValueError("half precision needs a CUDA device")
        self._half = half
        self._channels_last = channels_last
        self._pinned = pinned_memory and on_cuda
        self._staging: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] = {}
        module = torch.jit.load(str(path), map_location=self.device).eval()  # type: ignore[no-untyped-call]
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self._module = module.half() if half else module
        buckets = normalize_buckets(cuda_graph_batch_sizes)
        self._graphs: StaticBatches | None = None
        if buckets and on_cuda:
            self._graphs = StaticBatches(buckets, self.device, cuda_graph_step(self.forward))
        elif buckets:
            logger.info("CUDA graphs need a CUDA device; running eagerly on %s", self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a device tensor: pixels normalized, layout and precision applied."""
        if x.dtype == torch.uint8:
            x = normalize_tensor(x, self._normalization)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._half:
            x = x.half()
        return cast(torch.Tensor, self._module(x))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (float32, or uint8 pixels) under ``torch.inference_mode``."""
        with torch.inference_mode():
            host = self._host_tensor(batch)
            y = self._graphs.run(host) if self._graphs is not None else None
            if y is None:
                y = self.forward(host.to(self.device, non_blocking=True))
            return y.float().cpu().numpy()

    def _host_tensor(self, batch: np.ndarray) -> torch.Tensor:
        """The batch as a CPU tensor, staged in pinned memory when that is on."""
        tensor = torch.from_numpy(batch)
        if not self._pinned:
            return tensor
        key = (tuple(batch.shape), tensor.dtype)
        staging = self._staging.get(key)
        if staging is None:
            if len(self._staging) >= MAX_PINNED_BUFFERS:
                self._staging.clear()  # FCN sizes vary; keep the page-locked memory bounded
            staging = self._staging[key] = torch.empty(
                batch.shape, dtype=tensor.dtype, pin_memory=True
            )
        # Safe to reuse: the previous batch's copy finished when its output came back.
        staging.copy_(tensor)
        return staging


def normalize_tensor(
    pixels: torch.Tensor, norm: Normalization = DEFAULT_NORMALIZATION
) -> torch.Tensor:
    """uint8 pixels → float32 network input on their device, exactly as ``pixels.normalize``."""
    scaled = pixels.float() * (1.0 / 255.0)
    return (scaled - norm.mean) / norm.std


class OnnxRunner:
    """An ONNX Runtime session: the CUDA execution provider when present, else CPU."""

    takes_pixels = False

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
    path: Path,
    artifact_format: ArtifactFormat,
    device: str | None = None,
    half: bool = False,
    *,
    threads: int = 0,
    channels_last: bool = True,
    pinned_memory: bool = True,
    cuda_graph_batch_sizes: Iterable[int] = (),
    normalization: Normalization = DEFAULT_NORMALIZATION,
) -> Runner:
    """Open an exported artifact of either format.

    ``threads`` bounds ONNX Runtime's intra-op threads (0: its default); TorchScript's thread
    count is process-wide (``torch.set_num_threads``) and left to the caller. The layout,
    pinned-memory and CUDA-graph options apply to TorchScript only (see
    :class:`TorchScriptRunner`).
    """
    if artifact_format == "torchscript":
        return TorchScriptRunner(
            path,
            device,
            half,
            channels_last=channels_last,
            pinned_memory=pinned_memory,
            cuda_graph_batch_sizes=cuda_graph_batch_sizes,
            normalization=normalization,
        )
    if half:
        raise ValueError("half precision is offered for TorchScript artifacts only")
    return OnnxRunner(path, device, intra_op_threads=threads)
