"""Checkpoints load safely and mismatches are named."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cnnserve.models import CheckpointError
from cnnserve.models.checkpoint import load_network, save_checkpoint
from cnnserve.models.networks import ConvNet
from cnnserve.models.registry import MODELS


def test_round_trip_of_the_project_format(tmp_path: Path) -> None:
    spec = MODELS["convnet"]
    net = spec.network()
    save_checkpoint(spec, net, tmp_path / "c.pt", {"seed": 1})
    loaded = load_network(spec, tmp_path / "c.pt")
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    assert not loaded.training


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_network(MODELS["fcn"], tmp_path / "nope.pt")


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state = ConvNet(10).state_dict()
    state["conv9.weight"] = state.pop("conv1.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \['conv1.weight'\]; unexpected keys \['conv9.weight'\]",
    ):
        load_network(MODELS["convnet"], tmp_path / "bad.pt")


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    torch.save(ConvNet(7).state_dict(), tmp_path / "seven.pt")
    with pytest.raises(
        CheckpointError, match=r"fc2.weight: checkpoint \[7, 512\] vs model \[10, 512\]"
    ):
        load_network(MODELS["convnet"], tmp_path / "seven.pt")


def test_other_models_checkpoint_is_refused(tmp_path: Path) -> None:
    spec = MODELS["fcn"]
    save_checkpoint(spec, spec.network(), tmp_path / "fcn.pt", {})
    with pytest.raises(CheckpointError, match="holds a 'fcn' checkpoint, not 'convnet'"):
        load_network(MODELS["convnet"], tmp_path / "fcn.pt")


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pickle executed",))


def test_no_pickle_executes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Boom()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_network(MODELS["convnet"], path)
    assert "pickle executed" not in capsys.readouterr().out


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_network(MODELS["convnet"], tmp_path / "junk.pt")
