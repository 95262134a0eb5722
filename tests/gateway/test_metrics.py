"""Gateway metrics: outcome labels from the error table, histograms, Prometheus text."""

from __future__ import annotations

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
from cnnserve.gateway.metrics import BATCH_SIZE_BUCKETS, GatewayMetrics, outcome_of


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
    metrics.request_finished("convnet", None, 0.01)
    metrics.request_finished("convnet", None, 0.02)
    metrics.request_finished("convnet", OverloadedError("full"), 0.0)
    metrics.request_finished("fcn", InvalidInputError("bad"), 0.0)
    metrics.request_cancelled("fcn")
    sample = metrics.registry.get_sample_value
    assert sample("cnnserve_requests_total", {"model": "convnet", "outcome": "success"}) == 2
    assert sample("cnnserve_requests_total", {"model": "convnet", "outcome": "overloaded"}) == 1
    assert sample("cnnserve_requests_total", {"model": "fcn", "outcome": "invalid_input"}) == 1
    assert sample("cnnserve_requests_total", {"model": "fcn", "outcome": "cancelled"}) == 1
    assert sample("cnnserve_request_seconds_count", {"model": "convnet"}) == 3
    assert sample("cnnserve_request_seconds_sum", {"model": "convnet"}) == pytest.approx(0.03)


def test_batcher_hooks_feed_the_histograms_and_gauges() -> None:
    metrics = GatewayMetrics()
    hooks = metrics.observer("fcn")
    hooks.queue_changed(5)
    hooks.queue_changed(-3)
    hooks.request_dequeued(0.004)
    hooks.batch_done(3, 0.02)
    hooks.batch_done(32, 0.1)
    hooks.request_expired()
    sample = metrics.registry.get_sample_value
    assert sample("cnnserve_queue_depth", {"model": "fcn"}) == 2
    assert sample("cnnserve_queue_seconds_count", {"model": "fcn"}) == 1
    assert sample("cnnserve_inference_seconds_sum", {"model": "fcn"}) == pytest.approx(0.12)
    assert sample("cnnserve_batch_size_bucket", {"model": "fcn", "le": "2.0"}) == 0
    assert sample("cnnserve_batch_size_bucket", {"model": "fcn", "le": "4.0"}) == 1
    assert sample("cnnserve_batch_size_bucket", {"model": "fcn", "le": "32.0"}) == 2
    assert sample("cnnserve_expired_before_compute_total", {"model": "fcn"}) == 1


def test_render_is_prometheus_text_with_the_documented_buckets() -> None:
    metrics = GatewayMetrics()
    metrics.observer("convnet").batch_done(7, 0.01)
    metrics.request_finished("convnet", None, 0.01)
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
    first.request_finished("convnet", None, 0.0)
    sample = {"model": "convnet", "outcome": "success"}
    assert first.registry.get_sample_value("cnnserve_requests_total", sample) == 1
    assert second.registry.get_sample_value("cnnserve_requests_total", sample) is None
