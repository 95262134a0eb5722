"""Build ``convnet.mar`` and ``fcn.mar`` with torch-model-archiver.

Each archive holds one exported artifact (TorchScript ``.pt`` or ONNX ``.onnx``, chosen here),
the model's entry file from ``handlers/`` and a ``model-config.yaml`` with TorchServe's
per-model settings. The handler finds the artifact through the archive's manifest, so the
format chosen here is the format served.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cnnserve import handlers
from cnnserve.models.registry import MODELS
from cnnserve.models.runtime import ARTIFACT_SUFFIX, ArtifactFormat
from cnnserve.models.spec import ModelSpec
from cnnserve.settings import Settings

from . import TorchServeError

MODEL_CONFIG_FILE = "model-config.yaml"


@dataclass(frozen=True)
class Archive:
    """One archive written into the model store."""

    model: str
    path: Path
    artifact: Path


def archive_name(model: str) -> str:
    """The archive file of ``model`` in a model store."""
    return f"{model}.mar"


def handler_file(spec: ModelSpec) -> Path:
    """The TorchServe entry file of ``spec`` (``handlers/<name>_handler.py``)."""
    return Path(handlers.__file__).parent / f"{spec.name}_handler.py"


def model_config(settings: Settings, half: bool) -> dict[str, Any]:
    """TorchServe's per-model settings (``model-config.yaml``) from cnnserve's settings."""
    return {
        "minWorkers": settings.torchserve_workers_per_model,
        "maxWorkers": settings.torchserve_workers_per_model,
        "batchSize": settings.torchserve_batch_size,
        "maxBatchDelay": settings.torchserve_max_batch_delay_ms,
        "responseTimeout": settings.torchserve_response_timeout_s,
        # Read by cnnserve.handlers.service.load_model; TorchServe ignores this section.
        "handler": {"half": half, "threads": settings.inference_threads},
    }


def archive_models(
    artifacts_dir: Path,
    model_store: Path,
    artifact_format: ArtifactFormat,
    half: bool,
    settings: Settings,
) -> list[Archive]:
    """Archive every served model from ``artifacts_dir`` into ``model_store`` (overwriting)."""
    if half and artifact_format != "torchscript":
        raise TorchServeError(
            "half precision is offered for TorchScript artifacts only; "
            "drop --half or use --format torchscript"
        )
    artifacts = {
        name: artifacts_dir / f"{name}{ARTIFACT_SUFFIX[artifact_format]}" for name in MODELS
    }
    for name, artifact in artifacts.items():
        if not artifact.is_file():
            raise TorchServeError(
                f"{artifact} not found; export it first: "
                f"cnnserve export {name} --out {artifacts_dir}"
            )
    model_store.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_dump(model_config(settings, half), sort_keys=False)
    return [_archive(MODELS[name], path, model_store, config) for name, path in artifacts.items()]


def _archive(spec: ModelSpec, artifact: Path, model_store: Path, config: str) -> Archive:
    with tempfile.TemporaryDirectory(prefix="cnnserve-archive-") as scratch:
        config_path = Path(scratch) / MODEL_CONFIG_FILE
        config_path.write_text(config)
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            spec.name,
            "--version",
            metadata.version("cnnserve"),
            "--serialized-file",
            str(artifact),
            "--handler",
            str(handler_file(spec)),
            "--config-file",
            str(config_path),
            "--export-path",
            str(model_store),
            "--force",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    path = model_store / archive_name(spec.name)
    if result.returncode != 0 or not path.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TorchServeError(f"torch-model-archiver failed for {spec.name}: {detail[0]}")
    return Archive(spec.name, path, artifact)
