"""The data plane: the one entry point both transports (gRPC and HTTP) call.

A request flows: the model manager picks the version (``model_version``, or ``""`` for the
highest ready one) and the request holds it until answered → outputs checked → its one input
validated and priced (images: from their headers alone) → a tensor turned into a float32
batch, images kept encoded → that version's :class:`DynamicBatcher` → images decoded a batch
at a time where that runs in parallel with this loop (:class:`.decode_pool.ImageDecoder`, or
TorchServe) → the backend → the requested outputs computed for this request. Everything
raised to a transport is a :mod:`cnnserve.errors` exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np

from cnnserve.errors import (
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
)
from cnnserve.models.features import item_shapes, split_rows
from cnnserve.protocol.domain import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    Tensor,
)
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.json_text import shown
from cnnserve.protocol.tensor_codec import InputLimits
from cnnserve.settings import Settings

from .access_log import RequestRecord, current_record
from .backends import Backend, create_backend
from .batcher import ModelTime
from .decode_pool import DecodePool, ImageDecoder
from .inputs import declared_input, input_metadata, item_count, select_input, to_batch
from .memory_budget import (
    INPUT_BYTES_PER_ELEMENT,
    MemoryBudget,
    check_feature_maps,
    request_cost,
)
from .metrics import UNKNOWN_LABEL, GatewayMetrics
from .model_manager import ModelManager, ServedVersion
from .outputs import compute_outputs, output_metadata, plan_outputs, requested_layers
from .readiness import ReadinessCache

logger = logging.getLogger(__name__)

SERVER_NAME = "cnnserve"
#: Open Inference Protocol extensions the gateway implements (Triton's names); the last four
#: are served by gateway/repository_api.py ("(unload_dependents)": unload accepts it).
EXTENSIONS = (
    "classification",
    "binary_tensor_data",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "statistics",
)
#: Request parameter carrying the caller's time budget, in microseconds (0: none).
TIMEOUT_PARAMETER = "timeout"
#: The largest ``timeout`` accepted: the protocol's uint64 range.
MAX_TIMEOUT_US = 2**64 - 1
#: Most elements a BYTES input may declare: far above any request's images (one per item,
#: max_items_per_request), low enough that their Python objects cost little (~3 MiB).
MAX_BYTES_ELEMENTS = 1 << 16
#: Arrays larger than this are prepared / post-processed in a worker thread, not on the loop.
OFFLOAD_BYTES = 1 << 20
#: A request with at most this many images, of at most INLINE_IMAGE_BYTES together, has its
#: headers read on the loop (a few µs each): a trip to the decode threads costs more.
INLINE_IMAGES = 8
INLINE_IMAGE_BYTES = 64 * 1024

T = TypeVar("T")


@contextlib.contextmanager
def caller_input() -> Iterator[None]:
    """Decode a caller's message: a protocol violation in it is the caller's invalid input."""
    try:
        yield
    except CodecError as exc:
        raise InvalidInputError(str(exc)) from exc


class DataPlane:
    """The model manager, its batchers and the backend behind every transport; see the module
    docstring."""

    def __init__(
        self, settings: Settings, backend: Backend, metrics: GatewayMetrics | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics or GatewayMetrics(settings.gpu_metrics)
        #: Where caller-sized work (headers of many images, message decoding, big arrays)
        #: runs off the loop.
        self.decode_pool = DecodePool(settings.decode_threads)
        #: Where a batch of images is decoded for a backend that takes arrays.
        self.images = ImageDecoder(settings.decode_processes, self.decode_pool)
        #: The served versions and their lifecycle; the repository API's entry point.
        self.models = ModelManager(settings, backend, self.metrics, self.images)
        #: What transports check each input's declared shape against before converting it:
        #: more elements than the memory budget prices under max_request_bytes, or more BYTES
        #: elements than MAX_BYTES_ELEMENTS, can never succeed.
        self.input_limits = InputLimits(
            max_elements=settings.max_request_bytes // INPUT_BYTES_PER_ELEMENT,
            max_bytes_elements=MAX_BYTES_ELEMENTS,
        )
        #: The bytes requests hold in the gateway, reserved before they are spent.
        self.memory = MemoryBudget(settings.max_request_bytes, settings.max_in_flight_bytes)
        #: Each served version's readiness, refreshed in the background (health reads it).
        self.readiness = ReadinessCache(backend, self.models.served_versions)
        self._started = False
        self._draining = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        """Start the backend, then load the repository's models (inside the running loop)."""
        self._idle = asyncio.Event()
        self._idle.set()
        await self.backend.start()
        try:
            await self.models.start()
        except BaseException:
            await self.backend.close()
            raise
        await self.readiness.refresh()
        self.readiness.start()
        self._draining = False
        self._started = True
        logger.info("data plane started: %s backend", self.backend.describe())

    def begin_drain(self) -> None:
        """Readiness turns false and new requests get UNAVAILABLE; in-flight ones go on."""
        self._draining = True

    @property
    def draining(self) -> bool:
        """Whether a drain has begun: transports ask their clients to move on."""
        return self._draining

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
        await self.readiness.stop()
        await self.models.stop(max(0.0, give_up_at - time.monotonic()))
        self._started = False
        self.images.close()
        self.decode_pool.close()
        await self.backend.close()

    # --- health and metadata ---

    def server_live(self) -> bool:
        """The process can serve: false only when a started batcher's task has died."""
        if not self._started or self._draining:
            return True
        return all(s.batcher.running for s in self.models.served_versions())

    async def server_ready(self) -> bool:
        """Not draining, every model that was to be served serves (one whose every version
        failed to load makes the server not ready; its reason is in the repository index),
        and every loaded version's batcher runs and its backend answered lately (a cached
        state: :mod:`.readiness`)."""
        if not self._accepting() or self.models.unservable():
            return False
        return all(self._answers(s) for s in self.models.served_versions())

    async def model_ready(self, name: str, version: str = "") -> bool:
        """The version (``""``: the highest ready one) takes requests and its backend answered
        lately (cached, as for :meth:`server_ready`); a model or version that is not known →
        NOT_FOUND."""
        try:
            served = self.models.route(name, version)
        except UnavailableError:
            return False
        return self._accepting() and self._answers(served)

    def _answers(self, served: ServedVersion) -> bool:
        return served.batcher.running and self.readiness.ready(served)

    def model_names(self) -> list[str]:
        """The models with a version taking requests."""
        return self.models.model_names()

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        """Names, datatypes and shapes (``-1`` variable) of every input and output of the
        version (``""``: the highest ready one); ``versions`` lists the ready ones."""
        served = self.models.route(name, version)
        spec = served.model.spec
        return ModelMetadata(
            name=spec.name,
            versions=tuple(str(v) for v in self.models.ready_versions(spec.name)),
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

    async def infer(self, request: InferRequest, admitted: bool = False) -> InferResponse:
        """Answer one request; raises :mod:`cnnserve.errors` exceptions only.

        ``admitted``: the transport accepted the call and turns new ones away itself during
        a drain (gRPC: GOAWAY), so the call is served while the drain lasts like any call
        already in flight, not refused.
        """
        started = time.monotonic()
        served: ServedVersion | None = None
        record = current_record()
        if record is not None:
            record.asked(request.id, request.model_name)
        try:
            if not (self._accepting() or (admitted and self._started)):
                raise UnavailableError(
                    "server is not accepting requests (starting or shutting down)"
                )
            served = self.models.route(request.model_name, request.model_version)
            with self._held(), served.lease():
                return await self._infer(served, request, started, record)
        except asyncio.CancelledError:
            if request.deadline is not None and time.monotonic() >= request.deadline:
                # The transport ended the call at its deadline (gRPC does): count it so.
                expired = DeadlineExceededError("deadline passed")
                self._finished(request, served, expired, started)
            else:
                self.metrics.request_cancelled(*self._labels(request, served))
            raise
        except CnnserveError as exc:
            self._finished(request, served, exc, started)
            raise
        except Exception as exc:
            where = served.batcher.name if served is not None else request.model_name
            logger.exception("inference on %s failed", where)
            self._finished(request, served, exc, started)
            raise CnnserveError(GENERIC_INTERNAL_MESSAGE) from None

    async def _infer(
        self,
        served: ServedVersion,
        request: InferRequest,
        started: float,
        record: RequestRecord | None,
    ) -> InferResponse:
        spec = served.model.spec
        deadline = self._deadline(request)
        plans = plan_outputs(spec, request.outputs)
        layers = requested_layers(spec, plans)
        tensor = select_input(spec, request.inputs)
        count = item_count(spec, tensor, self.settings.max_items_per_request)
        if record is not None:
            record.routed(spec.name, served.version, count)
        # A full queue refuses at once, before images are decoded for nothing.
        served.batcher.check_room(count)
        preparing = time.monotonic()
        images = tensor.datatype == "BYTES"
        # Headers only, a few µs each: many of them off the loop.
        declared = await self._maybe_offload(
            images and not _few_small_images(tensor),
            declared_input,
            spec,
            tensor,
            self.settings.max_image_pixels,
        )
        height, width = declared.item_shape[-2:]
        shapes = item_shapes(spec, layers, height, width) if layers else []
        cost = request_cost(
            spec,
            count,
            declared.item_shape,
            declared.largest_image_pixels,
            sum(math.prod(shape) for shape in shapes[1:]),
        )
        if layers:
            # Feature maps are big, and their size is known now: refused before any compute.
            maps = dict(zip(layers, shapes[1:], strict=True))
            check_feature_maps(count, maps, cost, self.memory.max_request_bytes)
        with self.memory.reserve(cost, f"this request ({count} items of {spec.name})"):
            if declared.encoded is not None:
                # Decoded with the rest of their batch; the declared size keeps an FCN batch
                # to one size.
                batch, key = declared.encoded, declared.item_shape
            else:
                # Big array conversions would stall every other request.
                batch = await self._maybe_offload(
                    tensor.data.nbytes > OFFLOAD_BYTES,
                    to_batch,
                    spec,
                    tensor,
                    served.keep_pixels,
                )
                key = ()
            input_s = time.monotonic() - preparing
            model_time = ModelTime()
            raw = await served.batcher.submit(batch, deadline, model_time, key, layers)
            if record is not None:
                record.ran(model_time)
            computing = time.monotonic()
            computed: dict[str, np.ndarray] = {}
            if layers:
                raw, *parts = split_rows(raw, shapes)
                computed = dict(zip(layers, parts, strict=True))
            outputs = await self._maybe_offload(
                raw.nbytes > OFFLOAD_BYTES, compute_outputs, spec, raw, plans, computed
            )
        finished = time.monotonic()
        served.stats.request_succeeded(
            count, finished - started, input_s, model_time.seconds, finished - computing
        )
        self.metrics.request_finished(spec.name, served.version, None, finished - started)
        return InferResponse(
            model_name=spec.name, outputs=outputs, model_version=served.version, id=request.id
        )

    def _labels(self, request: InferRequest, served: ServedVersion | None) -> tuple[str, str]:
        """The metrics labels of a request: its version's, or ``_unknown`` where it had none."""
        if served is not None:
            return served.name, served.version
        return self.models.metrics_label(request.model_name), UNKNOWN_LABEL

    def _finished(
        self,
        request: InferRequest,
        served: ServedVersion | None,
        exc: BaseException,
        started: float,
    ) -> None:
        """Count a request that ended with ``exc``."""
        seconds = time.monotonic() - started
        if served is not None:
            served.stats.request_failed(seconds)
        self.metrics.request_finished(*self._labels(request, served), exc, seconds)

    def _deadline(self, request: InferRequest) -> float | None:
        """The earliest of the transport's deadline and the OIP ``timeout`` (µs) parameter;
        ``settings.default_timeout_ms`` when neither is given."""
        now = time.monotonic()
        candidates = [request.deadline] if request.deadline is not None else []
        timeout_us = request.parameters.get(TIMEOUT_PARAMETER)
        if timeout_us is not None:
            # Triton's timeout is a uint64; a larger JSON integer would overflow the float sum.
            if (
                isinstance(timeout_us, bool)
                or not isinstance(timeout_us, int)
                or not 0 <= timeout_us <= MAX_TIMEOUT_US
            ):
                raise InvalidInputError(
                    f"parameter {TIMEOUT_PARAMETER!r} must be an integer of microseconds from 0 "
                    f"to {MAX_TIMEOUT_US}, got {shown(timeout_us)}"
                )
            if timeout_us > 0:  # 0 means "no timeout", as in Triton
                candidates.append(now + timeout_us / 1e6)
        if not candidates and self.settings.default_timeout_ms is not None:
            candidates.append(now + self.settings.default_timeout_ms / 1000)
        return min(candidates, default=None)

    # --- helpers ---

    async def convert_message(self, size: int, fn: Callable[..., T], *args: object) -> T:
        """A transport's conversion of a caller's message ``fn(*args)`` (decoding a request,
        encoding its answer): in the decode pool when the message is big (``size`` bytes
        over :data:`OFFLOAD_BYTES`: a JSON parse or millions of typed elements would freeze
        the loop for seconds), inline otherwise; a protocol violation is the caller's."""
        with caller_input():
            return await self._maybe_offload(size > OFFLOAD_BYTES, fn, *args)

    async def _maybe_offload(self, offload: bool, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn`` in the decode pool when ``offload``, inline otherwise (cheap work)."""
        if offload:
            return await self.decode_pool.run(fn, *args)
        return fn(*args)

    def _accepting(self) -> bool:
        return self._started and not self._draining

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Count a request as in flight (the drain waits for none to be)."""
        self._in_flight += 1
        if self._idle is not None:
            self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()


def _few_small_images(tensor: Tensor) -> bool:
    """Whether a BYTES input is small enough to read its headers on the loop."""
    items = tensor.data.reshape(-1)
    if len(items) > INLINE_IMAGES:
        return False
    # Anything else is refused by declared_input, wherever it runs.
    sizes = (memoryview(i).nbytes for i in items if isinstance(i, bytes | bytearray | memoryview))
    return sum(sizes) <= INLINE_IMAGE_BYTES


async def create_core(settings: Settings, metrics: GatewayMetrics | None = None) -> DataPlane:
    """A data plane over the backend ``settings.backend`` names; not started yet."""
    return DataPlane(settings, create_backend(settings), metrics)
