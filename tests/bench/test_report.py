"""The report computes the performance targets as ratios of figures from the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cnnserve.bench import report


def _row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": "onnxruntime", "model": "convnet", "side": 28, "items": 1, "concurrency": 64,
        "batching": True, "payload": "tensor", "variant": "", "requests_per_s": 1000.0,
        "images_per_s": 1000.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0,
        "mean_batch_size": 12.0, "errors": {}, "echo_requests_per_s": 1250.0,
        "echo_p50_ms": 0.5, "model_alone_batch": 12, "model_alone_images_per_s": 5000.0,
        "model_alone_p50_ms": 0.8, "gateway_rss_start_mb": 300.0, "gateway_rss_end_mb": 310.0,
    }  # fmt: skip
    row.update(overrides)
    return row


def _rest_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": report.TORCHSERVE_REST, "model": "convnet", "side": 28, "items": 1,
        "concurrency": 64, "batching": True, "payload": "png", "variant": "",
        "requests_per_s": 200.0, "images_per_s": 200.0, "p50_ms": 300.0, "p90_ms": 320.0,
        "p99_ms": 400.0, "errors": {"HTTP_503": 2}, "torchserve_batch_size": 32,
        "torchserve_max_batch_delay_ms": 5, "torchserve_rss_mb": 900.0,
    }  # fmt: skip
    row.update(overrides)
    return row


def test_targets_are_ratios_with_verdicts(tmp_path: Path) -> None:
    rows = [
        _row(),
        _row(batching=False, requests_per_s=150.0, images_per_s=150.0, mean_batch_size=1.0),
        _row(
            items=32,
            concurrency=8,
            images_per_s=4500.0,
            model_alone_batch=32,
            model_alone_images_per_s=5000.0,
        ),
        _row(concurrency=1, p50_ms=1.5, model_alone_p50_ms=0.7),
        # A delay variant at c=64 must not be taken for the default configuration.
        _row(variant="delay 0", requests_per_s=10.0, overrides={"max_batch_delay_ms": "0"}),
    ]
    measured = report.measure(rows)
    assert {name: figure and (figure.value, figure.met) for name, figure in measured.items()} == {
        "batching on ÷ off, 1-image ConvNet, c=64 (ORT)": (pytest.approx(1000 / 150), True),
        "gateway+ORT ÷ bare gRPC echo, 1-image, c=64": (pytest.approx(0.8), True),
        "32-image requests ÷ model alone at batch 32 (ORT)": (pytest.approx(0.9), True),
        "gateway→TorchServe ÷ TorchServe REST (own batching), c=64": None,
        "p50 added over the model alone at c=1 (ms)": (pytest.approx(0.8), False),
    }
    text = report.render(rows, "test machine", "cnnserve bench", report.plot(rows, tmp_path))
    # The targets table: each figure with its verdict, or why there is none.
    assert "| p50 added over the model alone at c=1 (ms) | ≤ 0.5 ms | 0.80 | **not met** |" in text
    assert "the gateway adds 0.30 ms over echo + model" in text
    assert (
        "gateway→TorchServe ÷ TorchServe REST (own batching), c=64 | ≥ 3× | — | not measured"
        in text
    )
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_torchserve_gain_prefers_the_same_png_payload(tmp_path: Path) -> None:
    rows = [
        _row(backend="torchserve", requests_per_s=900.0, torchserve_rss_mb=800.0),
        _row(backend="torchserve", payload="png", requests_per_s=700.0, torchserve_rss_mb=810.0),
        _rest_row(),
    ]
    gain = report.measure(rows)["gateway→TorchServe ÷ TorchServe REST (own batching), c=64"]
    assert gain is not None
    assert (gain.value, gain.met) == (pytest.approx(700 / 200), True)
    text = report.render(rows, "m", "cnnserve bench", [])
    assert "700 req/s (png) vs TorchServe REST 200 req/s (PNG, batchSize 32" in text
    assert "## TorchServe with and without the gateway" in text
    assert "| TorchServe REST alone | png | 64 | TorchServe's own | 200 |" in text
    assert "HTTP_503:2" in text


def test_delay_trade_off_table_lists_every_variant(tmp_path: Path) -> None:
    rows = [
        _row(concurrency=c, variant=v, requests_per_s=100.0 * c, mean_batch_size=b)
        for c in (1, 8)
        for v, b in (("", 1.0), ("delay 0", 1.5), ("fixed 2 ms", 4.0))
    ]
    text = report.render(rows, "m", "cnnserve bench", [], ["## Notes\n\nhand-written"])
    assert "## Batching delay and gateway processes: the trade-off" in text
    assert "| batching | c=1 | c=8 |" in text
    assert f"| {report.DEFAULT_VARIANT} | 100 · 1.00 · 3.0 · 1.0 | 800 · 1.00 · 3.0 · 1.0 |" in text
    assert "| fixed 2 ms | 100 · 1.00 · 3.0 · 4.0 | 800 · 1.00 · 3.0 · 4.0 |" in text
    assert text.rstrip().endswith("## Notes\n\nhand-written")
