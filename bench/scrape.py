"""Read the gateway's batch-size histogram and its GPUs' memory from its Prometheus endpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE_METRIC = "cnnserve_batch_size"
GPU_MEMORY_METRIC = "cnnserve_gpu_memory_used_bytes"


@dataclass
class BatchSizes:
    """Batches run and items in them, with the cumulative histogram buckets."""

    batches: float = 0.0
    items: float = 0.0
    buckets: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Average items per batch (0 when no batch ran)."""
        return self.items / self.batches if self.batches else 0.0

    def minus(self, earlier: BatchSizes) -> BatchSizes:
        """What happened between ``earlier`` and this reading."""
        return BatchSizes(
            self.batches - earlier.batches,
            self.items - earlier.items,
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )


def batch_sizes(metrics_url: str, model: str) -> BatchSizes:
    """The batch-size histogram for ``model`` as the gateway reports it now."""
    text = httpx.get(metrics_url, timeout=10).text
    reading = BatchSizes()
    for family in text_string_to_metric_families(text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                reading.batches = sample.value
            elif sample.name.endswith("_sum"):
                reading.items = sample.value
            elif sample.name.endswith("_bucket"):
                reading.buckets[sample.labels["le"]] = sample.value
    return reading


def gpu_memory_used_bytes(metrics_url: str) -> float | None:
    """Memory in use on the gateway's GPUs (every device summed) as NVML reports it now;
    ``None`` when the gateway exports no GPU metrics (no NVML, no GPU, or turned off)."""
    text = httpx.get(metrics_url, timeout=10).text
    used = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == GPU_MEMORY_METRIC
        for sample in family.samples
    ]
    return sum(used) if used else None
