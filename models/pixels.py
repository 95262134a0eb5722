"""Pixels → network input scale: the one normalization every backend and device applies.

Kept apart from :mod:`cnnserve.models.steps` (which decodes images with Pillow) so the
model runners (:mod:`cnnserve.models.runtime`, :mod:`cnnserve.models.torchscript`) import
with numpy (and torch) alone, as on a bare GPU host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The demo models map pixels from [0, 255] to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


@dataclass(frozen=True)
class Normalization:
    """``(pixel / 255 - mean) / std``, the same for the three channels (as the tutorial's
    ``transforms.Normalize`` with one value per channel repeated)."""

    mean: float = PIXEL_MEAN
    std: float = PIXEL_STD


DEFAULT_NORMALIZATION = Normalization()


def normalize(pixels: np.ndarray, norm: Normalization = DEFAULT_NORMALIZATION) -> np.ndarray:
    """uint8 pixels (any layout) → float32 network input (``[-1, 1]`` by default)."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return (scaled - np.float32(norm.mean)) / np.float32(norm.std)
