"""The gateway's Prometheus metrics, on a private registry the metrics port serves.

A private :class:`~prometheus_client.CollectorRegistry` (not the global default) keeps two
gateways in one process — as in the tests — from colliding, and keeps library metrics out.

Every metric of a model is labelled by ``model`` and ``version``. Both stay bounded whatever
callers send: a request that names no loaded version counts under ``_unknown`` (the model's
name is kept when that model is loaded), and a version's series go away when it is unloaded.

Besides its own ``cnnserve_*`` metrics the registry carries the standard ``process_*`` ones
(CPU, memory, file descriptors, start time), ``python_info``, ``python_gc_*``,
``cnnserve_build_info`` and, on a GPU host, NVML's per-device ``cnnserve_gpu_*``
(:mod:`.gpu_metrics`). With several gateway processes (:mod:`.processes`) prometheus_client's
multiprocess mode cannot carry ``process_*`` (its docs: they are per process), so the
process that serves the metrics port reads every live gateway process's ``/proc`` entry and
labels each series with its ``pid``, as the multiprocess mode labels a gauge of mode ``all``;
``sum by (instance)`` gives a pod's total. ``python_gc_*`` is left out there (one process's
collector only would mislead).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    multiprocess,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    UnknownModelError,
)

from .gpu_metrics import gpu_collector

#: Set (to a directory) when several gateway processes record their metrics there.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Batch sizes are powers of two up to the largest sensible ``max_batch_size``.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Seconds, from a fraction of a millisecond (a queued request picked up at once) to 10 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

#: Outcome label per error class; subclasses are checked in order, most specific first.
_OUTCOMES: tuple[tuple[type[CnnserveError], str], ...] = (
    (InvalidInputError, "invalid_input"),
    (UnknownModelError, "unknown_model"),
    (PayloadTooLargeError, "payload_too_large"),
    (OverloadedError, "overloaded"),
    (UnavailableError, "unavailable"),
    (DeadlineExceededError, "deadline_exceeded"),
)
SUCCESS = "success"
CANCELLED = "cancelled"
INTERNAL = "internal"


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label for a request that ended with ``exc`` (``None``: success)."""
    if exc is None:
        return SUCCESS
    for cls, label in _OUTCOMES:
        if isinstance(exc, cls):
            return label
    return INTERNAL


#: The label of a model or version no loaded version answers to.
UNKNOWN_LABEL = "_unknown"
LABELS = ("model", "version")


class ModelObserver:
    """The batcher's metrics hooks for one model version (see ``batcher.BatchObserver``)."""

    def __init__(self, metrics: GatewayMetrics, model: str, version: str) -> None:
        labels = {"model": model, "version": version}
        self._queue_depth = metrics.queue_depth.labels(**labels)
        self._queue_time = metrics.queue_seconds.labels(**labels)
        self._inference_time = metrics.inference_seconds.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)
        self._expired = metrics.expired.labels(**labels)

    def queue_changed(self, delta: int) -> None:
        """Items were added to (positive) or taken from (negative) the model's queue."""
        self._queue_depth.inc(delta)

    def request_dequeued(self, waited_s: float) -> None:
        """A request's first items left the queue for a batch after ``waited_s``."""
        self._queue_time.observe(waited_s)

    def batch_done(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A batch of ``size`` items ran through the backend in ``infer_s``."""
        self._batch_size.observe(size)
        self._inference_time.observe(infer_s)

    def request_computed(self, infer_s: float) -> None:
        """Per-request model time is a statistic (``statistics.py``), not a metric."""

    def request_expired(self) -> None:
        """A request's deadline passed before any of it was computed."""
        self._expired.inc()


#: In multiprocess mode: one empty file per gateway process, ``<pid>.pid``, in the metrics
#: directory, which tells the process serving the metrics port whose ``/proc`` to read.
PID_FILE_SUFFIX = ".pid"


class BuildInfoCollector(Collector):
    """``cnnserve_build_info{version}`` = 1: which release a scrape target runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._version = importlib.metadata.version("cnnserve")
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """The one constant sample."""
        info = GaugeMetricFamily(
            "cnnserve_build_info",
            "Always 1; the version label is the cnnserve release this gateway runs.",
            labels=["version"],
        )
        info.add_metric([self._version], 1.0)
        yield info


class ProcessesCollector(Collector):
    """The ``process_*`` metrics of every live gateway process that left its pid file in
    ``directory``, each sample labelled with its ``pid``."""

    def __init__(self, directory: Path, registry: CollectorRegistry) -> None:
        self._directory = directory
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        """Read each live process's ``/proc`` entry; a process gone since is skipped."""
        families: dict[str, Metric] = {}
        for pid_file in sorted(self._directory.glob(f"*{PID_FILE_SUFFIX}")):
            pid = pid_file.name.removesuffix(PID_FILE_SUFFIX)
            if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
                continue
            one = ProcessCollector(pid=functools.partial(str, pid), registry=None)
            for family in one.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "pid": pid}, sample.value)
        yield from families.values()


