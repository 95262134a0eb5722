"""Dynamic batching: many small requests become few backend-sized batches.

One :class:`DynamicBatcher` serves one model. Requests wait in a bounded queue, grouped by
dtype, item shape, the caller's ``key`` (an FCN batch never mixes H×W, even of images
still encoded) and the feature maps they ask for (``layers``: those batches run the
``feature_fn``, and plain batches never carry their extra work), and one background task
forms batches
of up to ``max_batch_size`` items and runs them one at a time. It keeps these rules
(explained, with the settings behind them, in docs/architecture.md, "Dynamic batching";
each is tested in tests/gateway/test_batcher.py):

1. the batch function's result length is checked against the batch; a batch function may
   answer :class:`PartialResults`, and then only the requests owning failed items fail;
2. only pending futures are resolved, and cancelled requests are dropped before a batch forms;
3. deadlines are absolute ``time.monotonic()`` values; an expired request never reaches the model;
4. the queue is bounded in items and a full queue answers at once;
5. loop-bound objects are created in :meth:`start`, inside the running loop; the task is owned,
   stopped by :meth:`stop`, and survives exceptions from the batch function;
6. a synchronous batch function runs in a worker thread, never on the event loop;
7. with ``max_batch_delay_ms = 0`` a busy model still batches what queued while it ran;
8. the delay is only spent when it can pay off (``adaptive_delay``): a partial batch goes at once
   when every caller seen recently is already waiting in the queue. A lone caller (concurrency
   1) never waits for company that cannot come, while concurrent callers still meet in one
   batch — the delay bounds the wait for the ones still on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from cnnserve import tracing
from cnnserve.errors import (
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialResults:
    """A batch function's answer when some items failed on their own (an image that did not
    decode where the batch ran): ``rows`` has a row for every item of the batch (a failed
    item's row is a placeholder), ``failures`` each failed item's error by its index in the
    batch. Only the requests those items belong to fail; the others get their rows."""

    rows: np.ndarray
    failures: Mapping[int, CnnserveError]
    #: How a caller's error names the failed item, with its index in the caller's request:
    #: ``image 2: could not decode image: ...``.
    item_noun: str = "item"


#: What a batch function answers: N rows, or N rows with some items failed.
BatchAnswer = np.ndarray | PartialResults
AsyncBatchFn = Callable[[np.ndarray], Awaitable[BatchAnswer]]
SyncBatchFn = Callable[[np.ndarray], BatchAnswer]
#: ``N×…`` array in, array with the same N out; async, or sync (then run in a worker thread).
BatchFn = AsyncBatchFn | SyncBatchFn
#: A batch and the feature maps its requests asked for → N rows of output and maps
#: (:func:`cnnserve.models.features.pack_rows`).
FeatureBatchFn = Callable[[np.ndarray, tuple[str, ...]], Awaitable[BatchAnswer]]

#: Items share a batch only when their dtype and item shape agree (``("<f4", 3, 28, 28)``).
ShapeKey = tuple[str | int, ...]
#: Rule 8 remembers the peak of outstanding requests over the last one to two windows of this
#: length, so a drop in load is noticed within half a second.
PEAK_WINDOW_S = 0.25


class BatchObserver(Protocol):
    """Hooks the batcher calls: ``metrics.ModelObserver`` (Prometheus) and
    ``statistics.StatisticsRecorder`` (Triton's statistics) implement them."""

    def queue_changed(self, delta: int) -> None:
        """Items were added to (positive) or taken from (negative) the queue."""

    def request_dequeued(self, waited_s: float) -> None:
        """A request's first items left the queue after waiting ``waited_s``."""

    def batch_done(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A batch of ``size`` items ran: its items were joined in ``input_s``, the batch
        function took ``infer_s``, and the rows were handed out in ``output_s``."""

    def request_computed(self, infer_s: float) -> None:
        """A request has all its rows; the batches its items ran in took ``infer_s``."""

    def request_expired(self) -> None:
        """A request's deadline passed before any of it was computed."""


@dataclass
class ModelTime:
    """Filled in when a request submitted with it has all its rows: the batch-function time
    of the batches its items ran in (so a caller can count it with the request's other
    timings, at the moment the request ends), how long its items queued before the first
    of them went into a batch, and the largest batch they ran in (the access log's)."""

    seconds: float = 0.0
    queue_s: float = 0.0
    batch_size: int = 0


class Observers:
    """Several observers as one: each hook calls every one of them, in order."""

    def __init__(self, *observers: BatchObserver) -> None:
        self._observers = observers

    def queue_changed(self, delta: int) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.queue_changed(delta)

    def request_dequeued(self, waited_s: float) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.request_dequeued(waited_s)

    def batch_done(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.batch_done(size, input_s, infer_s, output_s)

    def request_computed(self, infer_s: float) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.request_computed(infer_s)

    def request_expired(self) -> None:
        """Forward to every observer."""
        for observer in self._observers:
            observer.request_expired()


def _as_async(batch_fn: BatchFn) -> AsyncBatchFn:
    """The batch function as a coroutine function; a sync one runs in a worker thread."""
    # An object with ``async def __call__`` is a coroutine function too.
    if inspect.iscoroutinefunction(batch_fn) or inspect.iscoroutinefunction(
        type(batch_fn).__call__
    ):
        return cast(AsyncBatchFn, batch_fn)
    sync_fn = cast(SyncBatchFn, batch_fn)

    async def in_thread(batch: np.ndarray) -> BatchAnswer:
        # Model code must never block the event loop.
        return await asyncio.to_thread(sync_fn, batch)

    return in_thread


class BatchResultError(Exception):
    """The batch function broke its contract (wrong type or number of rows)."""


@dataclass(eq=False)
class _Request:
    """One caller's items on their way through the queue, possibly over several batches."""

    items: np.ndarray
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    enqueued_at: float
    #: Dtype, item shape and the submitter's key; only requests with equal keys share a batch.
    key: ShapeKey
    #: The feature maps the request asks for (part of ``key`` too); none: a plain request.
    layers: tuple[str, ...] = ()
    #: Items handed to batches so far (or written off when the request ended early).
    taken: int = 0
    #: Whether any of its items went into a batch (so it was not merely expired).
    started: bool = False
    #: Result rows received so far, in order: a request's slices run in queue order.
    parts: list[np.ndarray] = field(default_factory=list)
    received: int = 0
    #: Batch-function time of the batches its items ran in, so far.
    infer_s: float = 0.0
    #: Where the caller wants that time once every row is there.
    model_time: ModelTime | None = None
    #: The largest batch its items ran in, so far.
    batch_size: int = 0
    #: Its trace context while tracing is on (its queue wait and batch spans' parent).
    trace: tracing.Queued | None = None

    @property
    def pending(self) -> int:
        """Items still waiting to be put into a batch."""
        return len(self.items) - self.taken


@dataclass(frozen=True)
class _Slice:
    """Rows ``start:stop`` of one request, placed in a batch."""

    request: _Request
    start: int
    stop: int


class DynamicBatcher:
    """Batches one model's requests; see the module docstring for the rules it keeps."""

    def __init__(
        self,
        batch_fn: BatchFn,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_queue_size: int,
        adaptive_delay: bool = True,
        peak_window_s: float = PEAK_WINDOW_S,
        observer: BatchObserver | None = None,
        name: str = "model",
        feature_fn: FeatureBatchFn | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_batch_delay_ms < 0:
            raise ValueError("need max_batch_size ≥ 1, max_queue_size ≥ 1, max_batch_delay_ms ≥ 0")
        self._fn = _as_async(batch_fn)
        self._feature_fn = feature_fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self._delay_s = max_batch_delay_ms / 1000.0
        self._adaptive = adaptive_delay
        # Rule 8: requests submitted and not yet answered, and their recent peak.
        self._outstanding = 0
        self._peak = _WindowedPeak(peak_window_s)
        self._observer: BatchObserver = observer or Observers()
        self._groups: dict[ShapeKey, deque[_Request]] = {}
        self._group_items: dict[ShapeKey, int] = {}
        self._queued = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """Started, not stopped, and its background task alive."""
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        """Start the background task; call from inside the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        loop = asyncio.get_running_loop()
        self._closing = False
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._serve(), name=f"batcher:{self.name}")

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let queued ones run for up to ``grace_s`` (None: no limit).

        Whatever has not run when the grace period ends is answered UNAVAILABLE.
        """
        task = self._task
        if task is None or self._wakeup is None:
            return
        self._closing = True
        self._wakeup.set()
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue in self._groups.values():
            for request in queue:
                self._finish(request, UnavailableError(f"{self.name} shut down before running it"))
        self._groups.clear()
        self._group_items.clear()
        self._task = None

    def check_room(self, count: int) -> None:
        """Raise now if ``count`` items cannot be queued: :class:`PayloadTooLargeError` when
        they exceed the whole queue, :class:`OverloadedError` when it is too full for them.

        :meth:`submit` checks this too; callers check it first to refuse a request before
        preparing its items (decoding images) when the queue is full anyway.
        """
        if count > self.max_queue_size:
            raise PayloadTooLargeError(
                f"request has {count} items; {self.name}'s queue holds at most "
                f"{self.max_queue_size}"
            )
        if self._queued + count > self.max_queue_size:
            raise OverloadedError(
                f"{self.name} is overloaded: {self._queued} of {self.max_queue_size} items "
                "queued; retry later"
            )

    async def submit(
        self,
        items: np.ndarray,
        deadline: float | None = None,
        model_time: ModelTime | None = None,
        key: ShapeKey = (),
        layers: tuple[str, ...] = (),
    ) -> np.ndarray:
        """Queue ``items`` (``N×…``) and return the batch function's N result rows for them;
        ``model_time``, when given, receives the batch-function time they took. With
        ``layers`` (feature maps) their batch runs the feature function, and the rows hold
        the output and those maps.

        Items share a batch only with items of the same dtype, item shape, ``key`` — what
        the items' shape cannot say, as the size of encoded images — and ``layers``.

        Raises :class:`OverloadedError` at once when the queue has no room,
        :class:`DeadlineExceededError` when ``deadline`` (``time.monotonic()``) passes first,
        :class:`UnavailableError` when the batcher is not running, and whatever the batch
        function's failure maps to (unknown exceptions become a generic INTERNAL error).
        """
        if not self.running or self._wakeup is None:
            raise UnavailableError(f"{self.name} is not accepting requests")
        count = len(items)
        if count == 0:
            raise InvalidInputError("request has no items (N = 0)")
        if layers and self._feature_fn is None:
            raise InvalidInputError(f"{self.name} computes no feature maps")
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._observer.request_expired()
            raise DeadlineExceededError("deadline passed before the request was queued")
        self.check_room(count)
        group: ShapeKey = (items.dtype.str, *items.shape[1:], *key)
        if layers:
            group = (*group, "features:" + ",".join(layers))
        request = _Request(
            items, asyncio.get_running_loop().create_future(), deadline, now, group, layers
        )
        request.model_time = model_time
        request.trace = tracing.queued()
        # However the future ends (result, error, caller cancelled), its queue room frees up.
        request.future.add_done_callback(lambda _: self._answered(request))
        self._outstanding += 1
        self._peak.observe(self._outstanding, now)
        self._groups.setdefault(request.key, deque()).append(request)
        self._count_queued(request.key, count)
        self._wakeup.set()
        if deadline is None:
            return await request.future
        # One timer per request (cheaper than wait_for's extra future and callbacks): when it
        # fires first, the request fails and its queue room frees up.
        timer = asyncio.get_running_loop().call_later(
            deadline - time.monotonic(), self._expire, request
        )
        try:
            return await request.future
        except asyncio.CancelledError:
            # The transport may end the call at the same deadline first (gRPC does): still
            # a request that expired before it was computed — unless the timer already failed
            # it (and counted it) before this task woke: then the future holds that failure
            # rather than the cancellation.
            if request.future.cancelled() and not request.started and time.monotonic() >= deadline:
                self._observer.request_expired()
            raise
        finally:
            timer.cancel()

    def _expire(self, request: _Request) -> None:
        """The request's deadline passed before its answer: fail it (never computed if it
        had not started)."""
        if request.future.done():
            return
        if not request.started:
            self._observer.request_expired()
        waited_ms = (time.monotonic() - request.enqueued_at) * 1000
        request.future.set_exception(
            DeadlineExceededError(
                f"deadline exceeded after {waited_ms:.0f} ms waiting for {self.name}"
            )
        )

    # --- the background task ---

    async def _serve(self) -> None:
        while True:
            try:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug here must not silently stop batching for every later caller.
                logger.exception("batcher %s: unexpected error; continuing", self.name)

    async def _next_batch(self) -> list[_Slice] | None:
        """Wait until a group is full or its oldest request has waited the delay; take it."""
        assert self._wakeup is not None
        while True:
            now = time.monotonic()
            chosen, flush_at = self._choose_group()
            if chosen is None:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if flush_at > now and not self._closing and not self._everyone_waits(now):
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), flush_at - now)
                continue
            batch = self._take(chosen, now)
            if batch:
                return batch

    def _choose_group(self) -> tuple[ShapeKey | None, float]:
        """The group to run next (a full one, else the oldest head) and when to flush it."""
        chosen: ShapeKey | None = None
        flush_at = math.inf
        for key in list(self._groups):
            head = self._prune(key)
            if head is None:
                continue
            if self._group_items[key] >= self.max_batch_size:
                return key, -math.inf
            if head.enqueued_at + self._delay_s < flush_at:
                chosen, flush_at = key, head.enqueued_at + self._delay_s
        return chosen, flush_at

    def _everyone_waits(self, now: float) -> bool:
        """Rule 8: no batch runs now, so every outstanding request is queued; when they are as
        many as the recent peak, waiting longer would only add latency."""
        return self._adaptive and self._outstanding >= self._peak.value(now)

    def _prune(self, key: ShapeKey) -> _Request | None:
        """Drop finished requests from the head of a group; delete the group when empty."""
        queue = self._groups[key]
        while queue and queue[0].future.done():
            self._release(queue.popleft())
        if queue:
            return queue[0]
        del self._groups[key]
        del self._group_items[key]
        return None

    def _take(self, key: ShapeKey, now: float) -> list[_Slice]:
        """Up to ``max_batch_size`` items from one group, expired and cancelled ones skipped."""
        queue = self._groups[key]
        batch: list[_Slice] = []
        size = 0
        while queue and size < self.max_batch_size:
            request = queue[0]
            if request.future.done():
                self._release(queue.popleft())
                continue
            if request.deadline is not None and request.deadline <= now:
                queue.popleft()
                if not request.started:
                    self._observer.request_expired()
                self._finish(request, DeadlineExceededError("deadline passed while queued"))
                continue
            count = min(request.pending, self.max_batch_size - size)
            if not request.started:
                request.started = True
                self._observer.request_dequeued(now - request.enqueued_at)
                if request.model_time is not None:
                    request.model_time.queue_s = now - request.enqueued_at
                tracing.dequeued(request.trace, self.name)
            batch.append(_Slice(request, request.taken, request.taken + count))
            request.taken += count
            size += count
            self._count_queued(key, -count)
            if request.pending == 0:
                queue.popleft()
        self._prune(key)
        return batch

    async def _run(self, batch: list[_Slice]) -> None:
        """Run one batch and hand each request its rows (or the batch's error)."""
        started = time.monotonic()
        parts = [s.request.items[s.start : s.stop] for s in batch]
        inputs = parts[0] if len(parts) == 1 else np.concatenate(parts)
        joined = time.monotonic()
        layers = batch[0].request.layers
        try:
            with tracing.batch_span(self.name, [s.request.trace for s in batch], len(inputs)):
                if layers and self._feature_fn is not None:
                    answer = await self._feature_fn(inputs, layers)
                else:
                    answer = await self._fn(inputs)
            partial = answer if isinstance(answer, PartialResults) else None
            outputs = answer.rows if isinstance(answer, PartialResults) else answer
            if not isinstance(outputs, np.ndarray) or outputs.ndim == 0:
                raise BatchResultError(
                    f"batch function returned {type(outputs).__name__}, not an array"
                )
            if len(outputs) != len(inputs):
                raise BatchResultError(
                    f"batch function returned {len(outputs)} rows for {len(inputs)} items"
                )
            if partial is not None and not all(0 <= i < len(inputs) for i in partial.failures):
                raise BatchResultError(
                    f"batch function failed items {sorted(partial.failures)} of a batch of "
                    f"{len(inputs)}"
                )
        except asyncio.CancelledError:
            for s in batch:
                self._finish(s.request, UnavailableError(f"{self.name} shut down mid-batch"))
            raise
        except Exception as exc:
            self._fail(batch, exc)
            return
        ran = time.monotonic()
        offset = 0
        for s in batch:
            rows = s.stop - s.start
            s.request.infer_s += ran - joined
            s.request.batch_size = max(s.request.batch_size, len(inputs))
            failed = _first_failure(partial, offset, offset + rows)
            if failed is None:
                self._deliver(s.request, outputs[offset : offset + rows])
            else:
                assert partial is not None
                index, error = failed
                # The item's index in its caller's request, not in the batch.
                where = f"{partial.item_noun} {s.start + index - offset}"
                self._finish(s.request, type(error)(f"{where}: {error}"))
            offset += rows
        self._observer.batch_done(
            len(inputs), joined - started, ran - joined, time.monotonic() - ran
        )

    def _fail(self, batch: list[_Slice], exc: Exception) -> None:
        """Answer every request of a failed batch; unknown errors are logged, never shown."""
        if not isinstance(exc, CnnserveError):
            logger.error(
                "batcher %s: batch of %d items failed",
                self.name,
                sum(s.stop - s.start for s in batch),
                exc_info=exc,
            )
        for s in batch:
            # A fresh exception per caller: one instance raised in many tasks tangles tracebacks.
            if isinstance(exc, CnnserveError):
                self._finish(s.request, type(exc)(*exc.args))
            else:
                self._finish(s.request, CnnserveError(GENERIC_INTERNAL_MESSAGE))

    def _deliver(self, request: _Request, rows: np.ndarray) -> None:
        if request.future.done():  # cancelled, expired or failed by an earlier batch
            return
        request.parts.append(rows)
        request.received += len(rows)
        if request.received == len(request.items):
            parts = request.parts
            request.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))
            if request.model_time is not None:
                request.model_time.seconds = request.infer_s
                request.model_time.batch_size = request.batch_size
            self._observer.request_computed(request.infer_s)

    # --- queue accounting ---

    def _answered(self, request: _Request) -> None:
        """The request's future is done (result, error or cancelled)."""
        self._outstanding -= 1
        self._release(request)

    def _finish(self, request: _Request, exc: CnnserveError) -> None:
        if not request.future.done():
            request.future.set_exception(exc)
        self._release(request)

    def _release(self, request: _Request) -> None:
        """Give back the queue room of a request's untaken items (idempotent)."""
        if request.pending:
            count = request.pending
            request.taken = len(request.items)
            self._count_queued(request.key, -count)

    def _count_queued(self, key: ShapeKey, delta: int) -> None:
        self._group_items[key] = self._group_items.get(key, 0) + delta
        self._queued += delta
        self._observer.queue_changed(delta)


def _first_failure(
    partial: PartialResults | None, start: int, stop: int
) -> tuple[int, CnnserveError] | None:
    """The first failed item among batch rows ``start:stop``, with its error."""
    if partial is None:
        return None
    failed = [i for i in partial.failures if start <= i < stop]
    return (min(failed), partial.failures[min(failed)]) if failed else None


class _WindowedPeak:
    """The largest value observed during the current and the previous time window."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._window_start = -math.inf
        self._current = 0
        self._previous = 0

    def _roll(self, now: float) -> None:
        elapsed = now - self._window_start
        if elapsed >= self._window_s:
            # One window later the current peak becomes the previous; two later, both expire.
            self._previous = self._current if elapsed < 2 * self._window_s else 0
            self._current = 0
            self._window_start = now

    def observe(self, value: int, now: float) -> None:
        """Record ``value`` at time ``now``."""
        self._roll(now)
        self._current = max(self._current, value)

    def value(self, now: float) -> int:
        """The peak over the last one to two windows."""
        self._roll(now)
        return max(self._current, self._previous)
