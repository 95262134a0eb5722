"""The data plane: the one entry point both transports (gRPC and HTTP) call.

A request flows: model and version checked → outputs checked → its one input validated and
turned into a float32 batch (images decoded per item, off the event loop) → the model's
:class:`DynamicBatcher` → the backend → the requested outputs computed for this request.
Everything raised to a transport is a :mod:`cnnserve.errors` exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import numpy as np

from cnnserve.errors import (
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
    UnknownModelError,
)
from cnnserve.models.registry import MODELS, get_spec
from cnnserve.models.spec import ModelSpec
from cnnserve.protocol.domain import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
)
from cnnserve.protocol.errors import CodecError
from cnnserve.settings import Settings

from .backends import Backend, create_backend
from .batcher import DynamicBatcher
from .inputs import input_metadata, item_count, select_input, to_batch
from .metrics import GatewayMetrics
from .outputs import compute_outputs, output_metadata, plan_outputs

logger = logging.getLogger(__name__)

SERVER_NAME = "cnnserve"
#: The only model version; ``""`` in a request means "latest", i.e. this one.
MODEL_VERSION = "1"
#: Open Inference Protocol extensions the gateway implements (Triton's names).
EXTENSIONS = ("classification", "binary_tensor_data")
#: Request parameter carrying the caller's time budget, in microseconds (0: none).
TIMEOUT_PARAMETER = "timeout"
#: Arrays larger than this are prepared / post-processed in a worker thread, not on the loop.
OFFLOAD_BYTES = 1 << 20
#: Metrics label for requests naming a model that is not served (bounds label cardinality).
UNKNOWN_MODEL_LABEL = "_unknown"

T = TypeVar("T")


@contextlib.contextmanager
def caller_input() -> Iterator[None]:
    """Decode a caller's message: a protocol violation in it is the caller's invalid input."""
    try:
        yield
    except CodecError as exc:
        raise InvalidInputError(str(exc)) from exc


class DataPlane:
    """Models, batchers and backend behind every transport; see the module docstring."""

    def __init__(
        self, settings: Settings, backend: Backend, metrics: GatewayMetrics | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or GatewayMetrics()
        self._batchers: dict[str, DynamicBatcher] = {}
        self._started = False
        self._draining = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        #: Whether UINT8 inputs reach the backend as pixels (it normalizes them itself).
        self._keep_pixels = False

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the backend, then one batcher per model (inside the running loop)."""
        await self.backend.start()
        self._keep_pixels = self.backend.takes_pixels()
        self._idle = asyncio.Event()
        self._idle.set()
        for name in self.model_names():
            batcher = DynamicBatcher(
                self._batch_fn(name),
                max_batch_size=self.settings.max_batch_size,
                max_batch_delay_ms=self.settings.max_batch_delay_ms,
                max_queue_size=self.settings.max_queue_size,
                adaptive_delay=self.settings.adaptive_batch_delay,
                observer=self.metrics.observer(name),
                name=name,
            )
            batcher.start()
            self._batchers[name] = batcher
        self._draining = False
        self._started = True
        logger.info("data plane started: %s backend", self.backend.describe())

    def _batch_fn(self, model: str) -> Callable[[np.ndarray], Awaitable[np.ndarray]]:
        async def run(batch: np.ndarray) -> np.ndarray:
            return await self.backend.infer_batch(model, batch)

        return run

    def begin_drain(self) -> None:
        """Readiness turns false and new requests get UNAVAILABLE; in-flight ones go on."""
        self._draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until no request is in flight; whether none is."""
        if self._idle is None or self._idle.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        return self._idle.is_set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new requests, let in-flight ones finish (up to the grace), close.

        ``grace_s`` defaults to ``settings.drain_grace_s``; requests still unanswered when it
        runs out get UNAVAILABLE.
        """
        self.begin_drain()
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        give_up_at = time.monotonic() + grace
        await self.wait_idle(grace)
        left = max(0.0, give_up_at - time.monotonic())
        await asyncio.gather(*(b.stop(left) for b in self._batchers.values()))
        self._batchers.clear()
        self._started = False
        await self.backend.close()

    # --- health and metadata ---

    def server_live(self) -> bool:
        """The process can serve: false only when a started batcher's task has died."""
        if not self._started or self._draining:
            return True
        return all(b.running for b in self._batchers.values())

    async def server_ready(self) -> bool:
        """Every model loaded and its backend answering, and not draining."""
        if not self._accepting():
            return False
        states = await asyncio.gather(*(self.model_ready(n) for n in self.model_names()))
        return all(states)

    async def model_ready(self, name: str, version: str = "") -> bool:
        """The model's batcher runs and its backend answers a probe; unknown → NOT_FOUND."""
        spec = self._spec(name, version)
        batcher = self._batchers.get(spec.name)
        if not self._accepting() or batcher is None or not batcher.running:
            return False
        return await self.backend.ready(spec.name)

    def model_names(self) -> list[str]:
        """The served models."""
        return sorted(MODELS)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Names, datatypes and shapes (``-1`` variable) of every input and output."""
        spec = self._spec(name, version)
        return ModelMetadata(
            name=spec.name,
            versions=(MODEL_VERSION,),
            platform=self.backend.describe(),
            inputs=input_metadata(spec),
            outputs=output_metadata(spec),
        )

    def server_metadata(self) -> ServerMetadata:
        """Server name, version and the protocol extensions it implements."""
        return ServerMetadata(
            name=SERVER_NAME, version=importlib.metadata.version("cnnserve"), extensions=EXTENSIONS
        )

    # --- inference ---

    async def infer(self, request: InferRequest) -> InferResponse:
        """Answer one request; raises :mod:`cnnserve.errors` exceptions only."""
        label = request.model_name if request.model_name in MODELS else UNKNOWN_MODEL_LABEL
        started = time.monotonic()
        if not self._accepting():
            exc = UnavailableError("server is not accepting requests (starting or shutting down)")
            self.metrics.request_finished(label, exc, time.monotonic() - started)
            raise exc
        self._enter()
        try:
            response = await self._infer(request)
        except asyncio.CancelledError:
            if request.deadline is not None and time.monotonic() >= request.deadline:
                # The transport ended the call at its deadline (gRPC does): count it so.
                expired = DeadlineExceededError("deadline passed")
                self.metrics.request_finished(label, expired, time.monotonic() - started)
            else:
                self.metrics.request_cancelled(label)
            raise
        except CnnserveError as exc:
            self.metrics.request_finished(label, exc, time.monotonic() - started)
            raise
        except Exception as exc:
            logger.exception("inference on %s failed", request.model_name)
            self.metrics.request_finished(label, exc, time.monotonic() - started)
            raise CnnserveError(GENERIC_INTERNAL_MESSAGE) from None
        finally:
            self._leave()
        self.metrics.request_finished(label, None, time.monotonic() - started)
        return response

    async def _infer(self, request: InferRequest) -> InferResponse:
        spec = self._spec(request.model_name, request.model_version)
        deadline = self._deadline(request)
        plans = plan_outputs(spec, request.outputs)
        tensor = select_input(spec, request.inputs)
        count = item_count(spec, tensor, self.settings.max_items_per_request)
        batcher = self._batchers[spec.name]
        # A full queue refuses at once, before images are decoded for nothing.
        batcher.check_room(count)
        # Image decoding and big array conversions would stall every other request.
        batch = await _maybe_offload(
            tensor.datatype == "BYTES" or tensor.data.nbytes > OFFLOAD_BYTES,
            to_batch,
            spec,
            tensor,
            self.settings.max_image_pixels,
            self._keep_pixels,
        )
        raw = await batcher.submit(batch, deadline)
        outputs = await _maybe_offload(
            raw.nbytes > OFFLOAD_BYTES, compute_outputs, spec, raw, plans
        )
        return InferResponse(
            model_name=spec.name, outputs=outputs, model_version=MODEL_VERSION, id=request.id
        )

    def _deadline(self, request: InferRequest) -> float | None:
        """The earliest of the transport's deadline and the OIP ``timeout`` (µs) parameter;
        ``settings.default_timeout_ms`` when neither is given."""
        now = time.monotonic()
        candidates = [request.deadline] if request.deadline is not None else []
        timeout_us = request.parameters.get(TIMEOUT_PARAMETER)
        if timeout_us is not None:
            if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
                raise InvalidInputError(
                    f"parameter {TIMEOUT_PARAMETER!r} must be a non-negative integer of "
                    f"microseconds, got {timeout_us!r}"
                )
            if timeout_us > 0:  # 0 means "no timeout", as in Triton
                candidates.append(now + timeout_us / 1e6)
        if not candidates and self.settings.default_timeout_ms is not None:
            candidates.append(now + self.settings.default_timeout_ms / 1000)
        return min(candidates, default=None)

    # --- helpers ---

    def _spec(self, name: str, version: str) -> ModelSpec:
        spec = get_spec(name)
        if version not in ("", MODEL_VERSION):
            raise UnknownModelError(
                f"model {name} has no version {version!r}; available versions: {MODEL_VERSION}"
            )
        return spec

    def _accepting(self) -> bool:
        return self._started and not self._draining

    def _enter(self) -> None:
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()


async def _maybe_offload(offload: bool, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in a worker thread when ``offload``, inline otherwise (cheap work)."""
    if offload:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def create_core(settings: Settings, metrics: GatewayMetrics | None = None) -> DataPlane:
    """A data plane over the backend ``settings.backend`` names; not started yet."""
    return DataPlane(settings, create_backend(settings), metrics)
