"""Training is reproducible from its seed and writes a checkpoint plus manifest entry."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cnnserve.models.checkpoint import load_network
from cnnserve.models.registry import MODELS
from cnnserve.training.train import MANIFEST, train_fcn


def test_short_fcn_training_is_deterministic(tmp_path: Path) -> None:
    first = train_fcn(seed=3, steps=4, out_dir=tmp_path / "a")
    second = train_fcn(seed=3, steps=4, out_dir=tmp_path / "b")
    assert _same_weights(first.checkpoint, second.checkpoint)
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["fcn"]["seed"] == 3
    assert manifest["fcn"]["steps"] == 4
    assert manifest["fcn"]["sha256"] == first.sha256
    assert manifest["fcn"]["heldout_mean_iou"] == round(first.metric, 4)
    net = load_network(MODELS["fcn"], first.checkpoint)
    assert net(torch.zeros(1, 3, 9, 9)).shape == (1, MODELS["fcn"].num_classes, 9, 9)


def _same_weights(a: Path, b: Path) -> bool:
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    return all(torch.equal(sa[k], sb[k]) for k in sa)
