"""The command line: export works from any checkpoint form; user errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnserve.cli import app
from cnnserve.models.networks import ConvNet

from ..models import tutorial_classes

runner = CliRunner()


def test_export_accepts_a_tutorial_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "tutorial_convnet.pt"
    torch.save(tutorial_classes.ConvNet(10).state_dict(), checkpoint)
    result = runner.invoke(
        app, ["export", "convnet", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "convnet.json").read_text())
    assert meta["files"]["checkpoint"]["file"] == str(checkpoint)
    assert (tmp_path / "out" / "convnet.onnx").stat().st_size > 1_000_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "resnet"], "error: unknown model 'resnet'; served models are: convnet, fcn"),
        (
            ["export", "convnet", "--checkpoint", "/nonexistent/c.pt"],
            "error: checkpoint not found: /nonexistent/c.pt",
        ),
        (["train", "vgg"], "error: unknown model 'vgg'"),
    ],
)
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_wrong_shapes_name_the_mismatch_without_a_traceback(tmp_path: Path) -> None:
    checkpoint = tmp_path / "seven_classes.pt"
    torch.save(ConvNet(7).state_dict(), checkpoint)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cnnserve",
            "export",
            "convnet",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"error: {checkpoint} has wrong parameter shapes: "
        "fc2.weight: checkpoint [7, 512] vs model [10, 512]; "
        "fc2.bias: checkpoint [7] vs model [10]"
    ]
