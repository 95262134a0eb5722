"""Fixtures shared across the suite: exported artifacts built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnserve.export.exporter import export_model
from cnnserve.models.checkpoint import load_network
from cnnserve.models.registry import MODELS


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both models exported from the committed weights (TorchScript, ONNX, JSON)."""
    out = tmp_path_factory.mktemp("artifacts")
    for spec in MODELS.values():
        export_model(spec, load_network(spec, spec.weights_path), out, spec.weights_path)
    return out
