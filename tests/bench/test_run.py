"""``cnnserve bench --report-only``: the report re-rendered from a run's rows and the notes."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cnnserve.bench.run import NOTES_DIR
from cnnserve.cli import app

from .test_report import _row

runner = CliRunner()


def test_report_only_renders_the_last_run_with_the_notes(tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    (bench / NOTES_DIR).mkdir(parents=True)
    rows = [_row(), _row(payload="png", requests_per_s=900.0)]
    (bench / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"rows": 2, "command": "cnnserve bench --profile quick", "machine": "test box"}
    (bench / "summary.json").write_text(json.dumps(summary))
    (bench / NOTES_DIR / "2-second.md").write_text("## Second note\n")
    (bench / NOTES_DIR / "1-first.md").write_text("## First note\n")
    result = runner.invoke(app, ["bench", "--report-only", "--docs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "benchmarks.md").read_text()
    assert "Machine: test box." in text
    assert "Produced by `cnnserve bench --profile quick`" in text  # the run's, not this one
    png = "gateway (onnxruntime), 1 PNG/request ÷ 1 FP32 tensor/request, c=64"
    assert f"| {png} | ≥ 0.8 | 0.90 | met |" in text
    assert text.index("## First note") < text.index("## Second note")
    assert (bench / "throughput.png").is_file()
    assert json.loads((bench / "summary.json").read_text()) == summary


def test_report_only_without_a_run_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", "--report-only", "--docs", str(tmp_path)])
    assert result.exit_code == 2
    assert "run the benchmarks first" in result.output
