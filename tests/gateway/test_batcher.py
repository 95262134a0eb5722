"""The dynamic batcher keeps every rule its module lists (docs/architecture.md, "Dynamic
batching"), on a real event loop.

The batch function here is a small stand-in model (it doubles its input) that records each
batch it sees and can be held mid-batch, so the tests can arrange exactly what is queued
while a batch runs. Each caller's items carry their own values, so every result row shows
which caller it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from cnnserve.errors import (
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
)
from cnnserve.gateway.batcher import BatchFn, DynamicBatcher, PartialResults
from cnnserve.gateway.metrics import GatewayMetrics, ModelObserver

#: A batch delay no test could wait out: a request answered at all did not wait for it.
HOUR_S = 3600.0


class Doubler:
    """Batch function: returns ``2 × batch``; records batches; ``hold()`` blocks the next ones."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.entered = asyncio.Event()
        self._gate = asyncio.Event()
        self._gate.set()

    def hold(self) -> None:
        """Batches that start from now on wait for :meth:`release`."""
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        """Let held batches finish."""
        self._gate.set()

    @property
    def sizes(self) -> list[int]:
        """Items per batch, in order."""
        return [len(b) for b in self.batches]

    def saw(self, value: float) -> bool:
        """Whether any batch contained an item filled with ``value``."""
        return any((b == value).all(axis=tuple(range(1, b.ndim))).any() for b in self.batches)

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        self.entered.set()
        await self._gate.wait()
        return batch * 2


def items(value: float, count: int = 1, side: int = 2) -> np.ndarray:
    """``count`` items of shape ``3×side×side`` filled with ``value``."""
    return np.full((count, 3, side, side), value, dtype=np.float32)


@contextlib.asynccontextmanager
async def running(batcher: DynamicBatcher) -> AsyncIterator[DynamicBatcher]:
    """Start the batcher in this loop; stop it (answering leftovers) on the way out."""
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop(grace_s=5)


#: The metric labels of the test batcher's model.
M1 = {"model": "m", "version": "1"}


def make(
    fn: BatchFn,
    *,
    batch: int = 8,
    delay_ms: float = 5.0,
    queue: int = 64,
    adaptive: bool = True,
    observer: ModelObserver | None = None,
) -> DynamicBatcher:
    """A batcher with the test's limits (rule 8 remembers callers for an hour here)."""
    return DynamicBatcher(
        fn,
        max_batch_size=batch,
        max_batch_delay_ms=delay_ms,
        max_queue_size=queue,
        adaptive_delay=adaptive,
        peak_window_s=HOUR_S,
        observer=observer,
        name="m",
    )


async def test_concurrent_callers_share_batches_and_get_their_own_rows() -> None:
    model = Doubler()
    metrics = GatewayMetrics()
    async with running(make(model, batch=8, observer=metrics.observer("m", "1"))) as b:
        results = await asyncio.gather(*(b.submit(items(i)) for i in range(20)))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, items(i) * 2)
    assert sum(model.sizes) == 20
    assert max(model.sizes) > 1
    assert max(model.sizes) <= 8
    sample = metrics.registry.get_sample_value
    assert sample("cnnserve_batch_size_count", M1) == len(model.sizes)
    assert sample("cnnserve_batch_size_sum", M1) == 20
    assert sample("cnnserve_batch_size_bucket", {**M1, "le": "1.0"}) < len(model.sizes)
    assert sample("cnnserve_queue_seconds_count", M1) == 20
    assert sample("cnnserve_queue_depth", M1) == 0


async def test_uneven_multi_item_requests_split_and_merge() -> None:
    model = Doubler()
    async with running(make(model, batch=4, delay_ms=20)) as b:
        two, three, one = await asyncio.gather(
            b.submit(items(1, 2)), b.submit(items(2, 3)), b.submit(items(3, 1))
        )
    np.testing.assert_array_equal(two, items(1, 2) * 2)
    np.testing.assert_array_equal(three, items(2, 3) * 2)
    np.testing.assert_array_equal(one, items(3, 1) * 2)
    assert sum(model.sizes) == 6
    assert all(size <= 4 for size in model.sizes)


