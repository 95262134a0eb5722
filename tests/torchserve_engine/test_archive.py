"""Model archives: one artifact, the entry file and model-config.yaml per model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import ArtifactFormat
from cnnserve.settings import Settings
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.archive import MODEL_CONFIG_FILE, archive_models, handler_file


@pytest.mark.parametrize(("artifact_format", "suffix"), [("torchscript", ".pt"), ("onnx", ".onnx")])
def test_both_archives_carry_the_chosen_artifact(
    artifacts_dir: Path, tmp_path: Path, artifact_format: ArtifactFormat, suffix: str
) -> None:
    settings = Settings(
        torchserve_batch_size=1,
        torchserve_max_batch_delay_ms=7,
        torchserve_response_timeout_s=33,
        torchserve_call_timeout_s=4.5,  # the gateway's: never in an archive
    )
    store = tmp_path / "store"
    archives = archive_models(artifacts_dir, store, artifact_format, False, settings)
    assert sorted(a.model for a in archives) == ["convnet", "fcn"]
    for built in archives:
        assert built.path == store / f"{built.model}.mar"
        with zipfile.ZipFile(built.path) as mar:
            manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
            assert manifest["modelName"] == built.model
            assert manifest["serializedFile"] == f"{built.model}{suffix}"
            assert manifest["handler"] == f"{built.model}_handler.py"
            assert (
                mar.read(manifest["serializedFile"])
                == (artifacts_dir / f"{built.model}{suffix}").read_bytes()
            )
            assert mar.read(manifest["handler"]) == handler_file(get_spec(built.model)).read_bytes()
            config = yaml.safe_load(mar.read(manifest["configFile"]))
        assert manifest["configFile"] == MODEL_CONFIG_FILE
        assert config == {
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 1,
            "maxBatchDelay": 7,
            "responseTimeout": 33,
            "handler": {"half": False, "threads": settings.inference_threads},
        }


def test_rebuilding_overwrites(artifacts_dir: Path, tmp_path: Path) -> None:
    archive_models(artifacts_dir, tmp_path, "torchscript", False, Settings())
    (built, _) = archive_models(artifacts_dir, tmp_path, "torchscript", True, Settings())
    with zipfile.ZipFile(built.path) as mar:
        assert yaml.safe_load(mar.read(MODEL_CONFIG_FILE))["handler"]["half"] is True


def test_half_precision_needs_torchscript(artifacts_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TorchServeError, match="TorchScript artifacts only"):
        archive_models(artifacts_dir, tmp_path, "onnx", True, Settings())
    assert not list(tmp_path.iterdir())


def test_a_missing_artifact_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(TorchServeError, match="export it first: cnnserve export convnet --out"):
        archive_models(tmp_path, tmp_path / "store", "torchscript", False, Settings())
    assert not (tmp_path / "store").exists()
