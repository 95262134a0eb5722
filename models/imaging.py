"""Image bytes ↔ arrays: the decoding and encoding every backend shares.

Decoding is where untrusted bytes meet the server, so every failure becomes an
:class:`InvalidInputError` naming what was wrong, and an image's declared size is checked
before any pixel memory is allocated (a decompression bomb costs nothing).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnserve.errors import InvalidInputError

#: Largest image, in pixels, that is decoded at all (checked against the header first).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode PNG/JPEG bytes to an ``H×W×3`` uint8 RGB array.

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
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
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
