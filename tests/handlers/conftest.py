"""Archives the handler tests unpack: the default repository's convnet and fcn (version 1) in
both artifact formats, built once per session by the real archiver."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from ts.context import Context

from cnnserve.handlers.service import ModelHandler
from cnnserve.models.repository import Repository
from cnnserve.models.runtime import ArtifactFormat
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import archive_version

from .harness import make_context, unpack

#: (model, artifact format) → archive file.
Archives = dict[tuple[str, ArtifactFormat], Path]
#: ``unpacked(model, artifact_format)``: that archive unpacked into a directory of its own.
Unpacked = Callable[[str, ArtifactFormat], Path]


@pytest.fixture(scope="session")
def archives(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Archives:
    built: Archives = {}
    repository = Repository(model_repository)
    formats: tuple[ArtifactFormat, ...] = ("torchscript", "onnx")
    for artifact_format in formats:
        store = tmp_path_factory.mktemp(f"store-{artifact_format}")
        for model in ("convnet", "fcn"):
            version = repository.read(model).versions[1]
            archive = archive_version(version, store, Settings(), artifact_format)
            built[(model, artifact_format)] = archive.path
    return built


@pytest.fixture
def unpacked(archives: Archives, tmp_path: Path) -> Unpacked:
    def unpack_one(model: str, artifact_format: ArtifactFormat) -> Path:
        target = tmp_path / f"{model}-{artifact_format}"
        return target if target.exists() else unpack(archives[(model, artifact_format)], target)

    return unpack_one


@pytest.fixture(scope="module")
def handler_and_context(model_dir: Path) -> tuple[ModelHandler, Context]:
    """The handler initialized on the test module's ``model_dir`` (an unpacked archive), and
    the TorchServe context it answers through."""
    handler = ModelHandler()
    context = make_context(model_dir)
    handler.handle(None, context)
    return handler, context
