"""The ``torchserve`` backend: each formed batch is one TorchServe gRPC ``Predictions`` call.

The gateway has already batched, so TorchServe's own batch size stays 1 (its delay would only
add to the gateway's; docs/architecture.md, "Batching once, preparing once") and the whole
batch travels in one request in the packed format the cnnserve handler reads. The
client spreads batches over every replica behind the target, attaches each replica's
inference key and turns TorchServe's failures into cnnserve errors.

Versions: TorchServe serves the archives it was started with, one per model name, so a
version counts as loaded once the gateway asks and is ready when TorchServe runs a probe
through the model of that name; every version of a model goes to that one archive.

TorchServe writes a new key every time it starts. Keys are looked up per call and re-read
whenever their file changes (``torchserve_key_dir``: one file per replica;
``torchserve_key_file``: one server), so a restarted or added replica is served without
restarting the gateway, and a gateway started before TorchServe becomes ready once
TorchServe is up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cnnserve.errors import UnavailableError
from cnnserve.models.repository import ModelVersion
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.client import TorchServeClient
from cnnserve.torchserve_engine.keys import key_store
from cnnserve.torchserve_engine.process import KEY_FILE, run_dir_of

logger = logging.getLogger(__name__)

PLATFORM = "torchserve"


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
    ) -> None:
        self._target = target
        self._keys = key_store(key_file, key_dir)
        self._max_message_bytes = max_message_bytes
        self._timeout_s = timeout_s
        self._resolve_interval_s = resolve_interval_s
        # Loaded versions by object identity (the Backend contract's reloads hold two).
        self._loaded: dict[int, ModelVersion] = {}
        self._client: TorchServeClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TorchServeBackend:
        """Target, keys, size limit, timeout and resolution interval as ``settings`` give."""
        key_file: Path | None = None
        key_dir: Path | None = None
        if settings.torchserve_token_auth:
            key_dir = settings.torchserve_key_dir
            key_file = settings.torchserve_key_file or (
                run_dir_of(settings.model_store_dir) / KEY_FILE
            )
        return cls(
            target=settings.grpc_target,
            key_file=key_file,
            max_message_bytes=settings.torchserve_max_message_bytes,
            timeout_s=settings.torchserve_call_timeout_s,
            key_dir=key_dir,
            resolve_interval_s=settings.torchserve_resolve_interval_s,
        )

    async def start(self) -> None:
        """Open the channels inside the running loop; a TorchServe not up yet is not fatal."""
        self._client = TorchServeClient(
            self._target,
            self._keys,
            self._max_message_bytes,
            resolve_interval_s=self._resolve_interval_s,
        )
        if not await self._client.ping():
            logger.warning("TorchServe at %s is not healthy yet", self._target)

    async def close(self) -> None:
        """Forget the loaded versions and close every channel."""
        self._loaded.clear()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def load(self, model: ModelVersion) -> None:
        """Note ``model`` as served: TorchServe already holds its model's archive, and a
        TorchServe not up yet is not an error (readiness follows it)."""
        self._loaded[id(model)] = model

    async def unload(self, model: ModelVersion) -> None:
        """Stop counting ``model`` as served; TorchServe keeps its archive."""
        self._loaded.pop(id(model), None)

    async def infer_batch(self, model: ModelVersion, batch: np.ndarray) -> np.ndarray:
        """One ``Predictions`` call carrying the whole batch, to the model of that name."""
        return await self._connected().predict_batch(model.spec.name, batch, self._timeout_s)

    async def ready(self, model: ModelVersion) -> bool:
        """TorchServe runs a one-image probe through the model end to end."""
        if id(model) not in self._loaded or self._client is None:
            return False
        return await self._client.models_ready([model.spec.name])

    def describe(self) -> str:
        """The platform name reported in model metadata."""
        return PLATFORM

    def takes_pixels(self, model: ModelVersion) -> bool:
        """No: the handler's packed format carries normalized float32 batches."""
        return False

    def _connected(self) -> TorchServeClient:
        """The client; :class:`UnavailableError` before :meth:`start` or after :meth:`close`."""
        if self._client is None:
            raise UnavailableError("the torchserve backend is not started")
        return self._client
