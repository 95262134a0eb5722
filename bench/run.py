"""``cnnserve bench``: run the suite and regenerate docs/benchmarks.md."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from . import report
from .suite import machine_description, profile, run_suite


def run_benchmarks(
    profile_name: str,
    backends: list[str],
    artifacts: Path,
    docs_dir: Path,
    duration_s: float,
    warmup_s: float,
    processes: int,
) -> Path:
    """Run the scenarios of ``profile_name`` and write the report; returns its path."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    missing = [
        p
        for p in ("convnet.onnx", "convnet.pt", "fcn.onnx", "fcn.pt")
        if not (artifacts / p).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"missing artifacts in {artifacts}: {', '.join(missing)}; run `make export`"
        )
    bench_dir = docs_dir / "bench"
    rows = run_suite(
        profile(profile_name, backends), artifacts, bench_dir, duration_s, warmup_s, processes
    )
    plots = report.plot(rows, bench_dir)
    command = "cnnserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = report.render(rows, machine_description(), command, plots)
    path = docs_dir / "benchmarks.md"
    path.write_text(text)
    (bench_dir / "summary.json").write_text(
        json.dumps({"rows": len(rows), "command": command}, indent=2) + "\n"
    )
    return path
