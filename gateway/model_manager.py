"""The model manager: which versions of which models the gateway serves, and their lifecycle.

It reads the model repository (:mod:`cnnserve.models.repository`), applies each model's
version policy, loads and unloads versions through the backend, and gives the data plane the
version a request goes to. The transports' repository routes (Triton's repository extension,
``ModelConfig``, ``ModelStatistics``) call :meth:`ModelManager.index`, :meth:`~ModelManager.load`,
:meth:`~ModelManager.unload`, :meth:`~ModelManager.version` and
:meth:`~ModelManager.statistics`; they reach it as ``DataPlane.models``.

How models come and go (``model_control_mode``, as Triton's):

- ``none``: every model of the repository is loaded at start, and nothing changes after;
- ``poll``: the same, then the repository is read again every ``repository_poll_interval_s``:
  new models and versions are loaded, removed ones drained and unloaded, a version whose
  config or files changed is loaded again;
- ``explicit``: only the models ``load_models`` names are loaded at start (``*``: all), then
  only :meth:`~ModelManager.load` and :meth:`~ModelManager.unload` change anything — the only
  mode that accepts them, as in Triton.

Load and unload never drop a request. Work on one model is serialized by a lock of its own
(other models go on). A new or changed version is loaded and starts taking requests before
the version it replaces stops; a version leaving stops taking new requests at once, finishes
every request it accepted — queued, in its batcher or in the backend — within
``drain_grace_s``, and only then is unloaded. A model that cannot be loaded (config, artifact
or backend failure) is reported in :meth:`~ModelManager.index` with the reason, and never
stops the others; a version that fails to load again keeps its earlier files serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from cnnserve.errors import InvalidInputError, UnavailableError, UnknownModelError
from cnnserve.models.repository import (
    ModelEntry,
    ModelVersion,
    Repository,
    RepositoryError,
    check_model_name,
)
from cnnserve.settings import Settings

from .backends import Backend, version_text
from .batcher import (
    BatchAnswer,
    BatchFn,
    BatchObserver,
    DynamicBatcher,
    FeatureBatchFn,
    Observers,
    PartialResults,
)
from .decode_pool import DecodePool, ImageDecoder
from .decode_worker import ImageJob
from .metrics import UNKNOWN_LABEL, GatewayMetrics
from .statistics import ModelStatistics, StatisticsRecorder

logger = logging.getLogger(__name__)

#: ``load_models`` entry that loads every model of the repository (Triton's ``--load-model=*``).
ALL_MODELS = "*"
#: Reason shown for a model of the repository that was never loaded (explicit mode).
NOT_LOADED = "not loaded; load it through the repository API (model_control_mode explicit)"
UNLOADED = "unloaded"
NOT_SELECTED = "not selected by the version policy"


class ModelState(enum.StrEnum):
    """A version's state, as Triton's repository index names them."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionState:
    """One row of the repository index (Triton's ``RepositoryIndexResponse.ModelIndex``)."""

    name: str
    #: The version number as text; ``""`` for a model with no loadable version.
    version: str
    state: ModelState
    #: Why the version is not READY (a config error, an artifact error, a load failure,
    #: ``unloaded``); for a READY version, a reload of changed files that failed; else ``""``.
    reason: str = ""


#: What a loaded version was loaded from: its config and its files' names, sizes and times.
Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]]


def fingerprint(model: ModelVersion) -> Fingerprint:
    """What tells a changed version from the loaded one (blocking: it reads the folder)."""
    files = []
    with contextlib.suppress(OSError):
        for path in sorted(model.path.iterdir()):
            with contextlib.suppress(OSError):
                stat = path.stat()
                files.append((path.name, stat.st_size, stat.st_mtime_ns))
    return model.config.model_dump_json(), tuple(files)


@dataclass(frozen=True)
class _Read:
    """One model folder as read, with each usable version's fingerprint."""

    entry: ModelEntry
    fingerprints: dict[int, Fingerprint]


def _read(repository: Repository, name: str) -> _Read:
    """Read one model folder and fingerprint its versions (blocking: run it in a thread)."""
    entry = repository.read(name)
    return _Read(entry, {v: fingerprint(m) for v, m in entry.versions.items()})


