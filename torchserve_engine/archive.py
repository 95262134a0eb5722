"""Build one TorchServe archive per (model, version) of a model repository.

An archive holds the version's exported artifact (TorchScript ``model.pt`` or ONNX
``model.onnx``, as the model's ``config.yaml`` or the server's setting chooses), the model's
``config.yaml`` and the version's ``export.json`` as extra files, the one entry file
``handlers/model_handler.py`` and a ``model-config.yaml`` with TorchServe's per-model settings.
Its manifest carries the model's name and the repository version as the model version, so
TorchServe serves it as ``<name>`` version ``<N>``; the handler builds the model's spec from
the packed files, never from code.

Archives are named ``<name>.<N>.mar`` in the model store: TorchServe resolves an archive by
its file name directly in the store, so versions of one model need names of their own. Each
is written beside its final name and renamed into it, so a TorchServe registering it (or
starting) never reads half an archive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cnnserve import handlers
from cnnserve.errors import require_extra
from cnnserve.models.repository import (
    CONFIG_FILE,
    EXPORT_FILE,
    ModelVersion,
    Repository,
    write_config,
)
from cnnserve.models.runtime import ArtifactFormat, features_artifact
from cnnserve.settings import Settings

from . import TorchServeError

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model-config.yaml"
MANIFEST = "MAR-INF/MANIFEST.json"
#: The archive member holding the SHA-256 of everything it was built from, so a registered
#: copy can be told apart from a rebuilt one without comparing archives byte by byte (the
#: archiver stamps each build with its time).
DIGEST_FILE = "inputs.sha256"
ARCHIVE_SUFFIX = ".mar"
#: The entry file every archive runs (TorchServe imports it as a top-level module).
HANDLER_FILE = Path(handlers.__file__).parent / "model_handler.py"


@dataclass(frozen=True)
class Archive:
    """One archive in a model store."""

    model: str
    version: int
    path: Path
    artifact: Path
    #: What it was built from (:data:`DIGEST_FILE`): equal digests, equal archives.
    digest: str


def archive_name(model: str, version: int) -> str:
    """The archive file of ``model`` version ``version`` in a model store."""
    return f"{model}.{version}{ARCHIVE_SUFFIX}"


def version_label(model: str, version: str | int) -> str:
    """``<model>/<version>``: one registered model version, as TorchServe's URLs name it."""
    return f"{model}/{version}"


def store_archives(model_store: Path) -> list[Path]:
    """The archives in ``model_store`` (hidden files, e.g. one being written, left out)."""
    if not model_store.is_dir():
        return []
    return sorted(
        path
        for path in model_store.glob(f"*{ARCHIVE_SUFFIX}")
        if path.is_file() and not path.name.startswith(".")
    )


def archived_digest(path: Path) -> str | None:
    """The digest an archive was built with; ``None`` for no archive or one without it."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(DIGEST_FILE).decode().strip()
    except (OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        return None


def archived_label(path: Path) -> str:
    """The model version an archive registers as (``<name>/<version>``, from its manifest)."""
    try:
        with zipfile.ZipFile(path) as archive:
            model = json.loads(archive.read(MANIFEST))["model"]
        return version_label(str(model["modelName"]), str(model["modelVersion"]))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise TorchServeError(f"{path} is not a TorchServe archive: {exc}") from None


def model_config(settings: Settings, half: bool) -> dict[str, Any]:
    """TorchServe's per-model settings (``model-config.yaml``) from cnnserve's settings."""
    return {
        "minWorkers": settings.torchserve_workers_per_model,
        "maxWorkers": settings.torchserve_workers_per_model,
        "batchSize": settings.torchserve_batch_size,
        "maxBatchDelay": settings.torchserve_max_batch_delay_ms,
        "responseTimeout": settings.torchserve_response_timeout_s,
        # Read by cnnserve.handlers.service.load_model; TorchServe ignores this section.
        "handler": {
            "half": half,
            "threads": settings.inference_threads,
            # The largest image a worker decodes: the gateway's own limit.
            "max_image_pixels": settings.max_image_pixels,
        },
    }


def served_format(version: ModelVersion, default: ArtifactFormat) -> ArtifactFormat:
    """The artifact a version is served from: its model's ``artifact_format``, else ``default``."""
    return version.config.artifact_format or default


