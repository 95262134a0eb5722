"""Image bytes ↔ arrays: the decoding and encoding every backend shares.

Decoding is where untrusted bytes meet the server, so every failure becomes an
:class:`InvalidInputError` naming what was wrong, and an image's declared size is checked
before any pixel memory is allocated (a decompression bomb costs nothing).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnnserve.errors import InvalidInputError

#: Largest image, in pixels, that is decoded at all (checked against the header first).
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
#: Most bytes one decoded pixel takes in Pillow's memory (RGBA, CMYK, 32-bit integer or float
#: modes); a decode's working memory is at most this per pixel of the image's header size.
MAX_BYTES_PER_PIXEL = 4
#: Modes Pillow's ``reduce`` takes; others (palette, bilevel, 16-bit) are converted first.
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})


@dataclass(frozen=True)
class ImageHeader:
    """What an encoded image declares about itself, read before any pixel is decoded."""

    width: int
    height: int
    format: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as Pillow orders them."""
        return self.width, self.height

    @property
    def pixels(self) -> int:
        """``width × height``."""
        return self.width * self.height


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size and format of PNG/JPEG bytes from the header alone; anything else, or more than
    ``max_pixels`` pixels, is an :class:`InvalidInputError`."""
    with _decoding():
        return _header(_open(data), max_pixels)


def decode_rgb(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    check_header: Callable[[ImageHeader], None] | None = None,
    shrink_to_side: int | None = None,
) -> np.ndarray:
    """Decode PNG/JPEG bytes to an ``H×W×3`` uint8 RGB array.

    ``check_header(header)`` may refuse the declared size or format (raising
    :class:`InvalidInputError`) before any pixel is decoded.

    ``shrink_to_side``: the image is shrunk by a whole factor, as early as its format allows,
    until neither side is larger (a JPEG by 1/8 at most, its decoder's smallest scale): a
    JPEG is decoded at the smaller scale directly (``draft``), a PNG is reduced right after
    decoding, before any conversion — so a big image never costs more
    than its decode in its own mode (at most :data:`MAX_BYTES_PER_PIXEL` per pixel).

    Grayscale becomes three equal channels; an alpha channel is composited (in uint8, after
    shrinking) onto the background that contrasts with the opaque pixels (dark ink on
    transparency lands on white, light ink on black), so a transparent digit keeps its
    strokes visible.
    """
    with _decoding():
        image = _open(data)
        header = _header(image, max_pixels)
        if check_header is not None:
            check_header(header)
        factor = 1
        if shrink_to_side is not None:
            factor = -(-max(header.width, header.height) // shrink_to_side)
        if factor > 1 and header.format == "JPEG":
            image.draft("RGB", (header.width // factor, header.height // factor))
        image.load()
        if factor > 1 and header.format == "PNG":
            if image.mode not in _REDUCIBLE:
                image = image.convert("RGBA" if _has_alpha(image) else "RGB")
            image = image.reduce(factor)
        return _to_rgb(image)


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Every way Pillow fails on untrusted bytes becomes an :class:`InvalidInputError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"could not decode image: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"image rejected: {exc}") from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    return Image.open(io.BytesIO(data))


def _header(image: Image.Image, max_pixels: int) -> ImageHeader:
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if image.format not in {"PNG", "JPEG"}:
        raise InvalidInputError(f"image format {image.format} is not accepted; send PNG or JPEG")
    return ImageHeader(width, height, image.format)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in {"RGBA", "LA", "PA"} or (
        image.mode == "P" and "transparency" in image.info
    )


def _to_rgb(image: Image.Image) -> np.ndarray:
    if not _has_alpha(image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.uint8)
    alpha = rgba[..., 3:4].astype(np.uint16)
    opaque = rgba[..., 3] > 127
    ink_mean = float(rgba[..., :3][opaque].mean()) if opaque.any() else 0.0
    background = 255 if ink_mean < 128 else 0
    # Integer "over" compositing, rounded: (c·a + bg·(255 − a) + 127) // 255 fits uint16.
    blended = rgba[..., :3] * alpha + np.uint16(background) * (255 - alpha) + 127
    composited: np.ndarray = (blended // 255).astype(np.uint8)
    return composited


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
