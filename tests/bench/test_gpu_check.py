"""The GPU check runs on a CPU in its dry mode: every figure line, skips named, tables written.

The same entry points a GPU host uses: ``cnnserve gpu-check``, and ``bench/gpu.sh`` with a
Python where cnnserve is not installed (as on the lent GPU hosts), so its symlinked package
tree is what gets imported and ``python -m cnnserve.bench.gpu_check`` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from cnnserve.bench.gpu_check import VARIANTS

REPO = Path(__file__).resolve().parents[2]


def _figures(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


def test_dry_run_measures_what_a_cpu_can_and_names_what_it_cannot(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gpu"
    run = subprocess.run(
        [sys.executable, "-m", "cnnserve", "gpu-check", "--dry-run", "--out", str(out),
         "--artifacts", str(artifacts_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    figures = _figures(out)
    # Every figure went to stdout as one JSON line, too.
    assert [json.loads(line) for line in run.stdout.splitlines()] == figures
    assert figures[0]["phase"] == "machine"
    assert figures[0]["device"] == "cpu"
    model = [f for f in figures if f["phase"] == "model"]
    for variant in VARIANTS:
        mine = [f for f in model if f["variant"] == variant.name and f["model"] == "convnet"]
        if variant.needs_cuda:
            assert mine == [
                {"phase": "model", "model": "convnet", "side": 28, "variant": variant.name,
                 "skipped": "needs CUDA"}
            ]  # fmt: skip
        else:
            assert [f["batch"] for f in mine] == [1, 4]
            assert all(f["images_per_s"] > 0 and f["p50_ms"] > 0 for f in mine)
    gateway = [f for f in figures if f["phase"] == "gateway"]
    assert [f["load"] for f in gateway] == [
        "1-image FP32",
        "1-image UINT8",
        "4-image UINT8",
        "1-image PNG",
        "3-image PNG",
    ]
    assert all(f["errors"] == {} and f["requests_per_s"] > 0 for f in gateway)
    # No GPU here: the gateway exports no NVML readings, and the figures say so.
    assert all(f["gpu_memory_used_mb"] is None for f in gateway)
    # The PNG path end to end: images/s counts every digit of a 3-image request, and its
    # batches hold whole requests (1 or 2 of them at concurrency 2).
    png = gateway[-1]
    assert png["images_per_s"] == pytest.approx(3 * png["requests_per_s"], abs=0.5)
    assert 3 <= png["mean_batch_size"] <= 6
    assert [f["phase"] for f in figures[-1:]] == ["echo"]
    report = (out / "gpu_check.md").read_text()
    assert "| channels_last fp16 | needs CUDA | needs CUDA |" in report
    assert "| 4-image UINT8 | 2 |" in report
    assert "| 3-image PNG | 2 |" in report
    assert "cnnserve gpu-check --dry-run" in report


def test_without_the_exported_models_it_says_what_to_do(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cnnserve", "gpu-check", "--dry-run", "--out", str(tmp_path),
         "--artifacts", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr == (
        f"error: convnet.pt, fcn.pt not in {tmp_path}: export them first (make export, or "
        "cnnserve export <model> --out DIR) and pass --artifacts\n"
    )


def test_gpu_sh_runs_without_an_installed_cnnserve(artifacts_dir: Path, tmp_path: Path) -> None:
    # A Python that sees the dependencies but not the editable install (no .pth processing).
    python = tmp_path / "python-without-cnnserve"
    site_packages = sysconfig.get_paths()["purelib"]
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}" '
        f'exec {sys.executable} -S "$@"\n'
    )
    python.chmod(0o755)
    assert subprocess.run([str(python), "-c", "import cnnserve"], check=False).returncode != 0
    out = tmp_path / "gpu"
    run = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), str(out), "--dry-run", "--skip-gateway"],
        env={"PYTHON": str(python), "ARTIFACTS": str(artifacts_dir), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    figures = _figures(out)
    assert {f["phase"] for f in figures} == {"machine", "model"}
    assert any(f.get("variant") == "eager fp32" and f.get("batch") == 4 for f in figures)
