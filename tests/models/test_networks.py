"""The networks match the tutorial's classes exactly: names, shapes, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnserve.models.checkpoint import load_network
from cnnserve.models.networks import FCN, ConvNet
from cnnserve.models.registry import MODELS

from . import tutorial_classes


def test_convnet_parameters_match_the_tutorial() -> None:
    ours = ConvNet(10).state_dict()
    theirs = tutorial_classes.ConvNet(10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert list(ours) == list(theirs)


def test_fcn_parameters_match_the_tutorial() -> None:
    ours = FCN(10).state_dict()
    theirs = tutorial_classes.FCN(10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "unsample3.weight" in ours


@pytest.mark.parametrize("name", ["convnet", "fcn"])
def test_tutorial_state_dict_loads_unchanged_and_computes_the_same(
    name: str, tmp_path: Path
) -> None:
    spec = MODELS[name]
    torch.manual_seed(7)
    tutorial_cls = tutorial_classes.ConvNet if name == "convnet" else tutorial_classes.FCN
    tutorial = tutorial_cls(spec.num_classes).eval()
    path = tmp_path / "tutorial.pt"
    torch.save(tutorial.state_dict(), path)

    ours = load_network(spec, path)

    height, width = spec.fixed_size or (19, 23)
    x = torch.randn(3, 3, height, width)
    with torch.inference_mode():
        assert torch.equal(ours(x), tutorial(x))


def test_output_shapes() -> None:
    with torch.inference_mode():
        assert ConvNet(10)(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
        assert FCN(4)(torch.zeros(3, 3, 7, 9)).shape == (3, 4, 7, 9)
        assert FCN(4)(torch.zeros(1, 3, 40, 33)).shape == (1, 4, 40, 33)
