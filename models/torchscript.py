"""The TorchScript runner: the one model runner that needs torch (see :mod:`.runtime`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from .batch_buckets import StaticBatches, cuda_graph_step, normalize_buckets
from .features import NETWORK_OUTPUT, pack_rows
from .pixels import DEFAULT_NORMALIZATION, Normalization
from .runtime import features_artifact, missing_features

logger = logging.getLogger(__name__)

#: Pinned staging buffers kept per runner (one per batch shape seen).
MAX_PINNED_BUFFERS = 16


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
        self._path = path
        self._module = self._load(path)
        #: The feature artifact's module, loaded by the first request for feature maps.
        self._features: torch.jit.ScriptModule | None = None
        buckets = normalize_buckets(cuda_graph_batch_sizes)
        self._graphs: StaticBatches | None = None
        if buckets and on_cuda:
            self._graphs = StaticBatches(buckets, self.device, cuda_graph_step(self.forward))
        elif buckets:
            logger.info("CUDA graphs need a CUDA device; running eagerly on %s", self.device)

    def _load(self, path: Path) -> torch.jit.ScriptModule:
        module = torch.jit.load(str(path), map_location=self.device).eval()  # type: ignore[no-untyped-call]
        if self._channels_last:
            module = module.to(memory_format=torch.channels_last)
        return cast(torch.jit.ScriptModule, module.half() if self._half else module)

    def _network_input(self, x: torch.Tensor) -> torch.Tensor:
        """A device tensor as the network takes it: pixels normalized, layout and precision
        applied."""
        if x.dtype == torch.uint8:
            x = normalize_tensor(x, self._normalization)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._half:
            x = x.half()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network on a device tensor (see :meth:`_network_input`)."""
        return cast(torch.Tensor, self._module(self._network_input(x)))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (float32, or uint8 pixels) under ``torch.inference_mode``."""
        with torch.inference_mode():
            host = self._host_tensor(batch)
            y = self._graphs.run(host) if self._graphs is not None else None
            if y is None:
                y = self.forward(host.to(self.device, non_blocking=True))
            return y.float().cpu().numpy()

    def infer_features(self, batch: np.ndarray, layers: Sequence[str]) -> np.ndarray:
        """Run one batch through the feature artifact (loaded on first use; never as a CUDA
        graph): the output and ``layers``'s maps as packed rows."""
        if self._features is None:
            path = features_artifact(self._path)
            if not path.is_file():
                raise missing_features(self._path)
            self._features = self._load(path)
        with torch.inference_mode():
            host = self._host_tensor(batch)
            answered = self._features(self._network_input(host.to(self.device, non_blocking=True)))
            wanted = [answered[NETWORK_OUTPUT], *(answered[layer] for layer in layers)]
            return pack_rows([t.float().cpu().numpy() for t in wanted])

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
