"""NVML GPU metrics: read per device at each scrape, off cleanly without NVML or a GPU.

No GPU here: ``pynvml`` is a stand-in module injected into ``sys.modules`` with NVML's
names and types, the one fake these tests use (a GPU host runs ``cnnserve gpu-check``).
"""

from __future__ import annotations

import sys
import types

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.gateway.gpu_metrics import gpu_collector
from cnnserve.gateway.metrics import GatewayMetrics
from tests.gateway.nvml import GIB, fake_nvml


def gpu_samples(metrics: GatewayMetrics) -> dict[tuple[str, str], float]:
    """``(metric name, gpu index) → value`` for every ``cnnserve_gpu_*`` sample scraped."""
    return {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name.startswith("cnnserve_gpu_")
    }


def test_each_device_s_utilization_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [("NVIDIA H200", 87, 30 * GIB, 141 * GIB), ("NVIDIA L4", 0, 0, 24 * GIB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    families = {
        f.name: f for f in text_string_to_metric_families(GatewayMetrics().render().decode())
    }
    first = {"gpu": "0", "uuid": "GPU-0000", "name": "NVIDIA H200"}
    assert [(s.labels, s.value) for s in families["cnnserve_gpu_utilization_ratio"].samples] == [
        (first, 0.87),
        ({"gpu": "1", "uuid": "GPU-0001", "name": "NVIDIA L4"}, 0.0),
    ]
    assert families["cnnserve_gpu_memory_used_bytes"].samples[0].value == 30 * GIB
    assert families["cnnserve_gpu_memory_total_bytes"].samples[1].value == 24 * GIB


def test_a_lost_device_leaves_the_others_and_the_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = [("lost", 0, 0, 0), ("NVIDIA L4", 50, GIB, 24 * GIB)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(devices))
    metrics = GatewayMetrics()
    assert set(gpu_samples(metrics)) == {
        ("cnnserve_gpu_utilization_ratio", "1"),
        ("cnnserve_gpu_memory_used_bytes", "1"),
        ("cnnserve_gpu_memory_total_bytes", "1"),
    }
    assert b"cnnserve_build_info" in metrics.render()


@pytest.mark.parametrize(
    "nvml",
    [
        pytest.param(fake_nvml([("NVIDIA L4", 1, 1, 1)], init_fails=True), id="no driver"),
        pytest.param(fake_nvml([]), id="no GPU"),
        pytest.param(None, id="nvidia-ml-py not installed"),
    ],
)
def test_no_gpu_series_without_nvml_or_a_gpu(
    monkeypatch: pytest.MonkeyPatch, nvml: types.ModuleType | None
) -> None:
    # None in sys.modules makes the import raise ImportError, as a missing package does.
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu_collector(enabled=True) is None
    assert gpu_samples(GatewayMetrics()) == {}


def test_the_setting_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("NVIDIA L4", 10, GIB, 24 * GIB)]))
    assert gpu_samples(GatewayMetrics(gpu_metrics=False)) == {}
    assert len(gpu_samples(GatewayMetrics(gpu_metrics=True))) == 3
