"""Where formed batches run: in this process (ONNX Runtime, TorchScript) or in TorchServe.

Every backend takes a float32 ``N×3×H×W`` batch (already normalized) — or, when it says it
``takes_pixels``, uint8 pixels it normalizes itself — and returns the network's raw float32
output for it; pre- and post-processing stay in the data plane.
The in-process backends call :mod:`cnnserve.models.runtime`, the same code the TorchServe
handler runs, so all three give the same numbers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from cnnserve.errors import UnavailableError
from cnnserve.models.registry import MODELS, get_spec
from cnnserve.models.runtime import ARTIFACT_SUFFIX, ArtifactFormat, Runner, load_runner
from cnnserve.models.semantics import probe_input
from cnnserve.settings import Settings

from .torchserve_backend import TorchServeBackend

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs whole batches for the data plane."""

    async def start(self) -> None:
        """Load models / open connections; raise when the backend cannot serve."""

    async def close(self) -> None:
        """Release models and connections."""

    async def infer_batch(self, model: str, batch: np.ndarray) -> np.ndarray:
        """float32 ``N×3×H×W`` → the network's raw float32 output, N rows."""
        ...

    async def ready(self, model: str) -> bool:
        """Whether ``model`` answers right now (a real probe, not a flag)."""
        ...

    def describe(self) -> str:
        """The platform reported in model metadata, e.g. ``onnxruntime_onnx``."""
        ...

    def takes_pixels(self) -> bool:
        """Whether :meth:`infer_batch` also takes uint8 ``N×3×H×W`` pixels (and normalizes
        them itself, e.g. on the GPU); otherwise the edge sends float32 only."""
        ...


async def answers(infer: Callable[[str, np.ndarray], Awaitable[np.ndarray]], model: str) -> bool:
    """Run a one-item probe through ``infer``; true when it returns one finite row."""
    try:
        out = await infer(model, probe_input(get_spec(model)))
    except Exception as exc:
        logger.warning("readiness probe of %s failed: %s", model, exc)
        return False
    return len(out) == 1 and bool(np.isfinite(out).all())


class InProcessBackend:
    """Exported artifacts run in this process, one worker thread per model.

    One thread per model runs that model's batches one at a time (runners are not
    thread-safe), off the event loop, while different models run side by side.
    """

    def __init__(
        self,
        artifacts_dir: Path,
        artifact_format: ArtifactFormat,
        platform: str,
        models: Iterable[str] = tuple(MODELS),
        device: str | None = None,
        half: bool = False,
        options: RunnerOptions | None = None,
    ) -> None:
        self._artifacts_dir = artifacts_dir
        self._format: ArtifactFormat = artifact_format
        self._platform = platform
        self._models = tuple(models)
        self._device = device
        self._half = half
        self._options = options or RunnerOptions()
        self._runners: dict[str, Runner] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}

    async def start(self) -> None:
        """Load every model's artifact in its own worker thread."""
        loop = asyncio.get_running_loop()
        if self._format == "torchscript" and self._options.threads:
            torch.set_num_threads(self._options.threads)  # process-wide in torch
        for model in self._models:
            path = self._artifacts_dir / f"{model}{ARTIFACT_SUFFIX[self._format]}"
            if not path.is_file():
                raise UnavailableError(
                    f"{path} is missing; run `cnnserve export {model} --out {self._artifacts_dir}`"
                )
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{model}")
            self._executors[model] = executor
            self._runners[model] = await loop.run_in_executor(
                executor,
                functools.partial(
                    load_runner,
                    path,
                    self._format,
                    self._device,
                    self._half,
                    threads=self._options.threads,
                    channels_last=self._options.channels_last,
                    pinned_memory=self._options.pinned_memory,
                    cuda_graph_batch_sizes=self._options.cuda_graph_batch_sizes,
                    normalization=get_spec(model).normalization,
                ),
            )
            # ORT may fall back to CPU silently; the log says where the model really runs.
            logger.info("%s: %s on %s", model, self._platform, self._runners[model].device)

    async def close(self) -> None:
        """Drop the runners and stop the worker threads (after their current batch)."""
        self._runners.clear()
        executors = list(self._executors.values())
        self._executors.clear()
        for executor in executors:
            await asyncio.to_thread(executor.shutdown, wait=True)

    async def infer_batch(self, model: str, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` on ``model``'s worker thread."""
        runner = self._runners.get(model)
        executor = self._executors.get(model)
        if runner is None or executor is None:
            raise UnavailableError(f"model {model} is not loaded")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, runner.infer, batch)

    async def ready(self, model: str) -> bool:
        """Loaded, and a one-image probe runs through it."""
        if model not in self._runners:
            return False
        return await answers(self.infer_batch, model)

    def describe(self) -> str:
        """The platform name, as Triton spells it."""
        return self._platform

    def takes_pixels(self) -> bool:
        """True when every runner normalizes uint8 pixels itself and that is wanted."""
        return (
            self._options.device_preprocess
            and bool(self._runners)
            and all(runner.takes_pixels for runner in self._runners.values())
        )


@dataclass(frozen=True)
class RunnerOptions:
    """How in-process runners are built (see :func:`cnnserve.models.runtime.load_runner`)."""

    threads: int = 0
    channels_last: bool = True
    device_preprocess: bool = True
    pinned_memory: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerOptions:
        """The runner options ``settings`` give."""
        return cls(
            threads=settings.inference_threads,
            channels_last=settings.channels_last,
            device_preprocess=settings.device_preprocess,
            pinned_memory=settings.pinned_memory,
            cuda_graph_batch_sizes=tuple(settings.cuda_graph_batch_sizes),
        )


def create_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names, configured and not yet started."""
    if settings.backend == "onnxruntime":
        if settings.half_precision:
            logger.warning("half_precision applies to the torchscript backend only; ignored")
        return InProcessBackend(
            settings.artifacts_dir,
            "onnx",
            "onnxruntime_onnx",
            device=settings.device,
            options=RunnerOptions.from_settings(settings),
        )
    if settings.backend == "torchscript":
        return InProcessBackend(
            settings.artifacts_dir,
            "torchscript",
            "pytorch_libtorch",
            device=settings.device,
            half=settings.half_precision,
            options=RunnerOptions.from_settings(settings),
        )
    return TorchServeBackend.from_settings(settings)
