"""Exporting checkpoints into a model repository: class counts from the checkpoint, parity,
refusals that name what is wrong, and a repository the server can read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cnnserve.errors import InvalidInputError
from cnnserve.export.repository import (
    ensure_default_repository,
    export_to_repository,
    read_labels,
)
from cnnserve.models import CheckpointError
from cnnserve.models.features import FEATURE_LAYERS, item_shapes, split_rows
from cnnserve.models.repository import Repository, RepositoryError
from cnnserve.models.runtime import OnnxRunner
from cnnserve.models.spec import Architecture
from cnnserve.models.torchscript import TorchScriptRunner
from tests.feature_maps import assert_close, hooked_maps
from tests.models import tutorial_classes as tutorial


@pytest.mark.parametrize(
    ("checkpoint", "architecture", "classes"),
    [("convnet10", "convnet", 10), ("fcn10", "fcn", 10), ("fcn3", "fcn", 3)],
)
def test_tutorial_checkpoints_export_with_their_class_count(
    tutorial_checkpoints: dict[str, Path],
    tmp_path: Path,
    checkpoint: str,
    architecture: str,
    classes: int,
) -> None:
    path = tutorial_checkpoints[checkpoint]
    added = export_to_repository(Architecture(architecture), path, "mine", tmp_path)
    assert (added.version, added.num_classes) == (1, classes)
    assert added.result.max_abs_diff < 1e-4
    (version,) = Repository(tmp_path).read("mine").served()
    assert version.spec.num_classes == classes
    assert version.spec.labels == tuple(str(i) for i in range(classes))
    # The served artifacts compute what the tutorial's own class computes.
    network = (tutorial.ConvNet if architecture == "convnet" else tutorial.FCN)(classes)
    network.load_state_dict(torch.load(path, weights_only=True))
    side = 28 if architecture == "convnet" else 40
    x = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        expected = network.eval()(x).numpy()
    # Every version offers its architecture's feature maps, whatever its class count.
    layers = FEATURE_LAYERS[Architecture(architecture)]
    assert version.spec.feature_layers == layers
    eager = hooked_maps(network.eval(), x.numpy())
    for runner in (
        TorchScriptRunner(version.artifact("torchscript"), device="cpu"),
        OnnxRunner(version.artifact("onnx"), device="cpu"),
    ):
        assert np.abs(runner.infer(x.numpy()) - expected).max() < 1e-4
        parts = split_rows(
            runner.infer_features(x.numpy(), layers), item_shapes(version.spec, layers, side, side)
        )
        assert_close(dict(zip(("output", *layers), parts, strict=True)), eager)


def test_a_version_exported_before_feature_maps_offers_none(
    model_repository: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(model_repository, copy)
    export_file = copy / "fcn" / "1" / "export.json"
    export = json.loads(export_file.read_text())
    del export["feature_outputs"]
    export_file.write_text(json.dumps(export))
    assert Repository(copy).read("fcn").versions[1].spec.feature_layers == ()
    # A listing that is not the architecture's maps makes the version unusable, saying why.
    export["feature_outputs"] = [{"name": "fc1"}]
    export_file.write_text(json.dumps(export))
    entry = Repository(copy).read("fcn")
    assert not entry.versions
    assert "feature_outputs must list feature maps of a fcn" in entry.errors["1"]


def test_versions_count_up_and_are_never_overwritten(
    tutorial_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    fcn = Architecture.FCN
    first = export_to_repository(fcn, tutorial_checkpoints["fcn10"], "scenes", tmp_path)
    second = export_to_repository(fcn, tutorial_checkpoints["fcn3"], "scenes", tmp_path)
    assert (first.version, second.version) == (1, 2)
    with pytest.raises(RepositoryError, match="exists; give another --version"):
        export_to_repository(fcn, tutorial_checkpoints["fcn3"], "scenes", tmp_path, version=2)
    tenth = export_to_repository(fcn, tutorial_checkpoints["fcn3"], "scenes", tmp_path, 10)
    assert tenth.version == 10
    entry = Repository(tmp_path).read("scenes")
    assert sorted(entry.versions) == [1, 2, 10]
    assert [v.version for v in entry.served()] == [10]  # the default policy: latest one
    # Nothing half-written is left beside the versions.
    assert sorted(p.name for p in (tmp_path / "scenes").iterdir()) == [
        "1",
        "10",
        "2",
        "config.yaml",
    ]


def test_a_checkpoint_of_the_other_network_names_the_first_parameter_that_does_not_fit(
    tutorial_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"not a convnet checkpoint: fc1.weight is missing"):
        export_to_repository(Architecture.CONVNET, tutorial_checkpoints["fcn3"], "digits", tmp_path)
    with pytest.raises(CheckpointError, match=r"not a fcn checkpoint: conv3.weight is missing"):
        export_to_repository(Architecture.FCN, tutorial_checkpoints["convnet10"], "x", tmp_path)
    assert not (tmp_path / "digits").exists() or not any((tmp_path / "digits").iterdir())


def test_labels_come_from_a_file_and_must_match_the_class_count(
    tutorial_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\nsea\n\nsand\n")
    added = export_to_repository(
        Architecture.FCN, tutorial_checkpoints["fcn3"], "beach", tmp_path / "repo",
        labels=read_labels(labels),
    )  # fmt: skip
    assert Repository(tmp_path / "repo").read("beach").versions[1].spec.labels == (
        "sky",
        "sea",
        "sand",
    )
    assert yaml.safe_load((added.folder.parent / "config.yaml").read_text())["labels"] == [
        "sky",
        "sea",
        "sand",
    ]
    with pytest.raises(RepositoryError, match=r"3 labels .* 10 classes"):
        export_to_repository(
            Architecture.FCN, tutorial_checkpoints["fcn10"], "other", tmp_path / "repo",
            labels=["a", "b", "c"],
        )  # fmt: skip


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "a\\x00b", ".hidden", "-x", "x" * 65])
def test_names_that_could_leave_the_repository_are_refused(
    tutorial_checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    with pytest.raises(InvalidInputError, match="model name"):
        export_to_repository(Architecture.FCN, tutorial_checkpoints["fcn3"], name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_default_repository_holds_the_demo_models_once(
    model_repository: Path, tmp_path: Path
) -> None:
    entries = Repository(model_repository).read_all()
    assert {name: [v.version for v in e.served()] for name, e in entries.items()} == {
        "convnet": [1],
        "fcn": [1],
    }
    assert entries["fcn"].served()[0].spec.labels == (
        "background",
        "solid",
        "outline",
        "striped",
    )
    copy = tmp_path / "repo"
    shutil.copytree(model_repository, copy)
    assert ensure_default_repository(copy) == []  # what is there is left as it is