class GatewayMetrics:
    """Every metric the gateway exports; ``render()`` gives the Prometheus text.

    ``gpu_metrics``: export NVML's GPU metrics when NVML finds a GPU (checked at the first
    scrape, in the process that serves the metrics port only).
    """

    def __init__(self, gpu_metrics: bool = True) -> None:
        self._gpu_metrics = gpu_metrics
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_ENV)
        if self._multiprocess_dir is not None:
            (Path(self._multiprocess_dir) / f"{os.getpid()}{PID_FILE_SUFFIX}").touch()
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cnnserve_requests",
            "Inference requests by model and outcome (success or the error kind).",
            [*LABELS, "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "cnnserve_request_seconds",
            "Time from a request reaching the data plane to its answer.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "cnnserve_queue_seconds",
            "Time a request waited in the batcher's queue before its first batch ran.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "cnnserve_inference_seconds",
            "Time one batch spent in the backend.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "cnnserve_batch_size",
            "Items per batch sent to the backend.",
            LABELS,
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "cnnserve_queue_depth",
            "Items waiting in the model's batcher queue.",
            LABELS,
            registry=self.registry,
            # Summed over live processes when several gateway processes share the ports.
            multiprocess_mode="livesum",
        )
        self.expired = Counter(
            "cnnserve_expired_before_compute",
            "Requests whose deadline passed before they reached the model (never computed).",
            LABELS,
            registry=self.registry,
        )

    @functools.cached_property
    def _scrape_registry(self) -> CollectorRegistry:
        """What a scrape reads: the recorded metrics (every process's, in multiprocess mode)
        and the collectors read at scrape time. Made at the first scrape, so only the
        process serving the metrics port opens NVML."""
        if self._multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            ProcessesCollector(Path(self._multiprocess_dir), registry)
        else:
            registry = self.registry
            ProcessCollector(registry=registry)
            GCCollector(registry=registry)
        BuildInfoCollector(registry)
        PlatformCollector(registry=registry)
        gpu = gpu_collector(self._gpu_metrics)
        if gpu is not None:
            registry.register(gpu)
        return registry

    def observer(self, model: str, version: str) -> ModelObserver:
        """The batcher hooks that count into this registry under ``model`` and ``version``."""
        return ModelObserver(self, model, version)

    def request_finished(
        self, model: str, version: str, exc: BaseException | None, seconds: float
    ) -> None:
        """Count one finished request by outcome and record how long it took."""
        self.requests.labels(model=model, version=version, outcome=outcome_of(exc)).inc()
        self.request_seconds.labels(model=model, version=version).observe(seconds)

    def request_cancelled(self, model: str, version: str) -> None:
        """Count a request whose caller went away before it was answered."""
        self.requests.labels(model=model, version=version, outcome=CANCELLED).inc()

    def forget(self, model: str, version: str) -> None:
        """Drop an unloaded version's series, so label values stay bounded by what is loaded
        (in multi-process mode its last values stay in the shared files)."""
        for family in (
            self.request_seconds,
            self.queue_seconds,
            self.inference_seconds,
            self.batch_size,
            self.queue_depth,
            self.expired,
        ):
            with contextlib.suppress(KeyError):
                family.remove(model, version)
        for outcome in (SUCCESS, CANCELLED, INTERNAL, *(label for _, label in _OUTCOMES)):
            with contextlib.suppress(KeyError):
                self.requests.remove(model, version, outcome)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format — every gateway process's
        metrics summed when several share the ports (prometheus_client's multiprocess mode)."""
        return prometheus_client.generate_latest(self._scrape_registry)

    #: The ``Content-Type`` to serve :meth:`render`'s output with.
    CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
