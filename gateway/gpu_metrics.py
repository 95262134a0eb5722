"""GPU utilisation and memory per device, read through NVML at each scrape.

NVML (``pynvml``, from the ``nvidia-ml-py`` package: the ``gpu-metrics`` extra) is the
driver's own monitoring library, the one ``nvidia-smi`` and DCGM read. It is optional: without
the package, without a driver or without a GPU, :func:`gpu_collector` returns ``None`` and the
gateway exports no GPU series (rather than failing or exporting zeros an alert could mistake
for an idle GPU).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from types import ModuleType

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Labels of every GPU series: the device's NVML index, its UUID (stable across reboots and
#: re-orderings, as DCGM's exporter labels it) and its product name.
GPU_LABELS = ("gpu", "uuid", "name")


class NvmlCollector(Collector):
    """One sample per device and metric at each scrape; NVML is initialised once."""

    def __init__(self, nvml: ModuleType, devices: int) -> None:
        self._nvml = nvml
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        """Utilisation (0–1 over NVML's last sample period) and used/total memory in bytes."""
        utilization = GaugeMetricFamily(
            "cnnserve_gpu_utilization_ratio",
            "Fraction of the last sample period (1/6 s to 1 s, by product) in which a kernel "
            "ran on the GPU (NVML).",
            labels=GPU_LABELS,
        )
        used = GaugeMetricFamily(
            "cnnserve_gpu_memory_used_bytes",
            "GPU memory allocated by every process on the device (NVML).",
            labels=GPU_LABELS,
        )
        total = GaugeMetricFamily(
            "cnnserve_gpu_memory_total_bytes",
            "GPU memory of the device (NVML).",
            labels=GPU_LABELS,
        )
        nvml = self._nvml
        for index in range(self._devices):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                labels = [
                    str(index),
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    _text(nvml.nvmlDeviceGetName(handle)),
                ]
                busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                # A device that fell off the bus must not cost the scrape the other metrics.
                logger.warning("NVML could not read GPU %d: %s", index, exc)
                continue
            utilization.add_metric(labels, busy)
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
        yield from (utilization, used, total)


def _text(value: str | bytes) -> str:
    """NVML's strings are ``bytes`` in older ``nvidia-ml-py`` releases, ``str`` in newer."""
    return value.decode() if isinstance(value, bytes) else value


def gpu_collector(enabled: bool) -> NvmlCollector | None:
    """The NVML collector when ``enabled`` and NVML finds at least one GPU, else ``None``
    (the reason logged once)."""
    if not enabled:
        return None
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        logger.info("GPU metrics off: nvidia-ml-py is not installed (cnnserve[gpu-metrics])")
        return None
    try:
        nvml.nvmlInit()
        devices = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        logger.info("GPU metrics off: NVML is not available (%s)", exc)
        return None
    if devices == 0:
        logger.info("GPU metrics off: NVML finds no GPU")
        return None
    logger.info("GPU metrics on: %d device(s) through NVML", devices)
    return NvmlCollector(nvml, devices)
