"""Overload against a real gateway process: bounded queue, fast refusals, recovery.

Runs :func:`cnnserve.bench.overload.run_overload` briefly at four times the measured
capacity and checks what must hold whatever the machine's speed; the figures themselves
(latencies, RSS) are for ``cnnserve overload`` and docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

from cnnserve.bench.overload import run_overload

MAX_QUEUE_SIZE = 8


def test_overload_is_refused_not_queued(artifacts_dir: Path, tmp_path: Path) -> None:
    """At 4× capacity: some calls are refused RESOURCE_EXHAUSTED, none fails otherwise,
    others are still answered, the queue never holds more than its limit, and once the load
    drops every call succeeds again."""
    report = run_overload(
        artifacts_dir,
        tmp_path / "gateway.log",
        multiples=(4.0,),
        duration_s=2.0,
        max_queue_size=MAX_QUEUE_SIZE,
        max_batch_size=4,
        processes=1,
    )
    assert report.capacity.succeeded > 0 and report.capacity.errors == {}
    (phase,) = report.phases
    assert phase.refused > 0, phase.result
    assert phase.other_errors == {}, phase.result
    assert phase.result.succeeded > 0
    assert 0 < phase.max_queue_depth <= MAX_QUEUE_SIZE
    assert report.recovery is not None
    assert report.recovery.errors == {} and report.recovery.succeeded > 0
    assert "| 4× |" in report.markdown()
