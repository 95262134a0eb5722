"""The committed demo weights are trained, match their manifest, and meet their metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnnserve.models.checkpoint import load_network, sha256_file
from cnnserve.models.registry import MODELS, WEIGHTS_DIR, weights_path
from cnnserve.models.steps import normalize
from cnnserve.training.datasets import digits_split
from cnnserve.training.train import MANIFEST, digits_accuracy, fcn_heldout_iou, mean_iou

from ..images import digit_png, shapes_png

MANIFEST_DATA = json.loads((WEIGHTS_DIR / MANIFEST).read_text())


@pytest.mark.parametrize("name", ["convnet", "fcn"])
def test_manifest_matches_files(name: str) -> None:
    entry = MANIFEST_DATA[name]
    assert sha256_file(WEIGHTS_DIR / entry["file"]) == entry["sha256"]
    assert entry["seed"] == 0
    assert entry["data_recipe"]


def test_convnet_heldout_accuracy_is_at_least_97_percent() -> None:
    split = digits_split(MANIFEST_DATA["convnet"]["seed"])
    model = load_network(MODELS["convnet"], weights_path("convnet"))
    accuracy = digits_accuracy(model, split.test_images, split.test_labels)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(MANIFEST_DATA["convnet"]["heldout_accuracy"], abs=1e-3)


def test_fcn_heldout_mean_iou_is_at_least_0_8() -> None:
    model = load_network(MODELS["fcn"], weights_path("fcn"))
    iou = fcn_heldout_iou(model, MANIFEST_DATA["fcn"]["seed"])
    assert iou >= 0.8
    assert iou == pytest.approx(MANIFEST_DATA["fcn"]["heldout_mean_iou"], abs=1e-3)


@pytest.mark.parametrize(
    ("invert", "mode"), [(False, None), (True, None), (False, "L"), (True, "L"), (False, "RGBA")]
)
def test_real_looking_digit_pngs_classify_correctly(invert: bool, mode: str | None) -> None:
    spec = MODELS["convnet"]
    model = load_network(spec, weights_path(spec.name))
    pixels, labels = [], []
    for index in range(40):
        data, label = digit_png(index, invert=invert, mode=mode)
        pixels.append(spec.image_to_pixels(data))
        labels.append(label)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(normalize(np.stack(pixels)))).argmax(dim=1).numpy()
    assert (predicted == np.array(labels)).mean() >= 0.95


def test_fcn_segments_png_scenes() -> None:
    """Scenes sent as PNG bytes go through the serving path and segment as well as held out."""
    spec = MODELS["fcn"]
    model = load_network(spec, weights_path(spec.name))
    predicted, truths = [], []
    for seed in range(20):
        data, truth = shapes_png(seed=500 + seed, side=96)
        with torch.inference_mode():
            scores = model(torch.from_numpy(normalize(spec.image_to_pixels(data)[None])))
        predicted.append(scores.argmax(dim=1)[0].numpy())
        truths.append(truth)
    assert mean_iou(np.stack(predicted), np.stack(truths), spec.num_classes) >= 0.8
