"""Per-version statistics with Triton's fields, as the batcher and the data plane record them:
counts and times of what really happened (a real event loop, batcher and exported models)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError, UnknownModelError
from cnnserve.gateway.batcher import DynamicBatcher, ModelTime
from cnnserve.gateway.dataplane import create_core
from cnnserve.gateway.statistics import Duration, StatisticsRecorder
from cnnserve.protocol.domain import InferRequest, Tensor
from tests.gateway.harness import gateway_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: How long the test batch function takes per batch.
BATCH_S = 0.05


async def test_the_batcher_records_batches_and_each_request_s_model_time() -> None:
    """A request split over two batches gets both batches' time, once it has all its rows;
    the per-request compute counts wait for the data plane (they move together)."""
    stats = StatisticsRecorder("m", "1")

    async def slow_double(batch: np.ndarray) -> np.ndarray:
        await asyncio.sleep(BATCH_S)
        return batch * 2

    batcher = DynamicBatcher(
        slow_double, max_batch_size=4, max_batch_delay_ms=20, max_queue_size=16, observer=stats
    )
    batcher.start()
    try:
        first_time, second_time = ModelTime(), ModelTime()
        first, second = await asyncio.gather(
            batcher.submit(np.ones((3, 2), np.float32), model_time=first_time),
            batcher.submit(np.ones((2, 2), np.float32), model_time=second_time),
        )
    finally:
        await batcher.stop()
    assert (len(first), len(second)) == (3, 2)
    snapshot = stats.snapshot()
    assert snapshot.execution_count == 2
    assert [(b.batch_size, b.compute_infer.count) for b in snapshot.batch_stats] == [(1, 1), (4, 1)]
    for batch in snapshot.batch_stats:
        assert batch.compute_infer.ns >= BATCH_S * 1e9
        assert batch.compute_input.count == batch.compute_output.count == 1
    assert snapshot.queue.count == 2
    # The first request ran in one batch, the second in both.
    assert BATCH_S <= first_time.seconds < second_time.seconds
    assert second_time.seconds >= 2 * BATCH_S
    assert snapshot.compute_infer == snapshot.compute_input == Duration()
    # Answers are the data plane's to count.
    assert (snapshot.success, snapshot.fail, snapshot.inference_count) == (
        Duration(),
        Duration(),
        0,
    )


async def test_the_data_plane_counts_requests_items_and_times(model_repository: Path) -> None:
    core = await create_core(gateway_settings(model_repository, max_batch_delay_ms=20))
    await core.start()
    before_ms = time.time_ns() // 1_000_000
    try:
        batches = [np.zeros((n, 3, 28, 28), np.float32) for n in (1, 2, 3)]
        requests = [InferRequest("convnet", [Tensor("input", "FP32", x.shape, x)]) for x in batches]
        await asyncio.gather(*(core.infer(r) for r in requests))
        bad = np.zeros((1, 3, 9, 9), np.float32)
        with pytest.raises(InvalidInputError):
            await core.infer(InferRequest("convnet", [Tensor("input", "FP32", bad.shape, bad)]))
        (stats,) = core.models.statistics("convnet", "1")
        everything = core.models.statistics()
        with pytest.raises(UnknownModelError, match="model 'resnet' is not loaded"):
            core.models.statistics("resnet")
        with pytest.raises(UnknownModelError, match="no version '9'; available versions: 1"):
            core.models.statistics("convnet", "9")
    finally:
        await core.stop(grace_s=10)
    after_ms = time.time_ns() // 1_000_000
    assert [(s.name, s.version) for s in everything] == [("convnet", "1"), ("fcn", "1")]
    assert (stats.name, stats.version) == ("convnet", "1")
    assert stats.success.count == 3
    assert stats.fail.count == 1
    assert stats.inference_count == 6
    assert before_ms <= stats.last_inference <= after_ms
    assert stats.execution_count == sum(b.compute_infer.count for b in stats.batch_stats)
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 6
    for duration in (stats.queue, stats.compute_input, stats.compute_infer, stats.compute_output):
        assert duration.count == 3
        assert duration.ns > 0
    # A request's time, from reaching the data plane to its answer, holds its model time.
    assert stats.success.ns >= stats.compute_infer.ns


async def test_a_reader_never_sees_the_compute_counts_differ(model_repository: Path) -> None:
    """perf_analyzer refuses statistics whose compute_input/infer/output counts differ; read
    them over and over while requests are answered, as it does between its windows."""
    core = await create_core(gateway_settings(model_repository, max_batch_delay_ms=5))
    await core.start()
    seen: list[tuple[int, int, int]] = []
    answering = True

    async def read_while_answering() -> None:
        while answering:
            (stats,) = core.models.statistics("fcn", "1")
            counts = (stats.compute_input, stats.compute_infer, stats.compute_output)
            seen.append(tuple(d.count for d in counts))  # type: ignore[arg-type]
            await asyncio.sleep(0)

    try:
        reader = asyncio.create_task(read_while_answering())
        scene = np.zeros((1, 3, 64, 64), np.float32)
        request = InferRequest("fcn", [Tensor("input", "FP32", scene.shape, scene)])
        await asyncio.gather(*(core.infer(request) for _ in range(40)))
        answering = False
        await reader
    finally:
        await core.stop(grace_s=10)
    assert len(seen) > 40
    assert all(a == b == c for a, b, c in seen), sorted({c for c in seen if len(set(c)) > 1})
    assert seen[-1] == (40, 40, 40)
