"""The ``torchserve`` backend: each formed batch is one TorchServe gRPC ``Predictions`` call.

The gateway has already batched (TorchServe's own batch size stays 1, DESIGN §2), so the
whole batch travels in one request in the packed format the cnnserve handler reads. The
client attaches the inference key and turns TorchServe's failures into cnnserve errors.

TorchServe writes a new key file every time it starts. The backend re-reads it whenever the
file changes, so a restarted TorchServe is served again without restarting the gateway, and
a gateway started before TorchServe becomes ready once TorchServe is up.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cnnserve.errors import UnavailableError
from cnnserve.models.registry import MODELS
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.client import TorchServeClient, read_inference_key
from cnnserve.torchserve_engine.process import KEY_FILE, run_dir_of

logger = logging.getLogger(__name__)

PLATFORM = "torchserve"


def _stamp(key_file: Path | None) -> int | None:
    """When the key file was last written (``None``: no key file, or not written yet)."""
    if key_file is None:
        return None
    try:
        return key_file.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class TorchServeBackend:
    """Batches run in TorchServe, reached over gRPC at ``target`` (one or many replicas)."""

    def __init__(
        self,
        target: str,
        key_file: Path | None,
        max_message_bytes: int,
        timeout_s: float,
        models: Iterable[str] = tuple(MODELS),
    ) -> None:
        self._target = target
        self._key_file = key_file
        self._max_message_bytes = max_message_bytes
        self._timeout_s = timeout_s
        self._models = tuple(models)
        self._client: TorchServeClient | None = None
        self._client_stamp: int | None = None
        # Clients built with an older key; closed at close(), as calls may still use them.
        self._retired: list[TorchServeClient] = []
        self._started = False

    @classmethod
    def from_settings(cls, settings: Settings) -> TorchServeBackend:
        """Target, key file, size limit and timeout as ``settings`` give them."""
        key_file: Path | None = None
        if settings.torchserve_token_auth:
            key_file = settings.torchserve_key_file or (
                run_dir_of(settings.model_store_dir) / KEY_FILE
            )
        return cls(
            target=settings.grpc_target,
            key_file=key_file,
            max_message_bytes=settings.torchserve_max_message_bytes,
            timeout_s=settings.torchserve_response_timeout_s,
        )

    async def start(self) -> None:
        """Open the channel inside the running loop; a TorchServe not up yet is not fatal."""
        self._started = True
        try:
            client = self._connect()
        except UnavailableError as exc:
            logger.warning("torchserve backend: %s; retrying on every call", exc)
            return
        if not await client.ping():
            logger.warning("TorchServe at %s is not healthy yet", self._target)

    async def close(self) -> None:
        """Close every channel."""
        self._started = False
        clients = [*self._retired, *([self._client] if self._client else [])]
        self._client, self._retired = None, []
        for client in clients:
            await client.close()

    async def infer_batch(self, model: str, batch: np.ndarray) -> np.ndarray:
        """One ``Predictions`` call carrying the whole batch."""
        return await self._connect().predict_batch(model, batch, self._timeout_s)

    async def ready(self, model: str) -> bool:
        """TorchServe runs a one-image probe through ``model`` end to end."""
        if model not in self._models:
            return False
        try:
            client = self._connect()
        except UnavailableError as exc:
            logger.info("torchserve backend not ready: %s", exc)
            return False
        return await client.models_ready([model])

    def describe(self) -> str:
        """The platform name reported in model metadata."""
        return PLATFORM

    def takes_pixels(self) -> bool:
        """No: the handler's packed format carries normalized float32 batches."""
        return False

    def _connect(self) -> TorchServeClient:
        """The client for TorchServe's current key, rebuilt when the key file changed."""
        if not self._started:
            raise UnavailableError("the torchserve backend is not started")
        stamp = _stamp(self._key_file)
        if self._client is not None and stamp == self._client_stamp:
            return self._client
        key = read_inference_key(self._key_file) if self._key_file is not None else None
        if self._client is not None:
            logger.info("TorchServe's key file changed; using the new inference key")
            self._retired.append(self._client)
        self._client = TorchServeClient(self._target, key, self._max_message_bytes)
        self._client_stamp = stamp
        return self._client
