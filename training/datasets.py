"""The two demo data sets, built deterministically from a seed; nothing is downloaded.

* digits — scikit-learn's bundled 8×8 digits, rendered as varied 28×28 RGB images (either
  polarity, tinted ink, noisy background, varied size and position) and then passed through
  the same :func:`digit_pixels` preprocessing the server applies.
* shapes — synthetic segmentation scenes: circles, squares and triangles of random colours on
  a noisy background, with a per-pixel class mask (background is class 0); drawn by
  :mod:`cnnserve.models.scenes`, where the gateway draws its demo scenes too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cnnserve.models.scenes import shapes_scene
from cnnserve.models.steps import digit_pixels

DIGITS_RECIPE = (
    "scikit-learn load_digits (1797 8×8 images); stratified 80/20 split with the seed; "
    "train images re-rendered every epoch at 32–64 px with random polarity, ink tint, "
    "background noise, digit size 50–95% and offset, then the server's digit_pixels "
    "preprocessing; test images rendered plainly at 64 px in both polarities"
)
SHAPES_RECIPE = (
    "synthetic 64×64 scenes: 1–5 circles, squares or triangles (8–24 px, random colours) "
    "drawn solid, as 3–4 px outlines or striped (period 4–6), on a grainy random background; "
    "class 0 is background; held-out scenes come from seed + 10000"
)


@dataclass(frozen=True)
class DigitsSplit:
    """8×8 digit images (values 0–16) and their labels, split into train and test."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def digits_split(seed: int) -> DigitsSplit:
    """The bundled digits, split 80/20 (stratified) with ``seed``."""
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target, test_size=0.2, random_state=seed, stratify=bunch.target
    )
    return DigitsSplit(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def render_digit(glyph: np.ndarray, rng: np.random.Generator | None, side: int = 64) -> np.ndarray:
    """Render an 8×8 glyph (0–1) as an ``side×side×3`` uint8 image.

    With ``rng`` the rendering is randomised (augmentation); without it the digit is drawn
    plainly: white on black, 80% of the image, centred.
    """
    if rng is None:
        box, ink, background, noise, offset = int(side * 0.8), np.ones(3), np.zeros(3), 0.0, (0, 0)
    else:
        side = int(rng.integers(32, 65))
        box = int(side * rng.uniform(0.5, 0.95))
        ink = rng.uniform(0.55, 1.0, size=3)
        background = rng.uniform(0.0, 0.3, size=3)
        noise = float(rng.uniform(0.0, 0.08))
        slack = (side - box) // 2
        offset = (int(rng.integers(-slack, slack + 1)), int(rng.integers(-slack, slack + 1)))
    glyph_img = Image.fromarray(np.uint8(glyph * 255)).resize((box, box), Image.Resampling.BICUBIC)
    intensity = np.zeros((side, side), dtype=np.float32)
    top = (side - box) // 2 + offset[0]
    left = (side - box) // 2 + offset[1]
    intensity[top : top + box, left : left + box] = np.asarray(glyph_img, dtype=np.float32) / 255.0
    rgb = intensity[..., None] * ink + (1.0 - intensity[..., None]) * background
    if rng is not None and noise > 0:
        rgb = rgb + rng.normal(0.0, noise, size=rgb.shape)
    if rng is not None and rng.random() < 0.5:
        rgb = 1.0 - rgb  # dark ink on a light background
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def digit_batch(glyphs: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """Glyphs → ``N×3×28×28`` uint8 network pixels, through the server's preprocessing."""
    return np.stack([digit_pixels(render_digit(g, rng)) for g in glyphs])


def shapes_batch(
    rng: np.random.Generator, count: int, side: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes: ``N×3×H×W`` uint8 pixels and ``N×H×W`` int64 masks."""
    scenes = [shapes_scene(rng, side) for _ in range(count)]
    pixels = np.stack([s[0].transpose(2, 0, 1) for s in scenes])
    masks = np.stack([s[1] for s in scenes]).astype(np.int64)
    return pixels, masks
