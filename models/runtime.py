"""Run an exported artifact: the runners the in-process backends and the TorchServe handler use.

A runner takes a float32 ``N×3×H×W`` batch (already normalized; the TorchScript runner also
takes uint8 pixels and normalizes them on its device) and returns the network's float32
output for the whole batch. It is not thread-safe for concurrent calls; callers run
one batch at a time per runner (the in-process backends give each model one worker thread;
a TorchServe worker process handles one request list at a time).

This module needs no torch: the TorchScript runner (:mod:`.torchscript`) is imported only
when a TorchScript artifact is opened, so ONNX artifacts run where torch is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from cnnserve.errors import UnavailableError, needs_extra

from .features import pack_rows
from .pixels import DEFAULT_NORMALIZATION, Normalization

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)

ArtifactFormat = Literal["torchscript", "onnx"]
ARTIFACT_SUFFIX: dict[ArtifactFormat, str] = {"torchscript": ".pt", "onnx": ".onnx"}


def features_artifact(path: Path) -> Path:
    """The feature artifact exported beside ``path``: ``model.pt`` → ``model.features.pt``.

    It is the same network answering its output and every feature map (:mod:`.features`);
    a second file, so that the artifact plain requests run is the one it always was."""
    return path.with_name(f"{path.stem}.features{path.suffix}")


def missing_features(path: Path) -> UnavailableError:
    """The error of a feature request to a version exported without feature artifacts."""
    return UnavailableError(
        f"{features_artifact(path).name} is missing beside {path.name}: the version was "
        "exported without feature maps; export it again with cnnserve export"
    )


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

    def infer_features(self, batch: np.ndarray, layers: Sequence[str]) -> np.ndarray:
        """The same batch through the feature artifact: one float32 row per item, the network
        output then each of ``layers``'s maps (:func:`~.features.pack_rows`)."""
        ...


class OnnxRunner:
    """An ONNX Runtime session: the CUDA execution provider when present, else CPU."""

    takes_pixels = False

    def __init__(self, path: Path, device: str | None = None, intra_op_threads: int = 0) -> None:
        self._path = path
        self._device_wanted = device
        self._threads = intra_op_threads
        self._session = self._open(path)
        active = self._session.get_providers()
        # ORT silently falls back to CPU when CUDA cannot start; say so instead of hiding it.
        want_cuda = device is None or device.startswith("cuda")
        if want_cuda and device is not None and active[0] != "CUDAExecutionProvider":
            logger.warning("onnxruntime: CUDA requested but running on %s", active[0])
        self.device = active[0]
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        #: The feature artifact's session, opened by the first request for feature maps.
        self._features: ort.InferenceSession | None = None

    def _open(self, path: Path) -> ort.InferenceSession:
        # Imported when a session opens: TorchScript-only installs run without onnxruntime.
        with needs_extra("gateway", "an ONNX artifact"):
            import onnxruntime as ort

        device = self._device_wanted
        wanted = ["CPUExecutionProvider"]
        want_cuda = device is None or device.startswith("cuda")
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            gpu_id = int(device.split(":")[1]) if device and ":" in device else 0
            wanted = [("CUDAExecutionProvider", {"device_id": gpu_id}), "CPUExecutionProvider"]  # type: ignore[list-item]
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        # Memory patterns plan one block per input shape on top of the CPU arena, which
        # keeps every block it grew to: a 512×512 FCN batch of 2 run three times held
        # 2.7 GiB. Without them the arena stays at the largest batch's peak whatever shapes
        # follow, at the same speed; the arena stays on (without it every batch faults its
        # memory in afresh: a 512×512 FCN item took 1.47× as long). docs/reliability.md,
        # "Memory budgets".
        options.enable_mem_pattern = False
        return ort.InferenceSession(str(path), sess_options=options, providers=wanted)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch through the session, fetching the network's output only."""
        (output,) = self._session.run([self._output], {self._input: batch})
        return np.asarray(output, dtype=np.float32)

    def infer_features(self, batch: np.ndarray, layers: Sequence[str]) -> np.ndarray:
        """Run one batch through the feature artifact's session (opened on first use),
        fetching the output and ``layers`` only."""
        if self._features is None:
            path = features_artifact(self._path)
            if not path.is_file():
                raise missing_features(self._path)
            self._features = self._open(path)
        outputs = self._features.run([self._output, *layers], {self._input: batch})
        return pack_rows(outputs)


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
    :class:`~.torchscript.TorchScriptRunner`).
    """
    if artifact_format == "torchscript":
        with needs_extra("torchscript", "a TorchScript artifact"):
            from .torchscript import TorchScriptRunner
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
