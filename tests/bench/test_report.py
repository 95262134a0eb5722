"""The report computes the issue's targets as ratios of figures from the same run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnserve.bench import report


def _row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "backend": "onnxruntime", "model": "convnet", "side": 28, "items": 1, "concurrency": 64,
        "batching": True, "requests_per_s": 1000.0, "images_per_s": 1000.0, "p50_ms": 1.0,
        "p90_ms": 2.0, "p99_ms": 3.0, "mean_batch_size": 12.0, "errors": {},
        "echo_requests_per_s": 1250.0, "model_alone_batch": 12, "model_alone_images_per_s": 5000.0,
        "model_alone_p50_ms": 0.8, "gateway_rss_start_mb": 300.0, "gateway_rss_end_mb": 310.0,
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
    ]
    text = report.render(rows, "test machine", "cnnserve bench", report.plot(rows, tmp_path))
    assert "| batching on ÷ off, 1-image ConvNet, c=64 (ORT) | ≥ 5× | 6.67 | met |" in text
    assert "| gateway+ORT ÷ bare gRPC echo, 1-image, c=64 | ≥ 0.60 | 0.80 | met |" in text
    assert "| 32-image requests ÷ model alone at batch 32 (ORT) | ≥ 0.80 | 0.90 | met |" in text
    assert "| p50 added over the model alone at c=1 (ms) | ≤ 0.5 ms | 0.80 | **not met** |" in text
    assert (
        "gateway→TorchServe ÷ TorchServe REST (own batching), c=64 | ≥ 3× | — | not measured"
        in text
    )
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "latency.png").stat().st_size > 1000
