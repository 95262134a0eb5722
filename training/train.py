"""Train the demo weights from a fixed seed; each model takes a few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnserve.models.checkpoint import save_checkpoint
from cnnserve.models.registry import MODELS, WEIGHTS_DIR
from cnnserve.models.steps import digit_pixels, normalize

from .datasets import (
    DIGITS_RECIPE,
    SHAPES_RECIPE,
    digit_batch,
    digits_split,
    render_digit,
    shapes_batch,
)

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    checkpoint: Path
    sha256: str
    metric_name: str
    metric: float
    seconds: float


def _seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return np.random.default_rng(seed)


def digits_accuracy(model: nn.Module, glyphs: np.ndarray, labels: np.ndarray) -> float:
    """Held-out accuracy on plainly rendered digits, averaged over both polarities."""
    plain = digit_batch(glyphs, None)
    inverted = np.stack([_render_inverted(g) for g in glyphs])
    correct = 0
    with torch.inference_mode():
        for pixels in (plain, inverted):
            logits = model(torch.from_numpy(normalize(pixels)))
            correct += int((logits.argmax(dim=1).numpy() == labels).sum())
    return correct / (2 * len(labels))


def _render_inverted(glyph: np.ndarray) -> np.ndarray:
    return digit_pixels(255 - render_digit(glyph, None))


def train_convnet(seed: int = 0, epochs: int = 12, out_dir: Path = WEIGHTS_DIR) -> TrainResult:
    """Train the ConvNet on augmented bundled digits; report held-out accuracy."""
    started = time.perf_counter()
    rng = _seed_everything(seed)
    spec = MODELS["convnet"]
    split = digits_split(seed)
    model = spec.network()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    copies = 4  # augmented renderings of each training digit per epoch
    for epoch in tqdm(range(epochs), desc="convnet epochs", unit="epoch"):
        glyphs = np.repeat(split.train_images, copies, axis=0)
        labels = np.repeat(split.train_labels, copies)
        pixels = digit_batch(glyphs, rng)
        order = rng.permutation(len(labels))
        model.train()
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            x = torch.from_numpy(normalize(pixels[idx]))
            y = torch.from_numpy(labels[idx])
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        schedule.step()
        tqdm.write(f"epoch {epoch + 1}/{epochs} done")
    model.eval()
    accuracy = digits_accuracy(model, split.test_images, split.test_labels)
    return _finish(
        "convnet",
        model,
        out_dir,
        seed,
        DIGITS_RECIPE,
        "heldout_accuracy",
        accuracy,
        started,
        {"epochs": epochs},
    )


def mean_iou(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Mean intersection-over-union over classes present in either mask."""
    ious = []
    for c in range(num_classes):
        union = np.logical_or(prediction == c, truth == c).sum()
        if union:
            ious.append(np.logical_and(prediction == c, truth == c).sum() / union)
    return float(np.mean(ious))


def fcn_heldout_iou(model: nn.Module, seed: int, count: int = 200) -> float:
    """Mean IoU on held-out scenes drawn from a generator the training never used."""
    pixels, masks = shapes_batch(np.random.default_rng(seed + 10_000), count)
    with torch.inference_mode():
        scores = model(torch.from_numpy(normalize(pixels)))
    return mean_iou(scores.argmax(dim=1).numpy(), masks, MODELS["fcn"].num_classes)


#: Foreground classes are rare (~10% of pixels); weighting them keeps the network from
#: settling on "everything is background".
FCN_CLASS_WEIGHTS = (1.0, 3.0, 3.0, 3.0)


def train_fcn(seed: int = 0, steps: int = 1000, out_dir: Path = WEIGHTS_DIR) -> TrainResult:
    """Train the FCN on synthetic shape scenes; report held-out mean IoU."""
    started = time.perf_counter()
    rng = _seed_everything(seed)
    spec = MODELS["fcn"]
    model = spec.network()
    # The tutorial ends in a ReLU, so a class whose last pre-activation goes negative gets no
    # gradient and dies; a positive starting bias keeps every class alive early on.
    with torch.no_grad():
        model.unsample3.bias.fill_(1.0)  # type: ignore[union-attr,operator]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(FCN_CLASS_WEIGHTS))
    model.train()
    for _ in tqdm(range(steps), desc="fcn steps", unit="step", mininterval=2.0):
        pixels, masks = shapes_batch(rng, 16)
        optimizer.zero_grad()
        loss_fn(model(torch.from_numpy(normalize(pixels))), torch.from_numpy(masks)).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    iou = fcn_heldout_iou(model, seed)
    return _finish(
        "fcn",
        model,
        out_dir,
        seed,
        SHAPES_RECIPE,
        "heldout_mean_iou",
        iou,
        started,
        {"steps": steps},
    )


def _finish(
    name: str,
    model: nn.Module,
    out_dir: Path,
    seed: int,
    recipe: str,
    metric_name: str,
    metric: float,
    started: float,
    schedule: dict[str, int],
) -> TrainResult:
    spec = MODELS[name]
    path = out_dir / f"{name}.pt"
    metadata = {"seed": seed, "data_recipe": recipe, metric_name: round(metric, 4), **schedule}
    digest = save_checkpoint(spec, model, path, metadata)
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[name] = {"file": path.name, "sha256": digest, **metadata}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return TrainResult(path, digest, metric_name, metric, time.perf_counter() - started)
