"""Pixels → network input scale: the one normalization every backend and device applies.

Kept apart from :mod:`cnnserve.models.steps` (which decodes images with Pillow) so the
model runners (:mod:`cnnserve.models.runtime`) import with numpy and torch alone, as on a
bare GPU host.
"""

from __future__ import annotations

import numpy as np

#: Pixels are mapped from [0, 255] to [-1, 1].
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (any layout) → float32 in [-1, 1], the networks' input scale."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return (scaled - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
