"""The ``torchserve`` backend: each formed batch is one TorchServe gRPC ``Predictions`` call.

The gateway has already batched, so TorchServe's own batch size stays 1 (its delay would only
add to the gateway's; docs/architecture.md, "Batching once, preparing once") and the whole
batch travels in one request in the packed format the cnnserve handler reads. Images travel
encoded (:meth:`TorchServeBackend.decodes_images`): the handler decodes them in TorchServe's
worker processes, in parallel with the gateway, and an image that fails there fails only its
own item (:class:`~cnnserve.gateway.batcher.PartialResults`). The gateway runs one batch of a
model at a time, so with several workers per model (``torchserve_workers_per_model``) an image
batch of at least :data:`MIN_CALL_IMAGES` images per worker is sent as that many concurrent
calls, a part each, for the workers to decode side by side. The
client spreads batches over every replica behind the target, attaches each replica's
inference key and turns TorchServe's failures into cnnserve errors.

Versions: each loaded version is its own TorchServe model version — the model's name, the
repository's version number — and every call names both (``PredictionsRequest.model_version``).
Loading a version archives it and registers it with every TorchServe on this machine the
gateway serves (``torchserve_model_stores``, one per replica; :mod:`.management
<cnnserve.torchserve_engine.management>`), through the management API on loopback with the
management key; a refusal is the load's error, with TorchServe's reason. Unloading — after
the model manager has drained the version — unregisters it. With ``torchserve_registration``
off (TorchServe in another container, its management API out of reach) the versions must be
the ones TorchServe was started with, and loading registers nothing.

TorchServe holds one copy of each version number. When a version changes in place, the model
manager loads the new one while the old still serves; here both are the same TorchServe
version, so the new copy replaces the old in TorchServe at once (calls in that moment may fail
UNAVAILABLE or NOT_FOUND) and unloading the old one leaves the new registered.

TorchServe writes a new key every time it starts. Keys are looked up per call and re-read
whenever their file changes (``torchserve_key_dir``: one file per replica;
``torchserve_key_file``: one server), so a restarted or added replica is served without
restarting the gateway, and a gateway started before TorchServe becomes ready once
TorchServe is up.

Keys also expire (``torchserve_token_expiration_min``). A TorchServe in a container renews its
own (its entry point); one started on this machine by ``cnnserve torchserve start`` (``make
serve``) has the renewer that command leaves behind (:mod:`~cnnserve.torchserve_engine.renewer`).
The gateway renews the keys of every TorchServe running from its model stores
(``torchserve_model_stores``, else ``model_store_dir``) as well, checked every
:data:`RENEW_INTERVAL_S` — a TorchServe started by ``process.start`` alone has no renewer, and
one whose renewer died keeps its keys — and all of them take turns under
:func:`~cnnserve.torchserve_engine.process.renew_keys`' lock, so each key is renewed once.
A call refused because its key was just renewed is made again with the new key
(:mod:`~cnnserve.torchserve_engine.client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnserve.errors import UnavailableError
from cnnserve.models.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cnnserve.models.repository import ModelVersion
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.client import TorchServeClient
from cnnserve.torchserve_engine.keys import key_store
from cnnserve.torchserve_engine.management import Registrar
from cnnserve.torchserve_engine.process import KEY_FILE, renew_keys_of, run_dir_of

from .batcher import PartialResults

logger = logging.getLogger(__name__)

PLATFORM = "torchserve"
#: Seconds between two checks whether the local TorchServes' keys are due for renewal (a file
#: read each): far below any sensible renewal margin.
RENEW_INTERVAL_S = 1.0
#: Fewest images one call of a shared image batch carries: below that a call's own cost
#: (a round trip through TorchServe's front end) outweighs decoding in parallel.
MIN_CALL_IMAGES = 4


class TorchServeBackend:
    """Batches run in TorchServe, reached over gRPC at ``target`` (one or many replicas)."""

    def __init__(
        self,
        target: str,
        key_file: Path | None,
        max_message_bytes: int,
        timeout_s: float,
        key_dir: Path | None = None,
        resolve_interval_s: float = 5.0,
        registrar: Registrar | None = None,
        renewed_stores: Sequence[Path] = (),
        renew_fraction: float = 0.0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        workers_per_model: int = 1,
    ) -> None:
        self._target = target
        #: The gateway's image cap, which its headers were checked against.
        self._max_image_pixels = max_image_pixels
        #: Concurrent calls an image batch may be shared among (one per worker).
        self.workers_per_model = workers_per_model
        self._keys = key_store(key_file, key_dir)
        self._max_message_bytes = max_message_bytes
        self._timeout_s = timeout_s
        self._resolve_interval_s = resolve_interval_s
        self._registrar = registrar
        #: The model stores whose running TorchServe's keys this gateway renews (with
        #: ``renew_fraction`` > 0; ``torchserve_token_renew_fraction``).
        self._renewed_stores = [store.resolve() for store in renewed_stores]
        self._renew_fraction = renew_fraction
        self._renewal: asyncio.Task[None] | None = None
        # Loaded versions by object identity (the Backend contract's reloads hold two).
        self._loaded: dict[int, ModelVersion] = {}
        self._client: TorchServeClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TorchServeBackend:
        """Target, keys, size limit, timeout and resolution interval as ``settings`` give."""
        key_file: Path | None = None
        key_dir: Path | None = None
        stores = settings.torchserve_model_stores or [settings.model_store_dir]
        if settings.torchserve_token_auth:
            key_dir = settings.torchserve_key_dir
            key_file = settings.torchserve_key_file or (
                run_dir_of(settings.model_store_dir) / KEY_FILE
            )
        registrar = None
        if settings.torchserve_registration:
            registrar = Registrar(stores, settings)
        return cls(
            target=settings.grpc_target,
            key_file=key_file,
            max_message_bytes=settings.torchserve_max_message_bytes,
            timeout_s=settings.torchserve_call_timeout_s,
            key_dir=key_dir,
            resolve_interval_s=settings.torchserve_resolve_interval_s,
            registrar=registrar,
            renewed_stores=stores if settings.torchserve_token_auth else (),
            renew_fraction=settings.torchserve_token_renew_fraction,
            max_image_pixels=settings.max_image_pixels,
            workers_per_model=settings.torchserve_workers_per_model,
        )

    async def start(self) -> None:
        """Open the channels inside the running loop; a TorchServe not up yet is not fatal."""
        self._client = TorchServeClient(
            self._target,
            self._keys,
            self._max_message_bytes,
            resolve_interval_s=self._resolve_interval_s,
        )
        if self._registrar is not None:
            await self._registrar.start()
        if self._renewed_stores and self._renew_fraction > 0:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_forever())
        if not await self._client.ping():
            logger.warning("TorchServe at %s is not healthy yet", self._target)

    async def close(self) -> None:
        """Unload (unregister) every version and close the channels."""
        try:
            for model in list(self._loaded.values()):
                await self.unload(model)
        finally:
            renewal, self._renewal = self._renewal, None
            if renewal is not None:
                renewal.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewal
            if self._registrar is not None:
                await self._registrar.close()
            client, self._client = self._client, None
            if client is not None:
                await client.close()

    async def load(self, model: ModelVersion) -> None:
        """Register ``model`` with every TorchServe the gateway manages (nothing to do with
        registration off); a TorchServe not started yet registers it when it starts, and
        readiness follows. Raises :class:`UnavailableError` with TorchServe's reason."""
        if self._registrar is not None:
            # Another loaded object of the same version: it changed in place, so TorchServe's
            # copy is replaced (see the module docstring).
            changed = any(_same_version(model, other) for other in self._loaded.values())
            await self._registrar.register(model, replace=changed)
        self._loaded[id(model)] = model

    async def unload(self, model: ModelVersion) -> None:
        """Unregister ``model`` (unless another loaded object of the same version, its newer
        copy, still uses TorchServe's)."""
        if self._loaded.pop(id(model), None) is None or self._registrar is None:
            return
        if any(_same_version(model, other) for other in self._loaded.values()):
            return
        await self._registrar.unregister(model.spec.name, model.version)

    async def infer_batch(
        self, model: ModelVersion, batch: np.ndarray
    ) -> np.ndarray | PartialResults:
        """One ``Predictions`` call carrying the whole batch, to that model and version: float32
        items, or (an object array) encoded images the handler decodes, whose failed images
        come back as :class:`PartialResults`."""
        return await self._infer(model, batch, ())

    async def infer_features(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray | PartialResults:
        """As :meth:`infer_batch`, the handler asked for ``layers``'s feature maps too (it
        runs the archive's feature artifact and answers packed rows)."""
        return await self._infer(model, batch, layers)

    async def _infer(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray | PartialResults:
        if batch.dtype == object:
            return await self._infer_images(model, batch, layers)
        return await self._connected().predict_batch(
            model.spec.name, batch, self._timeout_s, version=str(model.version), layers=layers
        )

    async def _infer_images(
        self, model: ModelVersion, batch: np.ndarray, layers: tuple[str, ...]
    ) -> np.ndarray | PartialResults:
        spec = model.spec
        images: list[bytes] = batch.tolist()
        declared: tuple[int, int] | None = None
        if spec.fixed_size is None:
            # A size-variable model's batch shares one size, the one its headers declared
            # when the gateway priced them: the handler holds every image to it.
            declared = spec.read_image_header(images[0], self._max_image_pixels).size
        client, version = self._connected(), str(model.version)
        parts = max(1, min(self.workers_per_model, len(images) // MIN_CALL_IMAGES))
        bounds = np.linspace(0, len(images), parts + 1).astype(int).tolist()
        spans = list(itertools.pairwise(bounds))
        answers = await asyncio.gather(
            *(
                client.predict_images(
                    spec.name, images[start:end], declared, self._timeout_s, version, layers
                )
                for start, end in spans
            ),
            return_exceptions=True,  # every call ends before the batch fails
        )
        error = next((a for a in answers if isinstance(a, BaseException)), None)
        if error is not None:
            raise error
        results = [a for a in answers if not isinstance(a, BaseException)]
        failures = {
            start + index: failure
            for (start, _), part in zip(spans, results, strict=True)
            for index, failure in part.failures.items()
        }
        shape = next((r.outputs.shape[1:] for r in results if r.outputs is not None), None)
        if shape is None:  # every image failed: no caller gets a row, any placeholder will do
            return PartialResults(np.zeros(len(images), np.float32), failures, "image")
        rows = [
            part.outputs
            if part.outputs is not None
            else np.zeros((end - start, *shape), np.float32)  # a part whose every image failed
            for (start, end), part in zip(spans, results, strict=True)
        ]
        outputs = rows[0] if len(rows) == 1 else np.concatenate(rows)
        return PartialResults(outputs, failures, "image") if failures else outputs

    async def ready(self, model: ModelVersion) -> bool:
        """TorchServe runs a one-image probe through the version end to end."""
        if id(model) not in self._loaded or self._client is None:
            return False
        return await self._client.ready(model.spec, str(model.version))

    def describe(self) -> str:
        """The platform name reported in model metadata."""
        return PLATFORM

    def decodes_images(self, model: ModelVersion) -> bool:
        """Yes: TorchServe's workers decode a batch's images (the handler's image batch)."""
        return True

    def takes_pixels(self, model: ModelVersion) -> bool:
        """No: the handler's packed format carries normalized float32 batches."""
        return False

    async def _renew_forever(self) -> None:
        """Renew the keys of the TorchServes of the renewed stores whenever due; a failure is
        logged once per failing spell and tried again at the next check."""
        failing: set[Path] = set()
        while True:
            for store in self._renewed_stores:
                try:
                    renewed = await asyncio.to_thread(renew_keys_of, store, self._renew_fraction)
                except Exception as exc:
                    # Any failure (a state file read half-written, say): were this task to
                    # end, the keys would expire.
                    if store not in failing:
                        logger.warning("%s (the TorchServe of %s); trying again", exc, store)
                    failing.add(store)
                    continue
                failing.discard(store)
                if renewed:
                    logger.info(
                        "renewed the %s key of the TorchServe of %s", " and ".join(renewed), store
                    )
            await asyncio.sleep(RENEW_INTERVAL_S)

    def _connected(self) -> TorchServeClient:
        """The client; :class:`UnavailableError` before :meth:`start` or after :meth:`close`."""
        if self._client is None:
            raise UnavailableError("the torchserve backend is not started")
        return self._client


def _same_version(one: ModelVersion, other: ModelVersion) -> bool:
    """Whether two loaded objects are the same TorchServe version (name and number)."""
    return (one.spec.name, one.version) == (other.spec.name, other.version)
