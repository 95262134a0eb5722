"""Overload: open-loop load at several times a gateway's capacity, and what it does about it.

``cnnserve overload`` (``make overload``) starts a real ``cnnserve serve`` process with a small
``max_queue_size``, measures its capacity (closed loop), then for each multiple sends an open
loop of requests at that multiple of the capacity (bench/loadgen) while sampling the
queue-depth metric, and finally measures the capacity again. It prints a Markdown table:
per phase, the calls sent, answered and refused (RESOURCE_EXHAUSTED), how fast refusals and
answers came (p50/p99), the deepest queue seen; and the gateway's RSS before and after,
and the throughput after the load dropped.

A model of real weight is used — the FCN on 64×64 images, one per request — so the client
can outpace the server on a small machine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from .gateway_process import GatewayProcess, demo_repository, start_gateway
from .loadgen import LoadResult, LoadSpec, check_request, infer_request, run_load

QUEUE_DEPTH = "cnnserve_queue_depth"
REFUSED = "RESOURCE_EXHAUSTED"
MODEL = "fcn"
SIDE = 64
#: How often the queue depth is read during a phase.
SAMPLE_INTERVAL_S = 0.02


@dataclass
class Phase:
    """One open-loop phase at ``multiple`` × capacity."""

    multiple: float
    rate_rps: float
    result: LoadResult
    max_queue_depth: float

    @property
    def refused(self) -> int:
        """Calls refused as overloaded."""
        return self.result.errors.get(REFUSED, 0)

    @property
    def other_errors(self) -> dict[str, int]:
        """Failures other than an overload refusal (there should be none)."""
        return {k: v for k, v in self.result.errors.items() if k != REFUSED}

    @property
    def refused_ms(self) -> tuple[float, float]:
        """p50 and p99 of how long a refusal took, in ms (NaN when none)."""
        p50, p99 = self.result.extra.get("failed_ms", {}).get(REFUSED, [np.nan, np.nan])
        return float(p50), float(p99)


@dataclass
class OverloadReport:
    """Everything :func:`run_overload` measured."""

    max_queue_size: int
    max_batch_size: int
    capacity: LoadResult
    phases: list[Phase] = field(default_factory=list)
    recovery: LoadResult | None = None
    rss_before_bytes: int = 0
    rss_after_bytes: int = 0

    def markdown(self) -> str:
        """The figures as a Markdown table and a few lines."""
        lines = [
            f"Gateway: onnxruntime, {MODEL} {SIDE}×{SIDE} (one image per request), "
            f"max_queue_size {self.max_queue_size}, max_batch_size {self.max_batch_size}.",
            f"Capacity (closed loop): {self.capacity.requests_per_s:.0f} requests/s, "
            f"p50 {self.capacity.p50_ms:.1f} ms.",
            "",
            "| load | offered req/s | sent | answered | refused | other errors | "
            "refusal p50 / p99 ms | answer p50 / p99 ms | deepest queue |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for phase in self.phases:
            r = phase.result
            refused_p50, refused_p99 = phase.refused_ms
            lines.append(
                f"| {phase.multiple:g}× | {phase.rate_rps:.0f} | {r.requests} | {r.succeeded} | "
                f"{phase.refused} | {sum(phase.other_errors.values())} | "
                f"{refused_p50:.1f} / {refused_p99:.1f} | {r.p50_ms:.0f} / {r.p99_ms:.0f} | "
                f"{phase.max_queue_depth:.0f} of {self.max_queue_size} |"
            )
        lines.append("")
        if self.recovery is not None:
            lines.append(
                f"After the load: {self.recovery.requests_per_s:.0f} requests/s "
                f"({self.recovery.requests_per_s / self.capacity.requests_per_s:.0%} of "
                f"capacity), errors: {self.recovery.errors or 'none'}."
            )
        lines.append(
            f"Gateway RSS: {self.rss_before_bytes / 2**20:.0f} MiB before the overload, "
            f"{self.rss_after_bytes / 2**20:.0f} MiB after."
        )
        return "\n".join(lines)


class QueueDepthSampler:
    """Reads ``cnnserve_queue_depth`` for one model in a background thread; keeps the max."""

    def __init__(self, metrics_url: str, model: str) -> None:
        self._url = metrics_url
        self._model = model
        self.max_depth = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> QueueDepthSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while not self._stop.is_set():
                self.max_depth = max(self.max_depth, self._read(http))
                time.sleep(SAMPLE_INTERVAL_S)

    def _read(self, http: httpx.Client) -> float:
        for family in text_string_to_metric_families(http.get(self._url).text):
            if family.name == QUEUE_DEPTH:
                for sample in family.samples:
                    if sample.labels.get("model") == self._model:
                        return float(sample.value)
        return 0.0


def run_overload(
    artifacts_dir: Path,
    log_path: Path,
    multiples: tuple[float, ...] = (2.0, 4.0, 8.0),
    duration_s: float = 5.0,
    max_queue_size: int = 16,
    max_batch_size: int = 8,
    processes: int = 2,
) -> OverloadReport:
    """Measure capacity, overload at each multiple of it, measure again; see the module."""
    gateway = start_gateway(
        "onnxruntime",
        {
            "CNNSERVE_MODEL_REPOSITORY": str(demo_repository(artifacts_dir)),
            "CNNSERVE_DEVICE": "cpu",
            "CNNSERVE_MAX_QUEUE_SIZE": str(max_queue_size),
            "CNNSERVE_MAX_BATCH_SIZE": str(max_batch_size),
            "CNNSERVE_INFERENCE_THREADS": "1",
        },
        log_path,
    )
    try:
        return _measure(gateway, multiples, duration_s, max_queue_size, max_batch_size, processes)
    finally:
        gateway.stop()


def _measure(
    gateway: GatewayProcess,
    multiples: tuple[float, ...],
    duration_s: float,
    max_queue_size: int,
    max_batch_size: int,
    processes: int,
) -> OverloadReport:
    pixels = np.random.default_rng(0).integers(0, 256, (1, 3, SIDE, SIDE), dtype=np.uint8)
    request = infer_request(MODEL, pixels, input_name="pixels", outputs=("counts",))
    check_request(gateway.grpc_target, request)
    # Enough callers to fill a batch and queue the next, never more than the queue holds.
    closed = LoadSpec(
        gateway.grpc_target,
        request,
        items_per_request=1,
        duration_s=duration_s,
        warmup_s=1.0,
        concurrency=min(max_queue_size, 2 * max_batch_size),
        processes=processes,
    )
    report = OverloadReport(max_queue_size, max_batch_size, run_load(closed))
    report.rss_before_bytes = gateway.rss_bytes()
    for multiple in multiples:
        rate = multiple * report.capacity.requests_per_s
        spec = LoadSpec(
            gateway.grpc_target,
            request,
            items_per_request=1,
            duration_s=duration_s,
            warmup_s=0.5,
            rate_rps=rate,
            processes=processes,
        )
        with QueueDepthSampler(gateway.metrics_url, MODEL) as sampler:
            result = run_load(spec)
        report.phases.append(Phase(multiple, rate, result, sampler.max_depth))
    report.recovery = run_load(closed)
    report.rss_after_bytes = gateway.rss_bytes()
    return report
