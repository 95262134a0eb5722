"""An async client for TorchServe's gRPC inference API, as the gateway's backend uses it.

One ``Predictions`` call carries a whole batch in the packed format
(:mod:`cnnserve.handlers.packing`) to one model version — float32 items
(:meth:`~TorchServeClient.predict_batch`), or encoded images the handler decodes
(:meth:`~TorchServeClient.predict_images`) — and returns the raw outputs for every item (and,
for images, each image that failed). Batches take turns over every replica behind the target
(:mod:`.replicas`), each called with its own inference key (:mod:`.keys`). TorchServe's ways
of failing are turned into cnnserve's errors here, so callers see one error table:

- the handler rejects the batch (4xx): gRPC status is still OK and the error is in the body;
- the model is unknown: INTERNAL with "Model not found" (not NOT_FOUND);
- the inference key is missing, wrong or expired: PERMISSION_DENIED.

A renewed key (:func:`~.process.renew_keys`) is refused by TorchServe from the moment it is
drawn, while the gateway may still hold the old one for a moment (the file is re-read when it
changes; a replica publishes its new key a few milliseconds after drawing it). So a refused
key is read again, for up to :data:`KEY_WAIT_S`, and the call made once more with the new one;
a key that does not change is still refused, and the caller learns so (at once the next
time: the same key refused again is not waited for).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

import grpc
import numpy as np
from google.protobuf import empty_pb2

from cnnserve import tracing
from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    PayloadTooLargeError,
    UnavailableError,
    UnknownModelError,
)
from cnnserve.handlers.packing import (
    LAYERS_INPUT_NAME,
    PACKED_INPUT_NAME,
    BatchResults,
    pack,
    pack_images,
    unpack_response,
    unpack_results,
)
from cnnserve.models.semantics import probe_input
from cnnserve.models.spec import ModelSpec
from cnnserve.protocol import torchserve_inference_pb2 as pb

from .keys import FixedKey, KeyStore
from .replicas import Address, Replica, ReplicaPool, Resolver

logger = logging.getLogger(__name__)

#: Ping's status when every model has its minimum of running workers.
HEALTHY = "Healthy"
#: How long a readiness probe may take before the model counts as not ready.
PROBE_TIMEOUT_S = 10.0
#: How TorchServe answers (INTERNAL) for a model it does not hold, or a version of it.
NOT_SERVED = ("Model not found", "does not exist for model")
#: What TorchServe says when the worker running a request crashed.
WORKER_DIED = "Worker died"
#: Longest wait between reconnection attempts to a TorchServe that went away (gRPC's default,
#: 120 s, would leave a restarted TorchServe unused for up to two minutes).
MAX_RECONNECT_BACKOFF_MS = 1000
#: Replicas one batch may be sent to: a batch that one did not run (NOT_RUN) is retried once
#: on another. Retrying is safe: a prediction changes nothing.
ATTEMPTS = 2
#: A replica that died or went away (UNAVAILABLE), or refused its key (a restarted replica
#: whose new key is not published yet), did not run the batch.
NOT_RUN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
#: The codes TorchServe refuses a key with (PERMISSION_DENIED; UNAUTHENTICATED to be safe).
KEY_REFUSED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
#: How long a refused call waits for its replica's key to change (renewed, not yet re-read or
#: published) before it counts as refused: well above the milliseconds a publication takes.
KEY_WAIT_S = 1.0
#: How often the key is read again meanwhile.
KEY_POLL_S = 0.05
#: Within one replica's channel, retry a call that failed UNAVAILABLE (a connection reset
#: while TorchServe restarts) before giving up on that replica.
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "org.pytorch.serve.grpc.inference.InferenceAPIsService"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def _named(model: str, version: str) -> str:
    """How messages name a model version: ``convnet version 2`` (or ``convnet``)."""
    return f"{model} version {version}" if version else model


def _now() -> float:
    """The running loop's clock, which deadlines are measured on."""
    return asyncio.get_running_loop().time()


def _metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying an inference key (none without tokens), and the trace
    context of the call while the gateway traces (W3C ``traceparent``)."""
    auth = (("authorization", f"Bearer {key}"),) if key else ()
    return auth + tracing.propagation_metadata()


def _health_status(health: str) -> str:
    """Ping's ``health`` is JSON text, ``{"status": "Healthy"}``; its status."""
    try:
        status = json.loads(health).get("status", "")
    except (ValueError, AttributeError):
        return health
    return str(status)


