"""Archives: one per (model, version) of a repository, carrying the artifact, the model's
config.yaml and the version's export.json, the one entry file and model-config.yaml."""

from __future__ import annotations

import json
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from cnnserve.models.repository import EXPORT_FILE, Repository, read_config
from cnnserve.models.runtime import ArtifactFormat
from cnnserve.settings import Settings
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.archive import (
    HANDLER_FILE,
    MANIFEST,
    MODEL_CONFIG_FILE,
    archive_repository,
    archive_version,
    archived_digest,
    archived_label,
    store_archives,
)


def copy_repository(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "repository"
    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize(
    ("artifact_format", "artifact"), [("torchscript", "model.pt"), ("onnx", "model.onnx")]
)
def test_an_archive_carries_the_version_and_what_the_handler_reads(
    model_repository: Path, tmp_path: Path, artifact_format: ArtifactFormat, artifact: str
) -> None:
    settings = Settings(
        torchserve_batch_size=1,
        torchserve_max_batch_delay_ms=7,
        torchserve_response_timeout_s=33,
        torchserve_call_timeout_s=4.5,  # the gateway's: never in an archive
    )
    store = tmp_path / "store"
    for model in ("convnet", "fcn"):
        version = Repository(model_repository).read(model).versions[1]
        built = archive_version(version, store, settings, artifact_format)
        assert (built.model, built.version) == (model, 1)
        assert built.path == store / f"{model}.1.mar"
        with zipfile.ZipFile(built.path) as mar:
            manifest = json.loads(mar.read(MANIFEST))["model"]
            assert manifest["modelName"] == model
            # TorchServe serves it as that version; the gateway's calls name it.
            assert manifest["modelVersion"] == "1"
            assert manifest["serializedFile"] == artifact
            assert mar.read(artifact) == (version.path / artifact).read_bytes()
            assert manifest["handler"] == "model_handler.py"
            assert mar.read(manifest["handler"]) == HANDLER_FILE.read_bytes()
            assert mar.read(EXPORT_FILE) == (version.path / EXPORT_FILE).read_bytes()
            assert yaml.safe_load(mar.read("config.yaml")) == yaml.safe_load(
                (model_repository / model / "config.yaml").read_text()
            )
            config = yaml.safe_load(mar.read(manifest["configFile"]))
        assert manifest["configFile"] == MODEL_CONFIG_FILE
        assert config == {
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 1,
            "maxBatchDelay": 7,
            "responseTimeout": 33,
            "handler": {
                "half": False,
                "threads": settings.inference_threads,
                "max_image_pixels": settings.max_image_pixels,
            },
        }
        assert archived_label(built.path) == f"{model}/1"


def test_the_model_s_config_chooses_the_artifact_and_versions_get_archives_of_their_own(
    model_repository: Path, tmp_path: Path
) -> None:
    repository = copy_repository(model_repository, tmp_path)
    shutil.copytree(repository / "fcn" / "1", repository / "fcn" / "2")
    config = repository / "fcn" / "config.yaml"
    config.write_text(config.read_text() + "artifact_format: onnx\n")
    entry = Repository(repository).read("fcn")
    store = tmp_path / "store"
    built = [archive_version(v, store, Settings(), "torchscript") for v in entry.versions.values()]
    assert [b.path.name for b in built] == ["fcn.1.mar", "fcn.2.mar"]
    for archive in built:
        with zipfile.ZipFile(archive.path) as mar:
            assert json.loads(mar.read(MANIFEST))["model"]["serializedFile"] == "model.onnx"
    assert [archived_label(p) for p in store_archives(store)] == ["fcn/1", "fcn/2"]


def test_the_same_inputs_keep_the_archive_and_other_inputs_replace_it(
    model_repository: Path, tmp_path: Path
) -> None:
    version = Repository(model_repository).read("convnet").versions[1]
    first = archive_version(version, tmp_path, Settings(), "torchscript")
    stamp = first.path.stat().st_mtime_ns
    again = archive_version(version, tmp_path, Settings(), "torchscript")
    assert again == first
    assert first.path.stat().st_mtime_ns == stamp  # not rebuilt
    assert archived_digest(first.path) == first.digest
    half = archive_version(version, tmp_path, Settings(), "torchscript", half=True)
    assert half.digest != first.digest
    with zipfile.ZipFile(half.path) as mar:
        assert yaml.safe_load(mar.read(MODEL_CONFIG_FILE))["handler"]["half"] is True
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convnet.1.mar"]


def test_half_precision_needs_torchscript(model_repository: Path, tmp_path: Path) -> None:
    version = Repository(model_repository).read("convnet").versions[1]
    with pytest.raises(TorchServeError, match="TorchScript artifacts only"):
        archive_version(version, tmp_path / "store", Settings(), "onnx", half=True)
    assert not (tmp_path / "store").exists()


def test_a_missing_artifact_says_how_to_make_it(model_repository: Path, tmp_path: Path) -> None:
    repository = copy_repository(model_repository, tmp_path)
    version = Repository(repository).read("convnet").versions[1]
    (version.path / "model.onnx").unlink()
    with pytest.raises(TorchServeError, match=r"model\.onnx not found; export the version again"):
        archive_version(version, tmp_path / "store", Settings(), "onnx")
    assert store_archives(tmp_path / "store") == []


def test_a_repository_is_archived_version_by_version_skipping_what_is_broken(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repository = copy_repository(model_repository, tmp_path)
    shutil.copytree(repository / "convnet" / "1", repository / "convnet" / "2")
    # Serve both convnet versions; a model whose config is broken is reported, not archived.
    config = repository / "convnet" / "config.yaml"
    config.write_text(config.read_text() + "version_policy: {all: {}}\n")
    (repository / "broken").mkdir()
    (repository / "broken" / "config.yaml").write_text("architecture: resnet\n")
    built = archive_repository(repository, tmp_path / "store", Settings())
    assert [(b.model, b.version) for b in built] == [("convnet", 1), ("convnet", 2), ("fcn", 1)]
    assert read_config(config).version_policy.all is not None
    assert "broken (config) is not archived" in caplog.text


def test_a_repository_with_nothing_to_serve_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TorchServeError, match="holds no model version to serve"):
        archive_repository(tmp_path, tmp_path / "store", Settings())


def test_the_store_lists_archives_only(tmp_path: Path) -> None:
    for name in ("b.1.mar", "a.2.mar", ".archive-x.mar", "notes.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "dir.mar").mkdir()
    assert [p.name for p in store_archives(tmp_path)] == ["a.2.mar", "b.1.mar"]
    with pytest.raises(TorchServeError, match="is not a TorchServe archive"):
        archived_label(tmp_path / "a.2.mar")


def test_one_version_archives_into_several_stores_at_once(
    model_repository: Path, tmp_path: Path
) -> None:
    """The gateway archives a version for every replica's store at the same time; the
    archiver's own staging folder (<temp dir>/<model name>) must not be shared between them."""
    version = Repository(model_repository).read("convnet").versions[1]
    stores = [tmp_path / f"store{i}" for i in range(3)]
    with ThreadPoolExecutor(len(stores)) as pool:
        built = list(pool.map(lambda s: archive_version(version, s, Settings()), stores))
    assert len({archive.digest for archive in built}) == 1
    for store in stores:
        assert [archived_label(p) for p in store_archives(store)] == ["convnet/1"]
