"""Batch-size buckets: a batch padded into a static buffer gives exactly its unpadded result.

On a CPU the steps run eagerly on the static buffers (the CUDA graph capture itself needs a
GPU), which exercises everything else a graph replay relies on: bucket choice, the copy into
the first rows, reuse of the buffer across batches and the slice back out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnserve.models.batch_buckets import StaticBatches, bucket_for, normalize_buckets
from cnnserve.models.torchscript import TorchScriptRunner


class EagerSteps:
    """A ``compile_step`` that runs ``forward`` on the static buffer eagerly (no capture, so
    it works on a CPU) and remembers each buffer it was asked to compile a step for."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward = forward
        self.buffers: list[torch.Tensor] = []

    def __call__(self, static_input: torch.Tensor) -> Callable[[], torch.Tensor]:
        self.buffers.append(static_input)
        return lambda: self.forward(static_input)


def test_bucket_for_picks_the_smallest_that_holds_the_batch() -> None:
    buckets = normalize_buckets([8, 1, 2, 4, 4])
    assert buckets == (1, 2, 4, 8)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]
    assert bucket_for(1, ()) is None


def test_buckets_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="≥ 1"):
        normalize_buckets([0, 4])


@pytest.fixture(scope="module")
def runner(artifacts_dir: Path) -> TorchScriptRunner:
    return TorchScriptRunner(artifacts_dir / "fcn.pt", device="cpu")


def test_padded_batches_equal_unpadded_ones(runner: TorchScriptRunner) -> None:
    steps = EagerSteps(runner.forward)
    batches = StaticBatches((1, 2, 4, 8), "cpu", steps)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        # Uneven sizes reuse the buffers: a 3 after a 4 leaves a stale row 4 in the bucket.
        for n in (2, 3, 1, 4, 3, 7):
            x = torch.from_numpy(rng.standard_normal((n, 3, 12, 12), dtype=np.float32))
            padded = batches.run(x)
            assert padded is not None
            assert padded.shape[0] == n
            torch.testing.assert_close(padded, runner.forward(x), atol=1e-5, rtol=0)
    # One buffer per bucket used (2, 4, 1, 8) for the one item shape and dtype.
    assert [len(b) for b in steps.buffers] == [2, 4, 1, 8]


def test_uint8_pixels_get_their_own_buffers(runner: TorchScriptRunner) -> None:
    steps = EagerSteps(runner.forward)
    batches = StaticBatches((4,), "cpu", steps)
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 3, 9, 9), np.uint8))
    with torch.inference_mode():
        floats = pixels.float() / 127.5 - 1
        a, b = batches.run(pixels), batches.run(floats)
        assert a is not None and b is not None
        torch.testing.assert_close(a, runner.forward(pixels))
        torch.testing.assert_close(b, runner.forward(floats), atol=1e-5, rtol=0)
    assert [b.dtype for b in steps.buffers] == [torch.uint8, torch.float32]


def test_batches_past_the_largest_bucket_or_the_cap_are_left_to_the_caller(
    runner: TorchScriptRunner,
) -> None:
    steps = EagerSteps(runner.forward)
    batches = StaticBatches((2,), "cpu", steps, max_entries=1)
    with torch.inference_mode():
        assert batches.run(torch.zeros(3, 3, 8, 8)) is None
        assert batches.run(torch.zeros(2, 3, 8, 8)) is not None
        assert batches.run(torch.zeros(2, 3, 9, 9)) is None  # a second item shape: cap reached
    assert [tuple(b.shape) for b in steps.buffers] == [(2, 3, 8, 8)]
