"""Per-version inference statistics, with the fields of Triton's ``ModelStatistics``.

Triton's meaning is kept field by field (its ``grpc_service.proto``), so tritonclient and
perf_analyzer read them as they read Triton's:

- ``success`` / ``fail``: requests that ended with an answer / an error, and their cumulative
  time from reaching the data plane to the answer (a caller that went away counts in neither);
- ``queue``: requests that left the batcher's queue for a batch, and how long they waited;
- ``compute_input``: per successful request, preparing its input at the edge (images'
  headers read and priced, pixels normalized: ``gateway/inputs``);
- ``compute_infer``: per successful request, the model time of the batches its items ran in
  (for images, their decoding with the rest of their batch included);
- ``compute_output``: per successful request, computing the outputs it asked for;
- ``inference_count``: items of successful requests; ``execution_count``: batches run;
- ``batch_stats``: per batch size, the batcher's three steps for one batch: joining the
  requests' items (input), the backend call (infer), handing each request its rows (output).

Counts and nanoseconds only grow while a version is loaded; a version loaded again starts
from zero, as in Triton.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Duration:
    """Triton's ``StatisticDuration``: how many times, and their total time in nanoseconds."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class BatchStatistics:
    """Triton's ``InferBatchStatistics``: the batches of one size."""

    batch_size: int
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True)
class ModelStatistics:
    """One version's statistics (Triton's ``ModelStatistics``; its ``inference_stats``
    fields are flattened onto this object)."""

    name: str
    version: str
    #: When the last successful request was answered, milliseconds since the epoch (0: never).
    last_inference: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    #: One entry per batch size run so far, ascending.
    batch_stats: tuple[BatchStatistics, ...] = ()


class _Tally:
    """A growing :class:`Duration` (the recorder's hooks run per request and per batch)."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, round(seconds * 1e9))

    def frozen(self) -> Duration:
        return Duration(self.count, self.ns)


class _BatchTally:
    """The three steps of the batches of one size."""

    __slots__ = ("infer", "input", "output")

    def __init__(self) -> None:
        self.input = _Tally()
        self.infer = _Tally()
        self.output = _Tally()


class StatisticsRecorder:
    """Collects one loaded version's statistics: the batcher's hooks (``BatchObserver``) and
    the data plane's :meth:`request_succeeded` / :meth:`request_failed`."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = _Tally()
        self._fail = _Tally()
        self._queue = _Tally()
        self._compute_input = _Tally()
        self._compute_infer = _Tally()
        self._compute_output = _Tally()
        self._batches: dict[int, _BatchTally] = {}

    def snapshot(self) -> ModelStatistics:
        """The statistics now."""
        return ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self._last_inference_ms,
            inference_count=self._inference_count,
            execution_count=self._execution_count,
            success=self._success.frozen(),
            fail=self._fail.frozen(),
            queue=self._queue.frozen(),
            compute_input=self._compute_input.frozen(),
            compute_infer=self._compute_infer.frozen(),
            compute_output=self._compute_output.frozen(),
            batch_stats=tuple(
                BatchStatistics(
                    size, tally.input.frozen(), tally.infer.frozen(), tally.output.frozen()
                )
                for size, tally in sorted(self._batches.items())
            ),
        )

    # --- the data plane's hooks ---

    def request_succeeded(
        self, items: int, total_s: float, input_s: float, infer_s: float, output_s: float
    ) -> None:
        """A request of ``items`` items was answered after ``total_s``; preparing its input
        took ``input_s``, its batches ``infer_s`` in the model, its outputs ``output_s``.

        The three compute counts move together, in one step, as Triton's do: a reader
        (perf_analyzer checks this) never sees them differ, and a request that fails after
        the model ran counts in none of them."""
        self._last_inference_ms = time.time_ns() // 1_000_000
        self._inference_count += items
        self._success.add(total_s)
        self._compute_input.add(input_s)
        self._compute_infer.add(infer_s)
        self._compute_output.add(output_s)

    def request_failed(self, total_s: float) -> None:
        """A request routed to this version ended with an error after ``total_s``."""
        self._fail.add(total_s)

    # --- the batcher's hooks (batcher.BatchObserver) ---

    def queue_changed(self, delta: int) -> None:
        """Queue depth is a metric, not a statistic."""

    def request_dequeued(self, waited_s: float) -> None:
        """A request's first items left the queue after ``waited_s``."""
        self._queue.add(waited_s)

    def batch_done(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A batch of ``size`` items ran: joined in ``input_s``, run in ``infer_s``, its rows
        handed out in ``output_s``."""
        self._execution_count += 1
        tally = self._batches.setdefault(size, _BatchTally())
        tally.input.add(input_s)
        tally.infer.add(infer_s)
        tally.output.add(output_s)

    def request_computed(self, infer_s: float) -> None:
        """Counted with the request's success instead (:meth:`request_succeeded`)."""

    def request_expired(self) -> None:
        """Counted by the data plane, as a failed request."""
