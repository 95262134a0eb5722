"""Fixed batch-size buckets with static buffers: what lets a CUDA graph serve any batch size.

A CUDA graph replays one captured sequence of kernels on fixed tensors, so it only serves
the exact shape it was captured with. :class:`StaticBatches` keeps one static input buffer
(and one compiled step) per *bucket* — a batch size from a fixed set — and item shape: a batch
of ``n`` items is copied into the first ``n`` rows of the smallest bucket that holds it, the
step runs on the whole bucket, and the first ``n`` output rows are returned.

Rows past ``n`` keep whatever an earlier batch left there: the networks are per-item in
evaluation mode (no batch statistics), so padding rows never change the real rows, and
skipping a fill saves a copy per batch.

The class is device-agnostic; the step is built by a ``compile_step`` callable — a CUDA graph
capture on the GPU (:func:`cuda_graph_step`), or plain eager execution, which is how the
bucket logic is exercised on a CPU.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: ``static input → step``: calling the step runs the network on the buffer's current
#: contents and returns the output tensor (the same tensor every time for a CUDA graph).
CompileStep = Callable[[torch.Tensor], Callable[[], torch.Tensor]]
#: Static buffers (and graphs) kept per runner; FCN sizes beyond it run eagerly.
MAX_STATIC_BATCHES = 32


def normalize_buckets(sizes: Iterable[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated bucket sizes; raises ``ValueError`` for a size below 1."""
    buckets = tuple(sorted(set(sizes)))
    if buckets and buckets[0] < 1:
        raise ValueError(f"batch-size buckets must be ≥ 1, got {list(buckets)}")
    return buckets


def bucket_for(count: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``count`` items; ``None`` when none is large enough."""
    index = bisect.bisect_left(buckets, count)
    return buckets[index] if index < len(buckets) else None


class StaticBatches:
    """Runs batches through per-(bucket, item shape, dtype) static buffers; see the module."""

    def __init__(
        self,
        buckets: Iterable[int],
        device: torch.device | str,
        compile_step: CompileStep,
        max_entries: int = MAX_STATIC_BATCHES,
    ) -> None:
        self.buckets = normalize_buckets(buckets)
        self._device = torch.device(device)
        self._compile = compile_step
        self._max_entries = max_entries
        self._entries: dict[tuple[int, tuple[int, ...], torch.dtype], _Entry] = {}
        self._full_warned = False

    def run(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The step's output for ``batch`` (a host or device tensor), first ``len(batch)`` rows.

        ``None`` when the batch is larger than every bucket or no more steps may be compiled;
        the caller then runs it eagerly.
        """
        count = len(batch)
        bucket = bucket_for(count, self.buckets)
        if bucket is None:
            return None
        key = (bucket, tuple(batch.shape[1:]), batch.dtype)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                if not self._full_warned:
                    logger.warning(
                        "%d static batches compiled; further item shapes run eagerly",
                        self._max_entries,
                    )
                    self._full_warned = True
                return None
            entry = self._entries[key] = self._new_entry(bucket, batch)
        entry.static_input[:count].copy_(batch, non_blocking=True)
        return entry.step()[:count]

    def _new_entry(self, bucket: int, like: torch.Tensor) -> _Entry:
        static_input = torch.zeros((bucket, *like.shape[1:]), dtype=like.dtype, device=self._device)
        return _Entry(static_input, self._compile(static_input))


class _Entry:
    """One bucket's static input buffer and its compiled step."""

    def __init__(self, static_input: torch.Tensor, step: Callable[[], torch.Tensor]) -> None:
        self.static_input = static_input
        self.step = step


def cuda_graph_step(
    forward: Callable[[torch.Tensor], torch.Tensor], warmup_iterations: int = 3
) -> CompileStep:
    """Steps that replay a CUDA graph of ``forward`` captured on the static buffer.

    Every graph shares one memory pool: batches run one at a time per runner and each output
    is copied out before the next replay, so the graphs never need their memory at once.
    """
    pool: list[Any] = []  # one handle, made on the first capture (it needs CUDA)

    def compile_step(static_input: torch.Tensor) -> Callable[[], torch.Tensor]:
        # Warm up on a side stream, as PyTorch's capture recipe requires (lazy init, autotune).
        stream = torch.cuda.Stream(static_input.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(static_input.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup_iterations):
                forward(static_input)
        torch.cuda.current_stream(static_input.device).wait_stream(stream)
        if not pool:
            pool.append(torch.cuda.graph_pool_handle())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0]):
            static_output = forward(static_input)

        def replay() -> torch.Tensor:
            graph.replay()
            return static_output

        return replay

    return compile_step