class TorchServeClient:
    """Calls TorchServe's ``InferenceAPIsService`` on every replica behind ``target``.

    ``target`` is ``127.0.0.1:7070``, ``ipv4:a:p,b:p`` (a fixed list of replicas) or
    ``dns:///torchserve:7070`` (every address the name resolves to, re-resolved every
    ``resolve_interval_s``); ``resolver`` replaces the target's resolution. ``keys`` gives
    each replica's inference key, sent as ``authorization: Bearer <key>``: a
    :class:`~.keys.KeyStore`, one key for all, or ``None`` when TorchServe runs without
    tokens. Create it inside the running event loop (the channels bind to it).
    """

    def __init__(
        self,
        target: str,
        keys: KeyStore | str | None,
        max_message_bytes: int = 64 * 2**20,
        resolve_interval_s: float = 5.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.target = target
        self._max_message_bytes = max_message_bytes
        self._keys = keys if keys is not None and not isinstance(keys, str) else FixedKey(keys)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", SERVICE_CONFIG),
            # Keep every batch retryable (gRPC's default buffer, 256 KiB, is under one
            # 32-image ConvNet batch).
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.initial_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS // 10),
        ]
        self.replicas = ReplicaPool(target, options, resolve_interval_s, resolver)
        #: The key each replica refused last even after waiting for a new one: a call that is
        #: refused that key again does not wait again (a key that is simply wrong would
        #: otherwise cost every call to that replica :data:`KEY_WAIT_S`).
        self._refused: dict[Address, str | None] = {}

    async def predict_batch(
        self,
        model: str,
        batch: np.ndarray,
        timeout_s: float | None = None,
        version: str = "",
        layers: Sequence[str] = (),
    ) -> np.ndarray:
        """Run a float32 ``N×3×H×W`` batch through ``model`` (its ``version``; ``""``: the one
        TorchServe holds as default); its raw outputs, N first — with ``layers`` (feature
        maps), the handler's packed rows of output and maps.

        The batch goes to the next replica in turn; if that one did not run it (unavailable,
        key refused or not published yet), once more to another. A key refused because it was
        just renewed does not count: the call is made again with the new key. Raises
        :class:`InvalidInputError` when the handler rejects the batch, :class:`UnknownModelError`,
        :class:`UnavailableError` (unreachable, not ready, key refused),
        :class:`DeadlineExceededError` and :class:`PayloadTooLargeError`.
        """
        packed = pack(batch, ndim=4, max_bytes=self._max_message_bytes)
        answer = await self._predict(model, version, packed, timeout_s, layers)
        outputs = unpack_response(answer, max_bytes=self._max_message_bytes)
        if len(outputs) != len(batch):
            raise CnnserveError(
                f"TorchServe answered {len(outputs)} outputs for {len(batch)} items of {model}"
            )
        return outputs

    async def predict_images(
        self,
        model: str,
        images: Sequence[bytes],
        declared_size: tuple[int, int] | None = None,
        timeout_s: float | None = None,
        version: str = "",
        layers: Sequence[str] = (),
    ) -> BatchResults:
        """Run encoded ``images`` (PNG/JPEG, their headers checked by the caller) through
        ``model``: the handler decodes them, each image's header held to ``declared_size``
        (``(width, height)``, required for a size-variable model's batch); ``layers`` as for
        :meth:`predict_batch`.

        Answers the outputs for every image and each failed image's error by its index
        (``outputs`` is ``None`` when every image failed); the batch as a whole fails as
        :meth:`predict_batch` does.
        """
        packed = pack_images(images, declared_size, max_bytes=self._max_message_bytes)
        answer = await self._predict(model, version, packed, timeout_s, layers)
        return unpack_results(answer, len(images), max_bytes=self._max_message_bytes)

    async def _predict(
        self,
        model: str,
        version: str,
        packed: bytes,
        timeout_s: float | None,
        layers: Sequence[str] = (),
    ) -> bytes:
        """One packed batch (and the feature maps asked for, if any) to the next replica in
        turn (once more to another if that one did not run it); the handler's answer, still
        packed."""
        inputs = {PACKED_INPUT_NAME: packed}
        if layers:
            inputs[LAYERS_INPUT_NAME] = ",".join(layers).encode()
        request = pb.PredictionsRequest(model_name=model, model_version=version, input=inputs)
        deadline = None if timeout_s is None else _now() + timeout_s
        tried: list[Replica] = []
        failure: CnnserveError = UnavailableError(
            f"TorchServe at {self.target} resolves to no replica"
        )
        while len(tried) < ATTEMPTS:
            replica = await self.replicas.pick(exclude=tried)
            if replica is None:
                break
            tried.append(replica)
            try:
                response = await self._predict_on(replica, request, deadline)
            except UnavailableError as exc:
                failure = exc
                continue
            except grpc.aio.AioRpcError as exc:
                failure = self._error(replica, _named(model, version), exc, timeout_s)
                if exc.code() not in NOT_RUN:
                    raise failure from None
                self.replicas.mark_down(replica)
                continue
            prediction: bytes = response.prediction
            return prediction
        raise failure

    async def ping(self) -> bool:
        """Whether some replica answers and reports every model's workers running.

        TorchServe reports healthy once workers *run*, before they have loaded the model;
        :meth:`ready` is the check that a model can answer.
        """
        answers = await asyncio.gather(*(self._ping(r) for r in await self.replicas.all()))
        return any(answers)

    async def ready(self, spec: ModelSpec, version: str = "") -> bool:
        """Whether model ``spec.name`` (its ``version``) answers a one-item probe right now.

        TorchServe's inference API has no per-model readiness call, so the model runs the
        probe input (:func:`~cnnserve.models.semantics.probe_input`: one all-zero image) end
        to end; that also proves the key, the handler and the artifact work.
        """
        try:
            await self.predict_batch(
                spec.name, probe_input(spec), timeout_s=PROBE_TIMEOUT_S, version=version
            )
        except CnnserveError as exc:
            logger.info("TorchServe %s is not ready: %s", _named(spec.name, version), exc)
            return False
        return True

    async def close(self) -> None:
        """Close every replica's channel; calls in flight are cancelled."""
        await self.replicas.close()

    async def _predict_on(
        self, replica: Replica, request: pb.PredictionsRequest, deadline: float | None
    ) -> pb.PredictionResponse:
        """``request`` on ``replica`` with its key; a key refused because it was just renewed
        is read again and the call made once more with the new one. Raises the call's
        :class:`grpc.aio.AioRpcError`, or :class:`UnavailableError` when the key is unknown."""
        key = self._key(replica)
        try:
            return await self._predictions(replica, request, key, deadline)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in KEY_REFUSED:
                raise
            known = self._refused.get(replica.address) == key
            renewed = await self._renewed_key(replica, key, deadline, 0.0 if known else KEY_WAIT_S)
            if renewed is None:
                self._refused[replica.address] = key
                raise
        return await self._predictions(replica, request, renewed, deadline)

    async def _predictions(
        self,
        replica: Replica,
        request: pb.PredictionsRequest,
        key: str | None,
        deadline: float | None,
    ) -> pb.PredictionResponse:
        """One ``Predictions`` call on ``replica`` with ``key``, within what is left until
        ``deadline`` (the loop's clock)."""
        remaining = None if deadline is None else max(deadline - _now(), 0.0)
        with self.replicas.calling(replica):
            response: pb.PredictionResponse = await replica.stub.Predictions(
                request, timeout=remaining, metadata=_metadata(key)
            )
        return response

    async def _renewed_key(
        self, replica: Replica, refused: str | None, deadline: float | None, wait_s: float
    ) -> str | None:
        """``replica``'s key once it differs from ``refused``, read again at once and then
        every :data:`KEY_POLL_S` for up to ``wait_s`` (never past ``deadline``); ``None`` if
        it stays the same."""
        give_up = _now() + wait_s if deadline is None else min(_now() + wait_s, deadline)
        while True:
            try:
                key = self._key(replica, fresh=True)
            except UnavailableError:
                key = refused  # being rewritten (TorchServe writes its file in place)
            if key != refused:
                return key
            if _now() + KEY_POLL_S > give_up:
                return None
            await asyncio.sleep(KEY_POLL_S)

    async def _ping(self, replica: Replica) -> bool:
        """Whether ``replica`` answers Ping healthy (with its key)."""
        try:
            metadata = _metadata(self._key(replica))
            with self.replicas.calling(replica):
                response = await replica.stub.Ping(
                    empty_pb2.Empty(), timeout=PROBE_TIMEOUT_S, metadata=metadata
                )
        except (grpc.aio.AioRpcError, UnavailableError):
            return False
        return _health_status(response.health) == HEALTHY

    def _key(self, replica: Replica, fresh: bool = False) -> str | None:
        """``replica``'s inference key (``None`` without tokens); ``fresh``: read again."""
        return self._keys.key_for(replica.address.host, replica.address.port, fresh)

    def _error(
        self, replica: Replica, model: str, exc: grpc.aio.AioRpcError, timeout_s: float | None
    ) -> CnnserveError:
        """``exc`` from ``replica`` as cnnserve's error."""
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(f"TorchServe did not answer {model} within {timeout_s} s")
        if code == grpc.StatusCode.NOT_FOUND or (
            code == grpc.StatusCode.INTERNAL and any(m in details for m in NOT_SERVED)
        ):
            return UnknownModelError(f"TorchServe at {replica.address} does not serve {model}")
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            return UnavailableError(
                f"TorchServe at {replica.address} refused the inference key (missing, wrong or "
                "expired), also when read again; is anything renewing it "
                "(torchserve_token_renew_fraction)?"
            )
        if code == grpc.StatusCode.UNAVAILABLE or WORKER_DIED in details:
            # TorchServe reports a worker that crashed mid-batch as RESOURCE_EXHAUSTED: not the
            # message size nor the caller's fault, and a retry succeeds once it is restarted.
            what = (
                f"its {model} worker died while running this batch (TorchServe restarts it)"
                if WORKER_DIED in details
                else details
            )
            return UnavailableError(f"TorchServe at {replica.address} is unavailable: {what}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return PayloadTooLargeError(
                f"the {model} batch or its answer exceeds the gRPC message limit: {details}"
            )
        # TorchServe's own failures (a handler exception, ...) stay internal; its log has them.
        logger.warning("TorchServe failed on %s: %s %s", model, code.name, details)
        return CnnserveError(f"TorchServe failed to run {model} ({code.name})")