class ServedVersion:
    """A loaded version and everything that serves it: its batcher, its statistics, whether it
    still takes requests, and how many are in it."""

    def __init__(
        self,
        model: ModelVersion,
        batcher: DynamicBatcher,
        stats: StatisticsRecorder,
        keep_pixels: bool,
        fingerprint: Fingerprint,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.stats = stats
        #: Whether UINT8 inputs reach the backend as pixels (it normalizes them itself).
        self.keep_pixels = keep_pixels
        self.fingerprint = fingerprint
        self.accepting = True
        #: A failed reload of changed files, while these ones go on serving.
        self.reload_error = ""
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def name(self) -> str:
        """The model's name."""
        return self.model.spec.name

    @property
    def version(self) -> str:
        """The version number as text."""
        return str(self.model.version)

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the version for one request: it is not unloaded before the request ends."""
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until no request holds the version; whether none does."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        return self._idle.is_set()


@dataclass
class _Model:
    """What the manager knows about one model name."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Versions taking requests, by number.
    served: dict[int, ServedVersion] = field(default_factory=dict)
    #: Versions being loaded or drained, by number.
    loading: set[int] = field(default_factory=set)
    unloading: set[int] = field(default_factory=set)
    #: Why a version (or ``""``: the model) is unavailable.
    problems: dict[str, str] = field(default_factory=dict)
    #: Versions whose load failed, with what failed: polling retries only changed files.
    failed: dict[int, tuple[Fingerprint, str]] = field(default_factory=dict)

    def ready_versions(self) -> list[int]:
        """The numbers of the versions taking requests, ascending."""
        return sorted(self.served)


def version_batch_fn(
    backend: Backend, version: ModelVersion, images: ImageDecoder, max_image_pixels: int
) -> Callable[[np.ndarray], Awaitable[BatchAnswer]]:
    """The batch function of a loaded version: ``backend.infer_batch``, with a batch of
    encoded images (an object array of bytes, headers checked at the edge) decoded here by
    ``images`` first unless the backend decodes images itself; images that fail to decode
    come back as :class:`PartialResults`."""
    infer = functools.partial(backend.infer_batch, version)
    return _decoding(backend, version, images, max_image_pixels, infer)


def version_feature_fn(
    backend: Backend, version: ModelVersion, images: ImageDecoder, max_image_pixels: int
) -> FeatureBatchFn:
    """The feature batch function of a loaded version: as :func:`version_batch_fn`, through
    ``backend.infer_features`` with the feature maps the batch's requests asked for."""

    async def run(batch: np.ndarray, layers: tuple[str, ...]) -> BatchAnswer:
        infer = functools.partial(backend.infer_features, version, layers=layers)
        return await _decoding(backend, version, images, max_image_pixels, infer)(batch)

    return run


def _decoding(
    backend: Backend,
    version: ModelVersion,
    images: ImageDecoder,
    max_image_pixels: int,
    infer: Callable[[np.ndarray], Awaitable[BatchAnswer]],
) -> Callable[[np.ndarray], Awaitable[BatchAnswer]]:
    """``infer``, with a batch of encoded images decoded first where the backend does not
    decode them itself (see :func:`version_batch_fn`)."""
    decodes_images = backend.decodes_images(version)
    normalize = not backend.takes_pixels(version)

    async def run(batch: np.ndarray) -> BatchAnswer:
        if batch.dtype != object or decodes_images:
            return await infer(batch)
        job = ImageJob(version.spec, batch.tolist(), max_image_pixels, normalize)
        rows, failures = await images.prepare(job)
        if not failures:
            return await infer(rows)
        if len(failures) == len(rows):
            return PartialResults(np.zeros(len(rows), np.float32), failures, "image")
        # A failed item's zero rows run with the others: rarer than a second layout.
        return PartialResults(_rows(await infer(rows)), failures, "image")

    return run


def _rows(answer: BatchAnswer) -> np.ndarray:
    """A backend's answer to decoded (array) input: always plain rows."""
    if isinstance(answer, PartialResults):
        raise TypeError("a backend answered PartialResults for a batch of arrays")
    return answer


def version_batcher(
    settings: Settings,
    version: ModelVersion,
    fn: BatchFn,
    observer: BatchObserver,
    feature_fn: FeatureBatchFn | None = None,
) -> DynamicBatcher:
    """The batcher a version's config and the server's settings describe (not started): what
    the config's batching section leaves unset, the server's settings give; ``feature_fn``
    runs the batches of requests for feature maps."""
    batching = version.config.batching
    delay_ms = batching.max_batch_delay_ms
    return DynamicBatcher(
        fn,
        max_batch_size=batching.max_batch_size or settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms if delay_ms is None else delay_ms,
        max_queue_size=batching.max_queue_size or settings.max_queue_size,
        adaptive_delay=settings.adaptive_batch_delay,
        observer=observer,
        name=version_text(version),
        feature_fn=feature_fn,
    )


class ModelManager:
    """The served versions of every model; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        metrics: GatewayMetrics,
        images: ImageDecoder | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        #: Where a batch of encoded images becomes network input for a backend that takes
        #: arrays only (the data plane's, which closes it; else threads of its own).
        self.images = images or ImageDecoder(0, DecodePool(settings.decode_threads))
        self.repository = Repository(settings.model_repository)
        self._models: dict[str, _Model] = {}
        self._poller: asyncio.Task[None] | None = None
        #: Every version loaded and not unloaded yet: serving, or draining.
        self._live: set[ServedVersion] = set()

    # --- start and stop ---

    async def start(self) -> None:
        """Load what ``model_control_mode`` says (see the module docstring); start polling
        in ``poll`` mode. A model that fails to load is reported, not raised; a repository
        that is not a folder, or ``load_models`` naming a model it lacks, is raised."""
        root = self.repository.root
        if not root.is_dir():
            raise RepositoryError(
                f"{root}: the model repository is not a folder; create it with cnnserve export "
                "--repository, or point model_repository (--model-repository) at one"
            )
        names = self._initial_models()
        await asyncio.gather(*(self._load(name, retry=True) for name in names))
        if self.settings.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")
        ready = sum(len(m.served) for m in self._models.values())
        logger.info(
            "model repository %s (%s mode): %d version(s) of %d model(s) ready",
            root,
            self.settings.model_control_mode,
            ready,
            sum(bool(m.served) for m in self._models.values()),
        )

    def _initial_models(self) -> list[str]:
        everything = self.repository.names()
        wanted = self.settings.load_models
        if self.settings.model_control_mode != "explicit":
            return everything
        if ALL_MODELS in wanted:
            return everything
        missing = []
        for name in wanted:
            check_model_name(name)
            if name not in everything:
                missing.append(name)
        if missing:
            raise UnknownModelError(
                f"load_models names {', '.join(missing)}, which the repository "
                f"{self.repository.root} does not hold; it holds: "
                f"{', '.join(everything) or 'nothing'}"
            )
        return sorted(set(wanted))

    async def stop(self, grace_s: float) -> None:
        """Stop polling; answer what is still queued within ``grace_s``; unload everything."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for model in self._models.values():
            model.served.clear()
        await asyncio.gather(*(self._unload_now(s, grace_s) for s in list(self._live)))

    # --- the repository API ---

    def index(self, ready_only: bool = False) -> list[VersionState]:
        """Every model folder of the repository and every loaded model, each version with its
        state and reason, sorted by name and version (Triton's ``RepositoryIndex``);
        ``ready_only``: the READY ones only."""
        names = set(self.repository.names()) | {n for n, m in self._models.items() if m.served}
        rows: list[VersionState] = []
        for name in sorted(names):
            rows.extend(self._rows(name))
        if ready_only:
            rows = [row for row in rows if row.state is ModelState.READY]
        return rows

    def _rows(self, name: str) -> list[VersionState]:
        model = self._models.get(name)
        if model is None:
            return [VersionState(name, "", ModelState.UNAVAILABLE, NOT_LOADED)]
        states: dict[str, VersionState] = {}
        for key, reason in model.problems.items():
            states[key] = VersionState(name, key, ModelState.UNAVAILABLE, reason)
        for number in model.unloading:
            states[str(number)] = VersionState(name, str(number), ModelState.UNLOADING)
        for number in model.loading:
            states[str(number)] = VersionState(name, str(number), ModelState.LOADING)
        for number, served in model.served.items():
            states[str(number)] = VersionState(
                name, str(number), ModelState.READY, served.reload_error
            )
        if not states:
            return [VersionState(name, "", ModelState.UNAVAILABLE, UNLOADED)]
        return [states[key] for key in sorted(states, key=lambda k: (k != "", len(k), k))]

    async def load(self, name: str) -> None:
        """Re-read model ``name``'s folder, load the versions its policy selects and unload
        the others (in-flight requests finish first). Raises ``InvalidInputError`` for an
        unsafe name, ``UnknownModelError`` when the repository has no such folder, and
        ``UnavailableError`` with the reason when no version could be loaded (or when the
        gateway does not run in explicit mode)."""
        self._check_explicit("load")
        check_model_name(name)
        if not (self.repository.root / name).is_dir():
            raise UnknownModelError(
                f"the repository {self.repository.root} has no model {name!r}; it holds: "
                f"{', '.join(self.repository.names()) or 'nothing'}"
            )
        await self._load(name, retry=True)
        model = self._models.get(name)
        if model is None:  # the folder went away while it was read
            raise UnknownModelError(f"the repository {self.repository.root} has no model {name!r}")
        if not model.served:
            raise UnavailableError(f"model {name} could not be loaded: {self._reasons(model)}")
        if "" in model.problems:
            raise UnavailableError(
                f"model {name} was not reloaded (versions {self._numbers(model)} still "
                f"serve): {model.problems['']}"
            )

    async def unload(self, name: str) -> None:
        """Stop serving every version of ``name`` (in-flight requests finish first);
        ``UnknownModelError`` when none is loaded."""
        self._check_explicit("unload")
        check_model_name(name)
        model = self._models.get(name)
        if model is not None:
            # Under the lock: a load of this model that is under way finishes first.
            async with model.lock:
                if model.served:
                    leaving = list(model.served.values())
                    model.served.clear()
                    model.problems = {s.version: UNLOADED for s in leaving}
                    model.failed.clear()
                    await asyncio.gather(*(self._retire(model, s, UNLOADED) for s in leaving))
                    return
        loaded = ", ".join(self.model_names()) or "none"
        raise UnknownModelError(f"model {name!r} is not loaded; loaded models: {loaded}")

    def version(self, name: str, version: str = "") -> ModelVersion:
        """The ready version ``version`` of ``name`` (``""``: the highest ready one);
        ``UnknownModelError`` naming the available versions otherwise."""
        return self.route(name, version).model

    def statistics(self, name: str = "", version: str = "") -> list[ModelStatistics]:
        """Statistics of the loaded versions: all (``name`` empty), one model's, or one
        version's; ``UnknownModelError`` when ``name`` (or that version) is not loaded."""
        if not name:
            return [
                s.stats.snapshot()
                for n in sorted(self._models)
                for _, s in sorted(self._models[n].served.items())
            ]
        model = self._models.get(name)
        if model is None or not model.served:
            raise UnknownModelError(f"model {name!r} is not loaded")
        if not version:
            return [s.stats.snapshot() for _, s in sorted(model.served.items())]
        return [self._served_version(name, model, version).stats.snapshot()]

    # --- what the data plane asks ---

    def route(self, name: str, version: str = "") -> ServedVersion:
        """The version a request for ``name`` and ``version`` (``""``: the highest ready one)
        goes to. ``UnknownModelError`` for a model that is neither loaded nor in the
        repository, and for a version the model does not have (naming the available ones);
        ``UnavailableError`` with the reason when the model or version is not ready."""
        model = self._models.get(name)
        if model is None or not model.served:
            if model is None and not self._in_repository(name):
                served = ", ".join(self.model_names()) or "none"
                raise UnknownModelError(f"unknown model {name!r}; served models are: {served}")
            reasons = self._reasons(model) if model is not None else NOT_LOADED
            raise UnavailableError(f"model {name} has no ready version: {reasons}")
        if not version:
            return model.served[max(model.served)]
        return self._served_version(name, model, version)

    def _served_version(self, name: str, model: _Model, version: str) -> ServedVersion:
        # isdigit() alone lets through digits int() refuses, such as "¹", and int() refuses
        # more than 4,300 digits; no version has 19 (over 10**18).
        digits = version.isascii() and version.isdigit() and len(version) <= 18
        number = int(version) if digits else None
        served = None if number is None else model.served.get(number)
        if served is not None:
            return served
        problem = model.problems.get(version)
        if problem is not None or number in model.loading:
            raise UnavailableError(
                f"model {name} version {version} is not ready: {problem or 'loading'}"
            )
        raise UnknownModelError(
            f"model {name} has no version {version[:40]!r}; available versions: "
            f"{self._numbers(model)}"
        )

    def model_names(self) -> list[str]:
        """The models with at least one version taking requests."""
        return sorted(name for name, model in self._models.items() if model.served)

    def ready_versions(self, name: str) -> list[int]:
        """The numbers of ``name``'s versions taking requests, ascending."""
        model = self._models.get(name)
        return model.ready_versions() if model is not None else []

    def unservable(self) -> list[str]:
        """The models that were to be served but have no version taking requests, because
        loading them failed (not the ones unloaded on request), sorted by name."""
        return sorted(
            name
            for name, model in self._models.items()
            if model.problems and not model.served and not model.loading
        )

    def served_versions(self) -> list[ServedVersion]:
        """Every version taking requests."""
        return [s for m in self._models.values() for s in m.served.values()]

    def metrics_label(self, name: str) -> str:
        """``name`` as the ``model`` label of a request no version took: kept for a loaded
        model, ``_unknown`` otherwise (callers choose names; label values must stay few)."""
        model = self._models.get(name)
        return name if model is not None and model.served else UNKNOWN_LABEL

    # --- loading and unloading ---

    def _check_explicit(self, what: str) -> None:
        mode = self.settings.model_control_mode
        if mode != "explicit":
            raise UnavailableError(
                f"cannot {what} models: the gateway runs with model_control_mode {mode}; "
                "start it with --model-control-mode explicit to load and unload on request"
            )

    def _in_repository(self, name: str) -> bool:
        try:
            check_model_name(name)
        except InvalidInputError:
            return False
        return (self.repository.root / name).is_dir()

    async def _load(self, name: str, retry: bool) -> None:
        """Bring ``name`` to what its folder says now; ``retry``: also versions whose load
        failed before with the same files (polling leaves those alone)."""
        model = self._models.setdefault(name, _Model())
        async with model.lock:
            try:
                read = await asyncio.to_thread(_read, self.repository, name)
            except UnknownModelError:
                await self._remove(name, model)
                return
            except InvalidInputError as exc:  # a folder whose name is not a model name
                model.problems = {"": str(exc)}
                return
            except OSError as exc:  # the folder itself cannot be listed
                model.problems = {"": f"{self.repository.root / name}: cannot be read: {exc}"}
                return
            await self._apply(model, read, retry)

    async def _apply(self, model: _Model, read: _Read, retry: bool) -> None:
        entry = read.entry
        if entry.config is None:
            # A config that cannot be read leaves what serves serving (a failed reload).
            reason = entry.errors.get("config", "config.yaml cannot be used")
            model.problems = {"": reason}
            logger.warning("model %s: %s", entry.name, reason)
            return
        chosen = entry.served()
        wanted = {v.version for v in chosen}
        problems = dict(entry.errors)
        problems.update({str(v): NOT_SELECTED for v in entry.versions if v not in wanted})
        loads = self._changed(model, read, chosen, retry, problems)
        leaving = await self._load_versions(model, loads, problems)
        leaving += [model.served.pop(n) for n in list(model.served) if n not in wanted]
        if not chosen and not problems:
            problems[""] = f"{entry.name}: the model folder holds no version (1/, 2/, …)"
        model.problems = problems
        await asyncio.gather(*(self._retire(model, s, "replaced or removed") for s in leaving))

    @staticmethod
    def _changed(
        model: _Model,
        read: _Read,
        chosen: list[ModelVersion],
        retry: bool,
        problems: dict[str, str],
    ) -> list[tuple[ModelVersion, Fingerprint]]:
        """The chosen versions to load: new ones, and ones whose files changed — unless they
        failed with these very files before and this is not a ``retry``."""
        loads = []
        for version in chosen:
            prints = read.fingerprints[version.version]
            current = model.served.get(version.version)
            if current is not None and current.fingerprint == prints:
                current.reload_error = ""
                continue
            failed = model.failed.get(version.version)
            if not retry and failed is not None and failed[0] == prints:
                if current is None:
                    problems[str(version.version)] = failed[1]
                continue
            loads.append((version, prints))
        return loads

    async def _load_versions(
        self,
        model: _Model,
        loads: list[tuple[ModelVersion, Fingerprint]],
        problems: dict[str, str],
    ) -> list[ServedVersion]:
        """Load ``loads`` side by side and put each one that loads in service; the versions
        they replace (to be retired), and the failures in ``problems``."""
        model.loading.update(v.version for v, _ in loads)
        try:
            results = await asyncio.gather(*(self._start_version(v, p) for v, p in loads))
        finally:
            model.loading.difference_update(v.version for v, _ in loads)
        replaced = []
        for (version, prints), result in zip(loads, results, strict=True):
            current = model.served.get(version.version)
            if isinstance(result, ServedVersion):
                model.served[version.version] = result
                model.failed.pop(version.version, None)
                if current is not None:
                    replaced.append(current)
            else:
                model.failed[version.version] = (prints, result)
                if current is not None:
                    current.reload_error = f"reloading changed files failed: {result}"
                else:
                    problems[str(version.version)] = result
        return replaced

    async def _start_version(
        self, version: ModelVersion, prints: Fingerprint
    ) -> ServedVersion | str:
        """Load ``version`` and start its batcher; the reason as text when it cannot."""
        try:
            await self.backend.load(version)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            logger.warning("%s not loaded: %s", version_text(version), reason)
            return reason
        name, number = version.spec.name, str(version.version)
        stats = StatisticsRecorder(name, number)
        pixels = self.settings.max_image_pixels
        run = version_batch_fn(self.backend, version, self.images, pixels)
        features = version_feature_fn(self.backend, version, self.images, pixels)
        observer = Observers(self.metrics.observer(name, number), stats)
        batcher = version_batcher(self.settings, version, run, observer, features)
        batcher.start()
        logger.info("%s ready (%s)", version_text(version), self.backend.describe())
        keep_pixels = self.backend.takes_pixels(version)
        served = ServedVersion(version, batcher, stats, keep_pixels, prints)
        self._live.add(served)
        return served

    async def _retire(self, model: _Model, served: ServedVersion, why: str) -> None:
        """Stop ``served`` taking requests (already out of ``model.served``), let the ones it
        holds finish within ``drain_grace_s``, then unload it."""
        served.accepting = False
        number = served.model.version
        model.unloading.add(number)
        logger.info("%s: draining before unload (%s)", version_text(served.model), why)
        try:
            grace = self.settings.drain_grace_s
            if not await served.wait_idle(grace):
                logger.warning(
                    "%s: requests still running after %.0f s are answered UNAVAILABLE",
                    version_text(served.model),
                    grace,
                )
            await self._unload_now(served, 0.0)
            # Label values stay bounded by what is loaded (at shutdown the series stay, for
            # the last scrapes).
            self.metrics.forget(served.name, served.version)
        finally:
            model.unloading.discard(number)

    async def _unload_now(self, served: ServedVersion, grace_s: float) -> None:
        served.accepting = False
        self._live.discard(served)
        await served.batcher.stop(grace_s)
        await self.backend.unload(served.model)
        logger.info("%s unloaded", version_text(served.model))

    async def _remove(self, name: str, model: _Model) -> None:
        """The model's folder is gone: drain and unload its versions, forget the model."""
        leaving = list(model.served.values())
        model.served.clear()
        await asyncio.gather(*(self._retire(model, s, "folder removed") for s in leaving))
        if self._models.get(name) is model and not model.served:
            del self._models[name]

    async def _poll(self) -> None:
        """Read the repository every ``repository_poll_interval_s`` and follow it."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_interval_s)
            try:
                names = set(self.repository.names()) | set(self._models)
                # Each model on its own: one draining for long holds up no other.
                await asyncio.gather(*(self._load(name, retry=False) for name in sorted(names)))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("reading the model repository failed; polling goes on")

    # --- messages ---

    @staticmethod
    def _numbers(model: _Model) -> str:
        return ", ".join(str(v) for v in model.ready_versions()) or "none ready"

    @staticmethod
    def _reasons(model: _Model) -> str:
        if not model.problems:
            return "loading" if model.loading else UNLOADED
        return "; ".join(
            reason if not key else f"version {key}: {reason}"
            for key, reason in sorted(model.problems.items())
        )