async def test_request_larger_than_max_batch_spans_batches() -> None:
    model = Doubler()
    forty = np.arange(40 * 12, dtype=np.float32).reshape(40, 3, 2, 2)
    async with running(make(model, batch=32, queue=64)) as b:
        result = await b.submit(forty)
    np.testing.assert_array_equal(result, forty * 2)
    assert model.sizes == [32, 8]


async def test_cancelled_callers_never_strand_the_others() -> None:
    model = Doubler()
    metrics = GatewayMetrics()
    async with running(make(model, batch=8, delay_ms=0, observer=metrics.observer("m", "1"))) as b:
        model.hold()
        in_batch = asyncio.create_task(b.submit(items(1)))
        survivor = asyncio.create_task(b.submit(items(2)))
        await model.entered.wait()
        # One caller leaves mid-batch, another while still queued behind the running batch.
        queued = asyncio.create_task(b.submit(items(3)))
        after = asyncio.create_task(b.submit(items(4)))
        await asyncio.sleep(0)
        in_batch.cancel()
        queued.cancel()
        model.release()
        np.testing.assert_array_equal(await survivor, items(2) * 2)
        np.testing.assert_array_equal(await after, items(4) * 2)
        with pytest.raises(asyncio.CancelledError):
            await in_batch
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert metrics.registry.get_sample_value("cnnserve_queue_depth", M1) == 0
    assert not model.saw(3), "a cancelled, still-queued request reached the model"


@contextlib.asynccontextmanager
async def behind_a_held_batch(
    model: Doubler, metrics: GatewayMetrics
) -> AsyncIterator[DynamicBatcher]:
    """A running batcher (no delay, observed as model "m" v1) whose model holds one batch, so
    requests submitted now stay queued; on the way out the batch is let go and answered."""
    async with running(make(model, delay_ms=0, observer=metrics.observer("m", "1"))) as b:
        model.hold()
        busy = asyncio.create_task(b.submit(items(1)))
        await model.entered.wait()
        yield b
        model.release()
        await busy


async def test_expired_request_never_reaches_the_model() -> None:
    model = Doubler()
    metrics = GatewayMetrics()
    async with behind_a_held_batch(model, metrics) as b:
        late = asyncio.create_task(b.submit(items(7), deadline=time.monotonic() + 0.05))
        with pytest.raises(DeadlineExceededError, match="deadline exceeded"):
            await late
        model.release()
        with pytest.raises(DeadlineExceededError, match="before the request was queued"):
            await b.submit(items(8), deadline=time.monotonic() - 1)
        np.testing.assert_array_equal(await b.submit(items(9)), items(9) * 2)
    assert not model.saw(7)
    assert not model.saw(8)
    expired = metrics.registry.get_sample_value("cnnserve_expired_before_compute_total", M1)
    assert expired == 2


