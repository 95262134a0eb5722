"""Where formed batches run: in this process (ONNX Runtime, TorchScript) or in TorchServe.

The contract every backend keeps is :class:`Backend`: the model manager loads and unloads
model versions (:class:`~cnnserve.models.repository.ModelVersion`, read from the model
repository) through it, and the data plane runs batches on the loaded ones. Every backend
takes a float32 ``N×3×H×W`` batch (already normalized) — or, when it says it
``takes_pixels``, uint8 pixels it normalizes itself — and returns the network's raw float32
output for it; pre- and post-processing stay in the data plane.
The in-process backends call :mod:`cnnserve.models.runtime`, the same code the TorchServe
handler runs, so all three give the same numbers. They also bound the model's own working
memory: a batch runs in parts of at most ``max_batch_model_bytes``, priced per pixel
(:data:`~.memory_budget.MODEL_WORKING_MEMORY`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cnnserve.errors import InvalidInputError, UnavailableError, needs_extra
from cnnserve.models.features import all_layers_bytes_per_pixel
from cnnserve.models.repository import ModelVersion
from cnnserve.models.runtime import ArtifactFormat, Runner, load_runner
from cnnserve.models.semantics import probe_input
from cnnserve.settings import Settings

from .batcher import BatchAnswer
from .memory_budget import MODEL_WORKING_MEMORY, WorkingMemory, mib
from .torchserve_backend import TorchServeBackend

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """Runs whole batches of loaded model versions for the data plane.

    The model manager calls :meth:`load` and :meth:`unload`, never both at once for one model,
    and :meth:`unload` only once no batch of that version runs or will run. A version is known
    by its object, not by its name and number: when a version's config or files change, the
    manager loads the new :class:`ModelVersion` of the same name and number while the old one
    still serves, then unloads the old one — a backend must keep both apart meanwhile.
    """

    async def start(self) -> None:
        """Open pools and connections; loads nothing. Raise when the backend cannot serve."""

    async def close(self) -> None:
        """Unload every version and release pools and connections."""

    async def load(self, model: ModelVersion) -> None:
        """Make ``model`` runnable; raise a :class:`~cnnserve.errors.CnnserveError`
        (``UnavailableError`` saying why) when it cannot be."""

    async def unload(self, model: ModelVersion) -> None:
        """Release what :meth:`load` took for ``model`` (nothing happens if it was not)."""

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> BatchAnswer:
        """float32 ``N×3×H×W`` → the network's raw float32 output, N rows (or, for a backend
        that :meth:`decodes_images`, encoded images → ``PartialResults`` when some
        fail)."""
        ...

    async def infer_features(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> BatchAnswer:
        """As :meth:`infer_batch`, through the version's feature artifact: N float32 rows,
        each the network output then ``layers``'s maps, flattened
        (:func:`~cnnserve.models.features.pack_rows`)."""
        ...

    async def ready(self, model: ModelVersion) -> bool:
        """Whether ``model`` answers right now (a real probe, not a flag)."""
        ...

    def describe(self) -> str:
        """The platform reported in model metadata, e.g. ``onnxruntime_onnx``."""
        ...

    def takes_pixels(self, model: ModelVersion) -> bool:
        """Whether :meth:`infer_batch` also takes uint8 ``N×3×H×W`` pixels for the loaded
        ``model`` (and normalizes them itself, e.g. on the GPU); otherwise the edge sends
        float32 only."""
        ...

    def decodes_images(self, model: ModelVersion) -> bool:
        """Whether :meth:`infer_batch` also takes a batch of encoded images — an object array
        ``N`` of PNG/JPEG ``bytes``, every header already checked by the gateway — and decodes
        it where it runs, answering :class:`~cnnserve.gateway.batcher.PartialResults` when
        some images fail; otherwise the gateway decodes images before they are batched."""
        ...


def version_text(model: ModelVersion) -> str:
    """``convnet version 2``: how logs and messages name a version."""
    return f"{model.spec.name} version {model.version}"


async def answers(
    infer: Callable[[ModelVersion, np.ndarray], Awaitable[np.ndarray]], model: ModelVersion
) -> bool:
    """Run a one-item probe through ``infer``; true when it returns one finite row."""
    try:
        out = await infer(model, probe_input(model.spec))
    except Exception as exc:
        logger.warning("readiness probe of %s failed: %s", version_text(model), exc)
        return False
    return len(out) == 1 and bool(np.isfinite(out).all())


@dataclass(frozen=True)
class _Loaded:
    """A loaded version: its runner, the one thread that runs its batches, and what its
    batches' working memory is priced at."""

    model: ModelVersion
    runner: Runner
    executor: ThreadPoolExecutor
    #: ``None`` on a GPU (the host-memory prices do not apply there).
    memory: WorkingMemory | None


