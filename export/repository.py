"""Export a checkpoint into a model repository as a new version, and make the default one.

A version is written into a hidden folder beside its final place and renamed into it only when
every file is there and parity holds, so a server polling the repository never sees half a
version (a rename within one folder is atomic).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cnnserve.models.checkpoint import load_any_class_count
from cnnserve.models.registry import DEMO_CONFIGS, weights_path
from cnnserve.models.repository import (
    CONFIG_FILE,
    ModelConfig,
    RepositoryError,
    build_spec,
    check_model_name,
    parse_config,
    read_config,
    version_folders,
    write_config,
)
from cnnserve.models.spec import Architecture

from .exporter import ExportPaths, ExportResult, check_installed, export_model


@dataclass(frozen=True)
class ExportedVersion:
    """A version added to a repository."""

    name: str
    version: int
    folder: Path
    num_classes: int
    result: ExportResult


def read_labels(path: Path) -> list[str]:
    """One label per non-empty line of a text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{path}: cannot be read: {exc}") from None
    return [line.strip() for line in lines if line.strip()]


def _model_config(
    model_dir: Path, architecture: Architecture, labels: list[str] | None
) -> ModelConfig:
    """The model's config: the one in the repository, checked against this export, or new."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return parse_config({"architecture": architecture.value, "labels": labels}, "--labels")
    config = read_config(path)
    if config.architecture is not architecture:
        raise RepositoryError(
            f"{path}: the model is a {config.architecture.value}; this checkpoint was exported "
            f"as a {architecture.value}"
        )
    if labels is not None and config.labels is not None and labels != config.labels:
        raise RepositoryError(
            f"{path}: holds other labels than the ones given; edit the config or leave --labels out"
        )
    return config


def export_to_repository(
    architecture: Architecture,
    checkpoint: Path,
    name: str,
    repository: Path,
    version: int | None = None,
    labels: list[str] | None = None,
) -> ExportedVersion:
    """Add ``checkpoint`` to ``repository`` as version ``version`` of model ``name``.

    The class count comes from the checkpoint; labels default to ``"0"``…``"N-1"`` (or the
    model's config). The version defaults to one past the highest there; an existing version
    is never overwritten. The model's ``config.yaml`` is written when it has none.
    """
    check_model_name(name)
    check_installed()  # before the model's folder is made
    if version is not None and version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version}")
    model_dir = repository / name
    config = _model_config(model_dir, architecture, labels)
    network = load_any_class_count(architecture, checkpoint)
    num_classes = int(network.state_dict()[architecture.head].shape[0])
    spec = build_spec(name, config, num_classes)
    existing = (
        [int(folder.name) for folder in version_folders(model_dir)] if model_dir.is_dir() else []
    )
    chosen = version if version is not None else max(existing, default=0) + 1
    target = model_dir / str(chosen)
    if target.exists():
        raise RepositoryError(f"{target} exists; give another --version or remove it first")
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{chosen}-", dir=model_dir))
    try:
        result = export_model(spec, network, ExportPaths.version(staging), checkpoint)
        if not (model_dir / CONFIG_FILE).exists():
            write_config(model_dir / CONFIG_FILE, config)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    final = ExportResult(
        torchscript=target / result.torchscript.name,
        onnx=target / result.onnx.name,
        metadata=target / result.metadata.name,
        max_abs_diff=result.max_abs_diff,
    )
    return ExportedVersion(name, chosen, target, num_classes, final)


def ensure_default_repository(repository: Path) -> list[ExportedVersion]:
    """Export each demo model that ``repository`` lacks, as version 1 from the committed
    weights; the models already there are left as they are."""
    added = []
    for name, config in DEMO_CONFIGS.items():
        if (repository / name).exists():
            continue
        added.append(
            export_to_repository(
                config.architecture, weights_path(name), name, repository, 1, config.labels
            )
        )
    return added