async def test_a_call_cancelled_at_its_deadline_counts_as_expired() -> None:
    """gRPC may cancel a call at its deadline before the batcher's own timer fires: the
    request is still dropped unseen and counted as expired, not merely cancelled."""
    model = Doubler()
    metrics = GatewayMetrics()
    async with behind_a_held_batch(model, metrics) as b:
        late = asyncio.create_task(b.submit(items(7), deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0)  # queued
        time.sleep(0.1)  # the deadline passes while the loop is busy ...
        late.cancel()  # ... and the transport's cancellation is handled before the timer
        with pytest.raises(asyncio.CancelledError):
            await late
    assert not model.saw(7)
    expired = metrics.registry.get_sample_value("cnnserve_expired_before_compute_total", M1)
    assert expired == 1


async def test_a_call_cancelled_just_after_its_timer_fired_counts_once() -> None:
    """The other order: the batcher's timer fails the request and, before the caller's task
    resumes, the transport cancels the call at the same deadline. One expired request, counted
    once (it was counted twice: an operator saw more expirations than requests)."""
    model = Doubler()
    metrics = GatewayMetrics()
    async with behind_a_held_batch(model, metrics) as b:
        deadline = time.monotonic() + 0.05
        late = asyncio.create_task(b.submit(items(7), deadline=deadline))
        await asyncio.sleep(0)  # queued, its timer set for the deadline
        # Due just after the timer: both run in the same pass of the loop, the timer first,
        # so the cancellation lands before the task wakes to the timer's exception.
        asyncio.get_running_loop().call_at(deadline + 0.001, late.cancel)
        time.sleep(0.1)  # both come due while the loop is busy
        with pytest.raises((asyncio.CancelledError, DeadlineExceededError)):
            await late
    assert not model.saw(7)
    expired = metrics.registry.get_sample_value("cnnserve_expired_before_compute_total", M1)
    assert expired == 1


async def test_full_queue_answers_overloaded_at_once() -> None:
    model = Doubler()
    metrics = GatewayMetrics()
    observer = metrics.observer("m", "1")
    async with running(make(model, batch=1, delay_ms=0, queue=4, observer=observer)) as b:
        model.hold()
        busy = asyncio.create_task(b.submit(items(1)))
        await model.entered.wait()
        queued = asyncio.create_task(b.submit(items(2, 4)))
        await asyncio.sleep(0)
        assert metrics.registry.get_sample_value("cnnserve_queue_depth", M1) == 4
        # While the model is held, only an immediate answer can arrive within the timeout.
        with pytest.raises(OverloadedError, match="4 of 4 items queued"):
            await asyncio.wait_for(b.submit(items(3)), timeout=5)
        model.release()
        np.testing.assert_array_equal(await queued, items(2, 4) * 2)
        await busy
        # A request that could never fit is told so, rather than to retry.
        with pytest.raises(PayloadTooLargeError, match="queue holds at most 4"):
            await b.submit(items(5, 5))
    assert not model.saw(3)
    assert not model.saw(5)


async def test_failing_batch_fails_only_its_requests_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures = {"next": RuntimeError("boom: secret internals")}

    async def flaky(batch: np.ndarray) -> np.ndarray:
        exc = failures.pop("next", None)
        if exc is not None:
            raise exc
        return batch * 2

    async with running(make(flaky, delay_ms=10)) as b:
        with caplog.at_level(logging.ERROR, logger="cnnserve.gateway.batcher"):
            first = await asyncio.gather(
                b.submit(items(1)), b.submit(items(2, 2)), return_exceptions=True
            )
        for outcome in first:
            assert type(outcome) is CnnserveError
            assert str(outcome) == GENERIC_INTERNAL_MESSAGE
        assert "boom: secret internals" in caplog.text  # logged with its traceback, not shown
        failures["next"] = InvalidInputError("bad item")
        with pytest.raises(InvalidInputError, match="bad item"):
            await b.submit(items(3))
        np.testing.assert_array_equal(await b.submit(items(4)), items(4) * 2)


async def test_wrong_length_result_is_detected(caplog: pytest.LogCaptureFixture) -> None:
    async def drops_a_row(batch: np.ndarray) -> np.ndarray:
        return batch[:-1] * 2

    async with running(make(drops_a_row, delay_ms=10)) as b:
        with caplog.at_level(logging.ERROR, logger="cnnserve.gateway.batcher"):
            outcomes = await asyncio.gather(
                b.submit(items(1, 2)), b.submit(items(2)), return_exceptions=True
            )
    assert all(type(o) is CnnserveError for o in outcomes)
    assert "returned 2 rows for 3 items" in caplog.text


async def test_delay_zero_still_batches_what_queued_while_busy() -> None:
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=0)) as b:
        model.hold()
        first = asyncio.create_task(b.submit(items(0)))
        await model.entered.wait()
        rest = [asyncio.create_task(b.submit(items(i))) for i in range(1, 6)]
        await asyncio.sleep(0)
        model.release()
        await first
        for i, task in enumerate(rest, start=1):
            np.testing.assert_array_equal(await task, items(i) * 2)
    assert model.sizes == [1, 5]


