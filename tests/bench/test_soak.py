"""A short soak (a few seconds) through a real gateway process with the gateway stalled
mid-run: every request sent gets an answer, the right one (`cnnserve soak`
runs the long version, with TorchServe replicas killed and restarted)."""

from __future__ import annotations

from pathlib import Path

from cnnserve.bench.soak import SoakOptions, run_soak


def test_a_short_soak_loses_nothing(artifacts_dir: Path, tmp_path: Path) -> None:
    """Mixed valid/invalid traffic over gRPC and HTTP, faults injected: nothing lost, no
    wrong answer, invalid requests refused as bad input, valid ones answered."""
    tally = run_soak(
        SoakOptions(
            artifacts_dir=artifacts_dir,
            work_dir=tmp_path,
            backend="onnxruntime",
            duration_s=4.0,
            max_requests=5_000,
            concurrency=4,
            fault_interval_s=1.0,
            stall_s=0.5,
        )
    )
    assert tally.faults, "no fault was injected"
    assert not tally.lost, tally.summary()
    assert not tally.failed, tally.summary()
    assert tally.sent == tally.succeeded + tally.rejected.total()
    assert tally.succeeded > 0
    assert tally.rejected["invalid_input"] > 0 and tally.rejected["unknown_model"] > 0
