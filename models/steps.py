"""Model-side steps shared by every serving path: pixels → input tensor, raw outputs → arrays.

Their callers: the model registry (``digit_pixels`` and ``to_chw`` behind
``ModelSpec.image_to_pixels``, which the gateway and the TorchServe handler both use), the
gateway's edge (``normalize`` in :mod:`cnnserve.gateway.inputs`; ``softmax`` and
``class_mask`` in :mod:`cnnserve.gateway.outputs`), the TorchServe handler (``normalize``,
for direct images), :mod:`.semantics` (``softmax``, ``class_mask``) and training — so a
digit is prepared the same way wherever it is served, and as it was trained. The backends
never call them: they get batches already prepared. What the outputs mean to a caller
(top-k, pixel counts, the friendly replies) is :mod:`.semantics`.
"""

from __future__ import annotations

import numpy as np

from .imaging import resize_rgb
from .pixels import PIXEL_MEAN, PIXEL_STD, normalize

# Normalization lives in .pixels (importable without Pillow) and is re-exported here, where
# every other step is.
__all__ = [
    "CONVNET_SIDE",
    "DIGIT_BOX",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "class_mask",
    "digit_pixels",
    "normalize",
    "softmax",
    "to_chw",
]

#: ConvNet's input side; the digit's longer side is scaled to DIGIT_BOX inside it.
CONVNET_SIDE = 28
DIGIT_BOX = 20
#: The grey level (channel mean, as ``rgb.mean(axis=2)`` computes it) of every channel sum
#: 0..765, and of the inverted image (``255.0 - grey``).
_GRAY_OF_SUM = np.arange(3 * 255 + 1) / 3
_INVERTED_GRAY_OF_SUM = 255.0 - _GRAY_OF_SUM


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D float array, to the bit (the mean of the two middle values when
    their count is even), without its generic machinery: 8 µs instead of 50 for a border."""
    ordered = np.sort(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def to_chw(rgb: np.ndarray) -> np.ndarray:
    """``H×W×3`` → ``3×H×W`` (contiguous)."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def digit_pixels(rgb: np.ndarray) -> np.ndarray:
    """Prepare a photo or drawing of one digit as ConvNet pixels, ``3×28×28`` uint8.

    Steps, each making arbitrary inputs look like the training data:
    1. polarity — if the border is brighter than mid-gray the image is dark ink on a light
       background and is inverted, so the network always sees light ink on black;
    2. crop to the ink's bounding box (pixels above 30% of the brightest), so margins and
       image size do not matter;
    3. scale the longer side to 20 px (aspect kept) and centre it in 28×28, as MNIST does.
    """
    # The float grey level of a pixel is (R+G+B)/3, so it takes one of 766 values: the steps
    # below read a table of those by each pixel's channel sum (exact in uint16) rather than
    # build a float image — the same comparisons on the same float values, a third of the
    # time (the float image's mean was the largest cost of preparing a digit).
    channel_sum = rgb[..., 0].astype(np.uint16)
    channel_sum += rgb[..., 1]
    channel_sum += rgb[..., 2]
    gray_of_sum = _GRAY_OF_SUM
    border = np.concatenate(
        [channel_sum[0], channel_sum[-1], channel_sum[:, 0], channel_sum[:, -1]]
    )
    if _median(gray_of_sum[border]) > 127.5:
        rgb = 255 - rgb
        gray_of_sum = _INVERTED_GRAY_OF_SUM
    # Inverted or not, the grey level is monotonic in the sum, so its peak is at an extreme.
    peak = float(max(gray_of_sum[channel_sum.min()], gray_of_sum[channel_sum.max()]))
    if peak > 0:
        ink = (gray_of_sum > 0.3 * peak)[channel_sum]
        rows = np.flatnonzero(ink.any(axis=1))
        cols = np.flatnonzero(ink.any(axis=0))
        rgb = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = rgb.shape[:2]
    scale = DIGIT_BOX / max(height, width)
    new_h = max(1, round(height * scale))
    new_w = max(1, round(width * scale))
    digit = resize_rgb(np.ascontiguousarray(rgb), new_h, new_w)
    canvas = np.zeros((CONVNET_SIDE, CONVNET_SIDE, 3), dtype=np.uint8)
    top = (CONVNET_SIDE - new_h) // 2
    left = (CONVNET_SIDE - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = digit
    return to_chw(canvas)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probabilities


def class_mask(scores: np.ndarray) -> np.ndarray:
    """``N×C×H×W`` scores → ``N×H×W`` uint8 class indices (argmax over classes)."""
    mask: np.ndarray = scores.argmax(axis=1).astype(np.uint8)
    return mask
