"""Triton's perf_analyzer, unmodified, as a second load generator beside the project's own.

It runs through ``tools/perf_analyzer.sh`` (README, "Triton's perf_analyzer") against the same
gateway the suite's own load generator measures, with the same kind of request: one FP32
``input`` tensor per item, written by ``tools/perf_analyzer_data.py``. A request of N items is
perf_analyzer's ``-b N`` (the data repeated N times). Concurrency 1 uses its synchronous
calls (one thread, as a lone caller); higher concurrencies its asynchronous ones, so 64
requests in flight do not need 64 client threads on a small host.

What it reports is read from its own output: throughput and latency percentiles from its CSV
(``-f``), the request count and the server's inference and execution counts (so the mean
batch the gateway formed) from the summary it prints. Where perf_analyzer cannot be had on
this host (the script exits 3), :func:`run_perf_analyzer` says so instead of failing the run.
"""

from __future__ import annotations

import csv
import logging
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: The repository root: perf_analyzer's wrapper and data writer live in its tools/ folder.
REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "tools" / "perf_analyzer.sh"
DATA_WRITER = REPO_ROOT / "tools" / "perf_analyzer_data.py"
#: tools/perf_analyzer.sh's status when perf_analyzer cannot be had here.
UNAVAILABLE = 3
#: Windows of 2 s, stable within 50 % over three in a row, at most 8 tries: a shared 2-core
#: host rarely gives perf_analyzer's own default (10 %) within a bounded time.
WINDOW_MS = 2000
STABILITY_PERCENT = 50
MAX_TRIALS = 8
#: Seconds one run may take before it is abandoned (warm-up, up to MAX_TRIALS windows).
TIMEOUT_S = 120


@dataclass(frozen=True)
class PerfAnalyzerResult:
    """One perf_analyzer run: figures when it measured, else why not (``reason``)."""

    ok: bool
    reason: str = ""
    requests: int = 0
    requests_per_s: float = 0.0
    images_per_s: float = 0.0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    server_inferences: int = 0
    server_executions: int = 0

    @property
    def mean_batch_size(self) -> float | None:
        """Items per model execution the gateway reported over the measured windows."""
        if not self.server_executions:
            return None
        return self.server_inferences / self.server_executions


def command(
    grpc_target: str, model: str, items: int, concurrency: int, data: Path, csv_out: Path
) -> list[str]:
    """The perf_analyzer command line for one point."""
    args = [
        str(SCRIPT), "-m", model, "-i", "grpc", "-u", grpc_target, "--input-data", str(data),
        "-b", str(items), "--concurrency-range", str(concurrency),
        "--measurement-interval", str(WINDOW_MS), "--stability-percentage",
        str(STABILITY_PERCENT), "--max-trials", str(MAX_TRIALS), "-f", str(csv_out),
    ]  # fmt: skip
    if concurrency > 1:
        args.append("--async")
    return args


def write_input_data(path: Path, side: int) -> None:
    """perf_analyzer's ``--input-data`` file: FP32 ``input`` items of ``3×side×side``."""
    subprocess.run(
        [sys.executable, str(DATA_WRITER), str(path), "--input", "input",
         "--shape", f"3,{side},{side}"],
        check=True,
    )  # fmt: skip


def run_perf_analyzer(
    grpc_target: str, model: str, side: int, items: int, concurrency: int
) -> PerfAnalyzerResult:
    """Measure one point with perf_analyzer; never raises for perf_analyzer's own failures."""
    if not SCRIPT.is_file():
        return PerfAnalyzerResult(False, f"{SCRIPT} not found (not a source checkout)")
    with tempfile.TemporaryDirectory(prefix="cnnserve-pa-") as scratch:
        data, csv_out = Path(scratch) / "input.json", Path(scratch) / "latency.csv"
        write_input_data(data, side)
        try:
            done = subprocess.run(
                command(grpc_target, model, items, concurrency, data, csv_out),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return PerfAnalyzerResult(False, f"perf_analyzer ran past {TIMEOUT_S} s")
        if done.returncode == UNAVAILABLE:
            return PerfAnalyzerResult(False, _last_line(done.stderr) or "perf_analyzer unavailable")
        if done.returncode != 0 or not csv_out.is_file():
            why = _last_line(done.stdout + "\n" + done.stderr)
            return PerfAnalyzerResult(False, f"perf_analyzer exited {done.returncode}: {why}")
        return parse(done.stdout, csv_out.read_text(), items)


def parse(stdout: str, csv_text: str, items: int) -> PerfAnalyzerResult:
    """Figures from perf_analyzer's printed summary and its CSV (latencies in µs there)."""
    rows = list(csv.DictReader(csv_text.splitlines()))
    if not rows:
        return PerfAnalyzerResult(False, "perf_analyzer wrote no measurement")
    row = rows[-1]
    images_per_s = float(row["Inferences/Second"])

    def count(label: str) -> int:
        found = re.findall(rf"{label}: (\d+)", stdout)
        return int(found[-1]) if found else 0

    return PerfAnalyzerResult(
        ok=True,
        requests=count("Request count"),
        requests_per_s=images_per_s / items,
        images_per_s=images_per_s,
        p50_ms=float(row["p50 latency"]) / 1000,
        p90_ms=float(row["p90 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        server_inferences=count("Inference count"),
        server_executions=count("Execution count"),
    )


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""