def run_in_parts(
    infer: Callable[[np.ndarray], np.ndarray],
    batch: np.ndarray,
    memory: WorkingMemory,
    limit: int,
    what: str,
) -> np.ndarray:
    """``infer`` on ``batch`` in as few consecutive parts as keep each part's working memory
    within ``limit`` bytes; :class:`InvalidInputError` when one item alone is over it (a
    batch's items share H×W, so that is every item of it)."""
    pixels = batch.shape[-2] * batch.shape[-1]
    most = memory.max_items(pixels, limit)
    if most == 0:
        one = memory.batch_bytes(1, pixels)
        raise InvalidInputError(
            f"one {batch.shape[-2]}×{batch.shape[-1]} image takes {mib(one)} of {what}'s "
            f"working memory; a batch may take at most {mib(limit)} (max_batch_model_bytes): "
            "send smaller images"
        )
    if len(batch) <= most:
        return infer(batch)
    return np.concatenate(
        [infer(batch[start : start + most]) for start in range(0, len(batch), most)]
    )


class InProcessBackend:
    """Exported artifacts run in this process, one worker thread per loaded version.

    One thread per version runs that version's batches one at a time (runners are not
    thread-safe), off the event loop, while different versions run side by side.
    """

    def __init__(
        self,
        artifact_format: ArtifactFormat,
        platform: str,
        device: str | None = None,
        half: bool = False,
        options: RunnerOptions | None = None,
    ) -> None:
        self._format: ArtifactFormat = artifact_format
        self._platform = platform
        self._device = device
        self._half = half
        self._options = options or RunnerOptions()
        # Keyed by the ModelVersion object's identity (see Backend): a reload holds two
        # versions of one name and number. The entry keeps the object alive, so its id is
        # not reused while it is a key.
        self._loaded: dict[int, _Loaded] = {}

    async def start(self) -> None:
        """TorchScript: load torch (a missing one fails the start, naming the extra to
        install, rather than every version's load) and set its process-wide thread count.
        Versions load one by one later."""
        if self._format != "torchscript":
            return
        # Here, not at the top: the onnxruntime and torchserve backends run without torch.
        with needs_extra("torchscript", "the torchscript backend"):
            import torch
        if self._options.threads:
            torch.set_num_threads(self._options.threads)  # process-wide in torch

    async def load(self, model: ModelVersion) -> None:
        """Open ``model``'s artifact on a new worker thread of its own."""
        wanted = model.config.artifact_format
        if wanted is not None and wanted != self._format:
            raise UnavailableError(
                f"{version_text(model)}: config.yaml asks for the {wanted} artifact, but the "
                f"{self._platform} backend runs {self._format}; remove artifact_format or "
                "serve with the matching backend"
            )
        path = model.artifact(self._format)
        if not path.is_file():
            raise UnavailableError(
                f"{path} is missing: the {self._platform} backend needs the {self._format} "
                "artifact; export the version again with cnnserve export"
            )
        name = f"infer-{model.spec.name}-{model.version}"
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        load = functools.partial(
            load_runner,
            path,
            self._format,
            self._device,
            self._half,
            threads=self._options.threads,
            channels_last=self._options.channels_last,
            pinned_memory=self._options.pinned_memory,
            cuda_graph_batch_sizes=self._options.cuda_graph_batch_sizes,
            normalization=model.spec.normalization,
        )
        try:
            runner = await asyncio.get_running_loop().run_in_executor(executor, load)
        except Exception as exc:
            executor.shutdown(wait=False)
            # The runtimes' messages name the file and the fault; the first line is enough.
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnavailableError(f"{path}: cannot be loaded: {detail}") from exc
        # The prices are host memory; on a GPU the activations live in device memory, which
        # they do not describe, and splitting would only cost the GPU its batch size.
        on_gpu = "cuda" in runner.device.lower()
        memory = None if on_gpu else MODEL_WORKING_MEMORY[self._format, model.spec.architecture]
        self._loaded[id(model)] = _Loaded(model, runner, executor, memory)
        # ORT may fall back to CPU silently; the log says where the model really runs.
        logger.info("%s: %s on %s", version_text(model), self._platform, runner.device)

    async def unload(self, model: ModelVersion) -> None:
        """Drop the runner and stop its thread (after its current batch)."""
        loaded = self._loaded.pop(id(model), None)
        if loaded is not None:
            await asyncio.to_thread(loaded.executor.shutdown, wait=True)

    async def close(self) -> None:
        """Unload every version."""
        for loaded in list(self._loaded.values()):
            await self.unload(loaded.model)

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """Run ``batch`` on ``model``'s worker thread — on the CPU in parts that keep the
        model's working memory within ``max_batch_model_bytes`` (:func:`run_in_parts`)."""
        loaded, batch = self._runnable(model, batch)
        loop = asyncio.get_running_loop()
        if loaded.memory is None:
            return await loop.run_in_executor(loaded.executor, loaded.runner.infer, batch)
        run = functools.partial(
            run_in_parts,
            loaded.runner.infer,
            batch,
            loaded.memory,
            self._options.max_batch_model_bytes,
            version_text(model),
        )
        return await loop.run_in_executor(loaded.executor, run)

    def _runnable(self, model: ModelVersion, batch: np.ndarray) -> tuple[_Loaded, np.ndarray]:
        """``model``'s loaded entry (UNAVAILABLE when it is not loaded) and ``batch`` as its
        runner may take it."""
        loaded = self._loaded.get(id(model))
        if loaded is None:
            raise UnavailableError(f"{version_text(model)} is not loaded")
        if self._format == "torchscript" and not batch.flags.writeable:
            # A lone request's batch is a read-only view of its received message; ONNX
            # Runtime reads it in place, but torch.from_numpy warns on (and would write
            # through) a read-only array, so torch gets its own copy, the one copy this path
            # keeps.
            batch = np.array(batch)
        return loaded, batch

    async def infer_features(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray:
        """As :meth:`infer_batch`, through the version's feature artifact (its runner opens it
        on first use). On the CPU its working memory is priced with every feature map twice on
        top: the feature artifact computes and holds them all, and the rows copy them."""
        loaded, batch = self._runnable(model, batch)
        infer = functools.partial(loaded.runner.infer_features, layers=layers)
        loop = asyncio.get_running_loop()
        if loaded.memory is None:
            return await loop.run_in_executor(loaded.executor, infer, batch)
        height, width = batch.shape[-2], batch.shape[-1]
        # Every map the feature artifact holds, and the packed rows copied out of them: one
        # 512×512 FCN item took 1,431 MiB fetching every map, 1,148 fetching conv1, 950 the
        # plain artifact (tools/feature_costs.py --memory 512; docs/feature-maps.md).
        maps = 2 * all_layers_bytes_per_pixel(model.spec, height, width)
        memory = WorkingMemory(loaded.memory.per_batch, loaded.memory.per_item + maps)
        run = functools.partial(
            run_in_parts,
            infer,
            batch,
            memory,
            self._options.max_batch_model_bytes,
            version_text(model),
        )
        return await loop.run_in_executor(loaded.executor, run)

    async def ready(self, model: ModelVersion) -> bool:
        """Loaded, and a one-image probe runs through it."""
        if id(model) not in self._loaded:
            return False
        return await answers(self.infer_batch, model)

    def describe(self) -> str:
        """The platform name, as Triton spells it."""
        return self._platform

    def decodes_images(self, model: ModelVersion) -> bool:
        """No: in-process runners take arrays (the gateway decodes images off its loop)."""
        return False

    def takes_pixels(self, model: ModelVersion) -> bool:
        """True when ``model``'s runner normalizes uint8 pixels itself and that is wanted."""
        loaded = self._loaded.get(id(model))
        return self._options.device_preprocess and loaded is not None and loaded.runner.takes_pixels


@dataclass(frozen=True)
class RunnerOptions:
    """How in-process runners are built (see :func:`cnnserve.models.runtime.load_runner`)."""

    threads: int = 0
    channels_last: bool = True
    device_preprocess: bool = True
    pinned_memory: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = ()
    #: Working memory one batch of a model may take (a larger batch runs in parts).
    max_batch_model_bytes: int = Settings.model_fields["max_batch_model_bytes"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerOptions:
        """The runner options ``settings`` give."""
        return cls(
            threads=settings.inference_threads,
            channels_last=settings.channels_last,
            device_preprocess=settings.device_preprocess,
            pinned_memory=settings.pinned_memory,
            cuda_graph_batch_sizes=tuple(settings.cuda_graph_batch_sizes),
            max_batch_model_bytes=settings.max_batch_model_bytes,
        )


def create_backend(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names, configured and not yet started."""
    if settings.backend == "onnxruntime":
        if settings.half_precision:
            logger.warning("half_precision applies to the torchscript backend only; ignored")
        return InProcessBackend(
            "onnx",
            "onnxruntime_onnx",
            device=settings.device,
            options=RunnerOptions.from_settings(settings),
        )
    if settings.backend == "torchscript":
        return InProcessBackend(
            "torchscript",
            "pytorch_libtorch",
            device=settings.device,
            half=settings.half_precision,
            options=RunnerOptions.from_settings(settings),
        )
    return TorchServeBackend.from_settings(settings)