def archive_version(
    version: ModelVersion,
    model_store: Path,
    settings: Settings,
    artifact_format: ArtifactFormat | None = None,
    half: bool | None = None,
) -> Archive:
    """Archive one repository version into ``model_store`` as ``<name>.<N>.mar``.

    An archive already there built from the same inputs (same digest) is kept as it is;
    otherwise it is replaced. ``artifact_format`` is the default for a model whose config
    names none (default: ``settings.torchserve_artifact_format``); ``half`` defaults to
    ``settings.half_precision``. Raises :class:`TorchServeError` saying what is missing or what
    the archiver reported.
    """
    name = version.spec.name
    chosen = served_format(version, artifact_format or settings.torchserve_artifact_format)
    half = settings.half_precision if half is None else half
    if half and chosen != "torchscript":
        raise TorchServeError(
            f"{name} version {version.version}: half precision is offered for TorchScript "
            f"artifacts only and this model is served from {chosen}; drop --half or serve "
            "it as torchscript"
        )
    artifact = version.artifact(chosen)
    export = version.path / EXPORT_FILE
    for needed in (artifact, export):
        if not needed.is_file():
            raise TorchServeError(
                f"{needed} not found; export the version again "
                f"(cnnserve export --name {name} --repository ...)"
            )
    model_store.mkdir(parents=True, exist_ok=True)
    target = model_store / archive_name(name, version.version)
    with tempfile.TemporaryDirectory(prefix=".archive-", dir=model_store) as scratch:
        work = Path(scratch)
        config_path = work / MODEL_CONFIG_FILE
        config_path.write_text(yaml.safe_dump(model_config(settings, half), sort_keys=False))
        # The config as the gateway read and validated it (the file may have changed since);
        # the handler reads it back with the same parser.
        repository_config = work / CONFIG_FILE
        write_config(repository_config, version.config)
        shutil.copyfile(export, work / EXPORT_FILE)
        # The feature artifact rides beside the artifact (the handler runs it for requests
        # that ask for feature maps); a version exported before it existed has none.
        features = features_artifact(artifact)
        beside = [features] if features.is_file() else []
        extra = [repository_config, work / EXPORT_FILE, work / DIGEST_FILE, *beside]
        inputs = (
            config_path,
            repository_config,
            work / EXPORT_FILE,
            artifact,
            HANDLER_FILE,
            *beside,
        )
        digest = _digest(inputs)
        if archived_digest(target) == digest:
            return Archive(name, version.version, target, artifact, digest)
        (work / DIGEST_FILE).write_text(digest + "\n")
        # The archiver runs as a process of its own: a missing one is named here, not by
        # the last line of its traceback.
        require_extra("torchserve", "archiving for TorchServe", "model_archiver")
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            str(version.version),
            "--serialized-file",
            str(artifact),
            "--handler",
            str(HANDLER_FILE),
            "--extra-files",
            ",".join(str(path) for path in extra),
            "--config-file",
            str(config_path),
            "--export-path",
            str(work),
        ]
        # The archiver stages files in <temp dir>/<model name>: a private temp dir keeps
        # archives of one model built at once (one per replica's store) apart.
        env = dict(os.environ, TMPDIR=str(work))
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        built = work / f"{name}{ARCHIVE_SUFFIX}"
        if result.returncode != 0 or not built.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TorchServeError(
                f"torch-model-archiver failed for {name} version {version.version}: {detail[0]}"
            )
        os.replace(built, target)
    return Archive(name, version.version, target, artifact, digest)


def _digest(paths: tuple[Path, ...]) -> str:
    """SHA-256 over the files' names and contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def archive_repository(
    repository: Path,
    model_store: Path,
    settings: Settings,
    artifact_format: ArtifactFormat | None = None,
    half: bool | None = None,
) -> list[Archive]:
    """Archive every served version of every model in ``repository`` into ``model_store``.

    What the repository cannot offer (a broken config or version) is logged and skipped, as
    the gateway skips it; a repository with nothing to serve is an error.
    """
    archives = []
    for name, entry in Repository(repository).read_all().items():
        for where, reason in entry.errors.items():
            logger.warning("%s (%s) is not archived: %s", name, where, reason)
        archives += [
            archive_version(version, model_store, settings, artifact_format, half)
            for version in entry.served()
        ]
    if not archives:
        raise TorchServeError(
            f"{repository} holds no model version to serve; add one with "
            f"cnnserve export --repository {repository}"
        )
    return archives