async def test_shapes_are_never_mixed_in_one_batch() -> None:
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=10)) as b:
        small = [b.submit(items(i, side=8)) for i in range(3)]
        large = [b.submit(items(10 + i, 2, side=9)) for i in range(3)]
        results = await asyncio.gather(*small, *large)
    for i, result in enumerate(results[:3]):
        np.testing.assert_array_equal(result, items(i, side=8) * 2)
    for i, result in enumerate(results[3:]):
        np.testing.assert_array_equal(result, items(10 + i, 2, side=9) * 2)
    assert sorted(b.shape[2] for b in model.batches) == [8, 9]


async def test_sync_batch_function_runs_off_the_event_loop() -> None:
    threads: list[int] = []

    def blocking(batch: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return batch + 1

    async with running(make(blocking)) as b:
        result = await b.submit(items(1, 3))
    np.testing.assert_array_equal(result, items(2, 3))
    assert threads
    assert threading.get_ident() not in threads


async def test_stop_drains_queued_requests_then_refuses_new_ones() -> None:
    model = Doubler()
    b = make(model, batch=2, delay_ms=0)
    b.start()
    model.hold()
    tasks = [asyncio.create_task(b.submit(items(i))) for i in range(5)]
    await model.entered.wait()
    stopping = asyncio.create_task(b.stop(grace_s=None))
    await asyncio.sleep(0)
    with pytest.raises(UnavailableError, match="not accepting"):
        await b.submit(items(9))
    model.release()
    await stopping
    for i, task in enumerate(tasks):
        np.testing.assert_array_equal(await task, items(i) * 2)
    assert sum(model.sizes) == 5


async def test_stop_after_grace_answers_leftovers_unavailable() -> None:
    model = Doubler()
    b = make(model, batch=1, delay_ms=0)
    b.start()
    model.hold()
    running_one = asyncio.create_task(b.submit(items(1)))
    await model.entered.wait()
    queued = asyncio.create_task(b.submit(items(2)))
    await asyncio.sleep(0)
    await b.stop(grace_s=0)
    with pytest.raises(UnavailableError, match="mid-batch"):
        await running_one
    with pytest.raises(UnavailableError, match="shut down before running it"):
        await queued
    assert not model.saw(2)


async def test_submit_before_start_is_unavailable() -> None:
    with pytest.raises(UnavailableError):
        await make(Doubler()).submit(items(1))


async def test_a_lone_caller_never_waits_out_the_delay() -> None:
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=HOUR_S * 1000)) as b:
        for value in range(3):
            np.testing.assert_array_equal(await b.submit(items(value)), items(value) * 2)
    assert model.sizes == [1, 1, 1]


async def test_adaptive_delay_waits_for_every_recent_caller() -> None:
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=HOUR_S * 1000)) as b:
        # Four callers at once: all of them queued, so the batch goes without waiting.
        await asyncio.gather(*(b.submit(items(i)) for i in range(4)))
        # The same four come back one by one; the batch waits until the last has arrived.
        first = asyncio.create_task(b.submit(items(10)))
        await asyncio.sleep(0.05)
        assert not first.done()
        rest = [asyncio.create_task(b.submit(items(11 + i))) for i in range(3)]
        for i, task in enumerate([first, *rest]):
            np.testing.assert_array_equal(await task, items(10 + i) * 2)
    assert model.sizes == [4, 4]


async def test_without_adaptive_delay_a_lone_caller_waits_for_company() -> None:
    model = Doubler()
    async with running(make(model, batch=2, delay_ms=HOUR_S * 1000, adaptive=False)) as b:
        first = asyncio.create_task(b.submit(items(1)))
        await asyncio.sleep(0.05)
        assert not first.done()
        second = await b.submit(items(2))  # fills the batch, which then goes at once
        np.testing.assert_array_equal(await first, items(1) * 2)
        np.testing.assert_array_equal(second, items(2) * 2)
    assert model.sizes == [2]


