"""``cnnserve bench``: run the suite and regenerate docs/benchmarks.md."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

from cnnserve.errors import MissingExtraError, require_extra
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.process import find_java

from . import report
from .suite import GATEWAY_BACKENDS, machine_description, profile, run_suite

logger = logging.getLogger(__name__)

#: Hand-written sections (analysis, profiles, GPU) appended to the report in name order.
NOTES_DIR = "notes"


def default_backends() -> list[str]:
    """Every gateway backend; torchserve (and TorchServe alone) only where TorchServe and
    Java are installed."""
    try:
        require_extra("torchserve", "the torchserve backend", "ts")
        find_java()
    except (MissingExtraError, TorchServeError) as exc:
        logger.warning("skipping the torchserve backend and baseline: %s", exc)
        return [b for b in GATEWAY_BACKENDS if b != "torchserve"]
    return list(GATEWAY_BACKENDS)


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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per metrics scrape
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
    machine = machine_description()
    rows = run_suite(
        profile(profile_name, backends), artifacts, bench_dir, duration_s, warmup_s, processes
    )
    command = "cnnserve " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return write_report(rows, docs_dir, machine, command)


def rerender(docs_dir: Path) -> Path:
    """The report again from the last run's rows (``bench/results.jsonl``) and the notes."""
    bench_dir = docs_dir / "bench"
    try:
        summary = json.loads((bench_dir / "summary.json").read_text())
        lines = (bench_dir / "results.jsonl").read_text().splitlines()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc.filename} not found: run the benchmarks first") from None
    rows = [json.loads(line) for line in lines if line.strip()]
    return write_report(rows, docs_dir, summary["machine"], summary["command"])


def write_report(rows: list[report.Row], docs_dir: Path, machine: str, command: str) -> Path:
    """Plots, ``benchmarks.md`` and ``bench/summary.json`` from measured rows."""
    bench_dir = docs_dir / "bench"
    plots = report.plot(rows, bench_dir)
    notes = [path.read_text() for path in sorted((bench_dir / NOTES_DIR).glob("*.md"))]
    text = report.render(rows, machine, command, plots, notes)
    path = docs_dir / "benchmarks.md"
    path.write_text(text)
    (bench_dir / "summary.json").write_text(
        json.dumps({"rows": len(rows), "command": command, "machine": machine}, indent=2) + "\n"
    )
    return path
