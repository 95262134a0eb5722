"""Image bytes ↔ arrays: the decoding and encoding every backend shares.

Decoding is where untrusted bytes meet the server, so every failure becomes an
:class:`InvalidInputError` naming what was wrong, and an image's declared size is checked
before any pixel memory is allocated (a decompression bomb costs nothing).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnserve.errors import InvalidInputError

#: Largest image, in pixels, that is decoded at all (checked against the header first).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def decode_rgb(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check_size: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode PNG/JPEG bytes to an ``H×W×3`` uint8 RGB array.

    ``check_size(height, width)`` may refuse the declared size (raising
    :class:`InvalidInputError`) before any pixel is decoded.

    Grayscale becomes three equal channels; an alpha channel is composited onto the
    background that contrasts with the opaque pixels (dark ink on transparency lands on
    white, light ink on black), so a transparent digit keeps its strokes visible.
    """
    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInputError(
                    f"image is {width}×{height} = {width * height} pixels; "
                    f"the limit is {max_pixels}"
                )
            if image.format not in {"PNG", "JPEG"}:
                raise InvalidInputError(
                    f"image format {image.format} is not accepted; send PNG or JPEG"
                )
            if check_size is not None:
                check_size(height, width)
            image.load()
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"could not decode image: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"image rejected: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        opaque = alpha[..., 0] > 0.5
        ink_mean = float(rgba[..., :3][opaque].mean()) if opaque.any() else 0.0
        background = 255.0 if ink_mean < 128 else 0.0
        rgb = rgba[..., :3] * alpha + background * (1.0 - alpha)
        composited: np.ndarray = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
        return composited
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """Encode an ``H×W`` (gray) or ``H×W×3`` uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()


def resize_rgb(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an ``H×W×3`` uint8 array with antialiasing (area-like when shrinking)."""
    if array.shape[:2] == (height, width):
        return array
    image = Image.fromarray(array).resize(
        (width, height), Image.Resampling.BILINEAR, reducing_gap=None
    )
    return np.asarray(image, dtype=np.uint8)


#: Colours of mask classes 0, 1, 2, ... (black background, then well-separated hues); the
#: palette repeats past its end so any uint8 class index has a colour.
MASK_COLOURS = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (70, 240, 240),
    (245, 130, 48),
)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Encode an ``H×W`` uint8 class mask as a palette PNG.

    Pixel values stay the class indices (a program reads them back with ``np.asarray``),
    while image viewers show each class in its own colour.
    """
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    palette = [channel for i in range(256) for channel in MASK_COLOURS[i % len(MASK_COLOURS)]]
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
