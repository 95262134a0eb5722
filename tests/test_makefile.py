"""The Makefile's export chain: newer weights make `make model-repository` (and so `make serve`
and `make archive`) add a new version of that model to the default repository, and nothing
newer makes it do nothing. Runs the real make and the real export into a scratch repository
(DEMO_REPOSITORY) from scratch weights (WEIGHTS), so the checkout's files are left alone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cnnserve.models.registry import weights_path
from cnnserve.models.repository import version_folders

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("convnet", "fcn")


def make_repository(repository: Path, weights: Path) -> str:
    """What ``make model-repository`` makes (one stamp per model), on them; make's output
    (failing the test when make fails). The installs are taken as done (``-o``): another make
    in this checkout may be refreshing them."""
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "-o", ".venv/.installed-serve",
         f"DEMO_REPOSITORY={repository}", f"WEIGHTS={weights}",
         *(f"{repository}/.{model}.exported" for model in MODELS)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def versions(repository: Path, model: str) -> list[str]:
    return [folder.name for folder in version_folders(repository / model)]


def test_newer_weights_become_a_new_version_once(
    tmp_path: Path, tutorial_checkpoints: dict[str, Path]
) -> None:
    repository, weights = tmp_path / "model_repository", tmp_path / "weights"
    weights.mkdir()
    for model in MODELS:
        shutil.copy2(weights_path(model), weights / f"{model}.pt")

    make_repository(repository, weights)
    assert versions(repository, "convnet") == ["1"] and versions(repository, "fcn") == ["1"]
    first_onnx = (repository / "convnet/1/model.onnx").read_bytes()

    # Nothing newer: nothing exported.
    assert "cnnserve export" not in make_repository(repository, weights)
    assert versions(repository, "convnet") == ["1"]

    # A retrained ConvNet (another checkpoint in its place): version 2 of it alone, from it.
    shutil.copy(tutorial_checkpoints["convnet10"], weights / "convnet.pt")
    output = make_repository(repository, weights)
    assert "cnnserve export convnet" in output and "export fcn" not in output
    assert versions(repository, "convnet") == ["1", "2"] and versions(repository, "fcn") == ["1"]
    assert (repository / "convnet/2/model.onnx").read_bytes() != first_onnx
    assert "cnnserve export" not in make_repository(repository, weights)

    # Weights only touched (a checkpoint copied over with the same bytes): exported again too,
    # as make goes by times.
    later = (repository / ".fcn.exported").stat().st_mtime + 1
    os.utime(weights / "fcn.pt", (later, later))
    assert "cnnserve export fcn" in make_repository(repository, weights)
    assert versions(repository, "fcn") == ["1", "2"]
    assert "cnnserve export" not in make_repository(repository, weights)
