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


TS_GAIN, PNG, REST, PREDICT, ECHO, BIG, FRONTENDS = (t.name for t in report.TARGETS)


def test_targets_are_ratios_with_verdicts(tmp_path: Path) -> None:
    rows = [
        _row(),
        _row(payload="png", requests_per_s=850.0, images_per_s=850.0),
        _row(transport="rest", requests_per_s=600.0, images_per_s=600.0),
        _row(
            items=32,
            concurrency=8,
            images_per_s=4500.0,
            model_alone_batch=32,
            model_alone_images_per_s=5000.0,
        ),
        _row(variant=report.SHARED_BATCHER, mean_batch_size=11.0, requests_per_s=1100.0),
        _row(variant=report.INDEPENDENT, mean_batch_size=6.0, requests_per_s=1050.0),
        # A delay variant and a perf_analyzer row at c=64 must not be taken for the default.
        _row(variant="delay 0", requests_per_s=10.0, overrides={"max_batch_delay_ms": "0"}),
        _row(client="perf_analyzer", requests_per_s=5.0, perf_analyzer_ok=True),
    ]
    measured = report.measure(rows)
    assert {name: figure and (figure.value, figure.met) for name, figure in measured.items()} == {
        TS_GAIN: None,
        PNG: (pytest.approx(0.85), True),
        REST: (pytest.approx(0.6), False),
        PREDICT: None,
        ECHO: (pytest.approx(0.8), False),
        BIG: (pytest.approx(0.9), True),
        FRONTENDS: (pytest.approx(11 / 12), True),
    }
    text = report.render(rows, "test machine", "cnnserve bench", report.plot(rows, tmp_path))
    # The targets table: each figure with its verdict and both sides, or why there is none.
    assert (
        f"| {REST} | ≥ 0.7 | 0.60 | **not met** | REST binary: 600 req/s · p50 1.0 / p99 3.0 ms"
        in text
    )
    assert "2 independent gateways: 1050 req/s · p50 1.0 / p99 3.0 ms · batch 6.0" in text
    assert f"| {TS_GAIN} | ≥ 3.0 | — | not measured |" in text
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert (tmp_path / "latency.png").stat().st_size > 1000


def test_torchserve_targets_take_torchserve_alone_at_its_best_worker_count() -> None:
    rows = [
        _row(backend="torchserve", requests_per_s=900.0, torchserve_rss_mb=800.0),
        _row(
            backend="torchserve",
            payload="png",
            requests_per_s=700.0,
            torchserve_rss_mb=810.0,
            gateway_cpu_ms_per_request=0.6,
            torchserve_cpu_ms_per_request=0.8,
        ),
        _row(backend="torchserve", payload="png", transport="predict", requests_per_s=500.0),
        _row(payload="png", transport="predict", requests_per_s=50.0),
        _rest_row(variant="1 worker", torchserve_workers=1, requests_per_s=150.0),
        _rest_row(variant="2 workers", torchserve_workers=2),
    ]
    measured = report.measure(rows)
    gain, friendly = measured[TS_GAIN], measured[PREDICT]
    assert gain is not None and friendly is not None
    assert (gain.value, gain.met) == (pytest.approx(700 / 200), True)
    assert (friendly.value, friendly.met) == (pytest.approx(500 / 200), True)
    text = report.render(rows, "m", "cnnserve bench", [])
    assert "TorchServe alone (2 workers per model, the better count; batchSize 32, 5 ms)" in text
    assert "gateway → TorchServe: 700 req/s" in text
    assert "CPU gateway 0.60 + TorchServe 0.80 ms/request" in text
    assert "| gateway 0.60 + TorchServe 0.80 |" in text
    assert "/predict (torchserve): 500 req/s" in text
    assert "## TorchServe with and without the gateway" in text
    assert (
        "| TorchServe REST alone | png | TorchServe REST | 64 | TorchServe's own, 2 workers | 200 |"
        in text
    )
    assert "HTTP_503:2" in text


def test_perf_analyzer_rows_sit_beside_the_load_generators() -> None:
    rows = [
        _row(concurrency=1, requests_per_s=600.0),
        _row(concurrency=1, client="perf_analyzer", requests_per_s=550.0, perf_analyzer_ok=True,
             perf_analyzer_mean_batch_size=1.0),
        _row(items=32, concurrency=4, client="perf_analyzer", perf_analyzer_ok=False,
             perf_analyzer_reason="perf_analyzer is not available here: no | pipes"),
    ]  # fmt: skip
    text = report.render(rows, "m", "cnnserve bench", [])
    assert "## Two load generators, one gateway" in text
    assert "| 1 | 1 | 600 · 1.00 · 3.00 · 12.0 | 550 · 1.00 · 3.00 · 1.0 |" in text
    assert "| 32 | 4 | — | not measured: perf_analyzer is not available here: no / pipes |" in text
    # perf_analyzer's rows are not scenarios of the project's load generator.
    assert text.count("| onnxruntime | convnet | 28 | 1 | tensor | gRPC | 1 |") == 1


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
