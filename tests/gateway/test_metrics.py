"""Gateway metrics: outcome labels from the error table, histograms, Prometheus text, the
process and build-info metrics, alone and with several gateway processes."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    InvalidInputError,
    OverloadedError,
    PayloadTooLargeError,
    UnavailableError,
    UnknownModelError,
)
from cnnserve.gateway.metrics import (
    BATCH_SIZE_BUCKETS,
    MULTIPROCESS_DIR_ENV,
    GatewayMetrics,
    outcome_of,
)


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, "success"),
        (InvalidInputError("x"), "invalid_input"),
        (UnknownModelError("x"), "unknown_model"),
        (PayloadTooLargeError("x"), "payload_too_large"),
        (OverloadedError("x"), "overloaded"),
        (UnavailableError("x"), "unavailable"),
        (DeadlineExceededError("x"), "deadline_exceeded"),
        (CnnserveError("x"), "internal"),
        (ZeroDivisionError(), "internal"),
    ],
)
def test_every_error_kind_has_its_own_outcome(exc: BaseException | None, outcome: str) -> None:
    assert outcome_of(exc) == outcome


def test_requests_are_counted_by_model_and_outcome() -> None:
    metrics = GatewayMetrics()
    metrics.request_finished("convnet", "1", None, 0.01)
    metrics.request_finished("convnet", "1", None, 0.02)
    metrics.request_finished("convnet", "2", None, 0.04)
    metrics.request_finished("convnet", "1", OverloadedError("full"), 0.0)
    metrics.request_finished("fcn", "1", InvalidInputError("bad"), 0.0)
    metrics.request_cancelled("fcn", "1")
    sample = metrics.registry.get_sample_value

    def requests(model: str, version: str, outcome: str) -> float | None:
        labels = {"model": model, "version": version, "outcome": outcome}
        return sample("cnnserve_requests_total", labels)

    assert requests("convnet", "1", "success") == 2
    assert requests("convnet", "2", "success") == 1
    assert requests("convnet", "1", "overloaded") == 1
    assert requests("fcn", "1", "invalid_input") == 1
    assert requests("fcn", "1", "cancelled") == 1
    v1 = {"model": "convnet", "version": "1"}
    assert sample("cnnserve_request_seconds_count", v1) == 3
    assert sample("cnnserve_request_seconds_sum", v1) == pytest.approx(0.03)


def test_an_unloaded_version_s_series_go_away() -> None:
    """Label values stay bounded by what is loaded: forgetting a version drops its series
    and leaves the other versions' alone."""
    metrics = GatewayMetrics()
    for version in ("1", "2"):
        metrics.request_finished("convnet", version, None, 0.01)
        metrics.request_finished("convnet", version, OverloadedError("full"), 0.0)
        metrics.observer("convnet", version).batch_done(3, 0.0, 0.02, 0.0)
    metrics.forget("convnet", "1")
    metrics.forget("convnet", "7")  # never served: nothing to drop, no error
    families = text_string_to_metric_families(metrics.render().decode())
    # The per-model families: build_info's and python_info's version labels are not models'.
    versions = {
        s.labels.get("version")
        for f in families
        if f.name.startswith("cnnserve_") and f.name != "cnnserve_build_info"
        for s in f.samples
    }
    assert versions == {"2"}


def test_batcher_hooks_feed_the_histograms_and_gauges() -> None:
    metrics = GatewayMetrics()
    hooks = metrics.observer("fcn", "3")
    hooks.queue_changed(5)
    hooks.queue_changed(-3)
    hooks.request_dequeued(0.004)
    hooks.batch_done(3, 0.001, 0.02, 0.001)
    hooks.batch_done(32, 0.001, 0.1, 0.001)
    hooks.request_expired()
    sample = metrics.registry.get_sample_value
    fcn = {"model": "fcn", "version": "3"}
    assert sample("cnnserve_queue_depth", fcn) == 2
    assert sample("cnnserve_queue_seconds_count", fcn) == 1
    # The backend's time only: joining items and handing out rows are not inference.
    assert sample("cnnserve_inference_seconds_sum", fcn) == pytest.approx(0.12)
    assert sample("cnnserve_batch_size_bucket", {**fcn, "le": "2.0"}) == 0
    assert sample("cnnserve_batch_size_bucket", {**fcn, "le": "4.0"}) == 1
    assert sample("cnnserve_batch_size_bucket", {**fcn, "le": "32.0"}) == 2
    assert sample("cnnserve_expired_before_compute_total", fcn) == 1


def test_render_is_prometheus_text_with_the_documented_buckets() -> None:
    metrics = GatewayMetrics()
    metrics.observer("convnet", "1").batch_done(7, 0.0, 0.01, 0.0)
    metrics.request_finished("convnet", "1", None, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert {
        "cnnserve_requests",
        "cnnserve_request_seconds",
        "cnnserve_queue_seconds",
        "cnnserve_inference_seconds",
        "cnnserve_batch_size",
        "cnnserve_queue_depth",
        "cnnserve_expired_before_compute",
    } <= set(families)
    bounds = [
        float(s.labels["le"])
        for s in families["cnnserve_batch_size"].samples
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf"
    ]
    assert bounds == [float(b) for b in BATCH_SIZE_BUCKETS]
    assert metrics.CONTENT_TYPE.startswith("text/plain")


def test_each_instance_has_its_own_registry() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()
    first.request_finished("convnet", "1", None, 0.0)
    sample = {"model": "convnet", "version": "1", "outcome": "success"}
    assert first.registry.get_sample_value("cnnserve_requests_total", sample) == 1
    assert second.registry.get_sample_value("cnnserve_requests_total", sample) is None


def test_process_python_and_build_info_metrics() -> None:
    families = {
        f.name: f for f in text_string_to_metric_families(GatewayMetrics().render().decode())
    }
    assert families["cnnserve_build_info"].samples[0].labels == {
        "version": importlib.metadata.version("cnnserve")
    }
    assert families["process_resident_memory_bytes"].samples[0].value > 10e6
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert {
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections",
    } <= set(families)


def _hold_metrics(directory: str, made: EventType, stop: EventType) -> None:
    """A second gateway process's metrics, kept alive until ``stop``."""
    os.environ[MULTIPROCESS_DIR_ENV] = directory
    metrics = GatewayMetrics()
    metrics.request_finished("convnet", "1", None, 0.01)
    made.set()
    stop.wait(30)


def test_several_processes_each_have_their_process_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Multiprocess mode: the scraping process reports every live gateway process's
    ``process_*`` series, labelled by pid, and drops one that has exited."""
    monkeypatch.setenv(MULTIPROCESS_DIR_ENV, str(tmp_path))
    context = multiprocessing.get_context("spawn")
    made, stop = context.Event(), context.Event()
    other = context.Process(target=_hold_metrics, args=(str(tmp_path), made, stop))
    other.start()
    try:
        assert made.wait(60)
        metrics = GatewayMetrics()

        def memory_by_pid() -> dict[str, float]:
            families = text_string_to_metric_families(metrics.render().decode())
            return {
                s.labels["pid"]: s.value
                for f in families
                if f.name == "process_resident_memory_bytes"
                for s in f.samples
            }

        assert set(memory_by_pid()) == {str(os.getpid()), str(other.pid)}
        assert min(memory_by_pid().values()) > 10e6
        # The other process's request is in the scrape too: the recorded metrics are shared.
        assert b'cnnserve_requests_total{model="convnet",outcome="success",version="1"} 1.0' in (
            metrics.render()
        )
    finally:
        stop.set()
        other.join(30)
    assert set(memory_by_pid()) == {str(os.getpid())}