async def test_dtypes_are_never_mixed_in_one_batch() -> None:
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=10)) as b:
        pixels = np.full((2, 3, 2, 2), 7, dtype=np.uint8)
        floats = items(3, 2)
        got_pixels, got_floats = await asyncio.gather(b.submit(pixels), b.submit(floats))
    np.testing.assert_array_equal(got_pixels, pixels * 2)
    assert got_pixels.dtype == np.uint8
    np.testing.assert_array_equal(got_floats, floats * 2)
    assert sorted(str(batch.dtype) for batch in model.batches) == ["float32", "uint8"]


async def test_keys_keep_equal_shapes_apart() -> None:
    # Encoded images are all one shape (N objects); the key carries their declared size.
    model = Doubler()
    async with running(make(model, batch=8, delay_ms=10)) as b:
        results = await asyncio.gather(
            b.submit(items(1, 2), key=(3, 8, 8)),
            b.submit(items(2, 3), key=(3, 9, 9)),
            b.submit(items(3), key=(3, 8, 8)),
        )
    for value, count, result in zip((1, 2, 3), (2, 3, 1), results, strict=True):
        np.testing.assert_array_equal(result, items(value, count) * 2)
    assert sorted(model.sizes) == [3, 3]
    assert any(set(np.unique(batch).tolist()) == {1.0, 3.0} for batch in model.batches)
    assert any(set(np.unique(batch).tolist()) == {2.0} for batch in model.batches)


class FailsValues(Doubler):
    """Doubles its batch, but answers the items filled with any of ``failing`` as failed."""

    def __init__(self, *failing: float) -> None:
        super().__init__()
        self.failing = failing

    async def __call__(self, batch: np.ndarray) -> PartialResults:  # type: ignore[override]
        rows = await super().__call__(batch)
        failures: dict[int, CnnserveError] = {
            index: InvalidInputError(f"could not decode image: value {batch[index].flat[0]:g}")
            for index in range(len(batch))
            if batch[index].flat[0] in self.failing
        }
        return PartialResults(rows, failures, "image")


async def test_partial_results_fail_only_the_owners_of_failed_items() -> None:
    # Callers of 2, 3 and 1 items share one batch; the second item of the three-item caller
    # and the only item of the last fail.
    model = FailsValues(-2.0, -3.0)
    three = np.concatenate([items(2), items(-2), items(2)])
    async with running(make(model, batch=8, delay_ms=20)) as b:
        two, failed_middle, failed_only = await asyncio.gather(
            b.submit(items(1, 2)),
            b.submit(three),
            b.submit(items(-3)),
            return_exceptions=True,
        )
        # The batcher goes on serving.
        after = await b.submit(items(4, 3))
    assert model.sizes[0] == 6
    assert isinstance(two, np.ndarray)
    np.testing.assert_array_equal(two, items(1, 2) * 2)
    assert isinstance(failed_middle, InvalidInputError)
    assert str(failed_middle) == "image 1: could not decode image: value -2"
    assert isinstance(failed_only, InvalidInputError)
    assert str(failed_only) == "image 0: could not decode image: value -3"
    np.testing.assert_array_equal(after, items(4, 3) * 2)


async def test_a_failure_in_a_later_batch_names_the_item_in_its_request() -> None:
    # Ten items over batches of four: item 9 (the second of the third batch) fails.
    model = FailsValues(9.0)
    ten = np.concatenate([items(i) for i in range(10)])
    async with running(make(model, batch=4, queue=16)) as b:
        with pytest.raises(InvalidInputError, match=r"^image 9: could not decode image"):
            await b.submit(ten)
    assert model.sizes == [4, 4, 2]


async def test_partial_results_naming_items_outside_the_batch_are_detected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails_an_item_it_never_had(batch: np.ndarray) -> PartialResults:
        return PartialResults(batch * 2, {len(batch): InvalidInputError("no such item")})

    async with running(make(fails_an_item_it_never_had, delay_ms=10)) as b:
        with caplog.at_level(logging.ERROR, logger="cnnserve.gateway.batcher"):
            outcomes = await asyncio.gather(
                b.submit(items(1, 2)), b.submit(items(2)), return_exceptions=True
            )
    assert all(type(o) is CnnserveError for o in outcomes)
    assert "failed items [3] of a batch of 3" in caplog.text
