"""Image bytes ↔ arrays: the decoding and encoding every backend shares.

Decoding is where untrusted bytes meet the server, so every failure becomes an
:class:`InvalidInputError` naming what was wrong, and an image's declared size is checked
before any pixel memory is allocated (a decompression bomb costs nothing).
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
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
    ``max_pixels`` pixels, is an :class:`InvalidInputError`.

    A well-formed PNG (IHDR first, its length and CRC right) or baseline/progressive JPEG
    (markers walked to the frame header) is read with :mod:`struct` alone — a few µs, where
    Pillow's ``Image.open`` takes ~13 µs and reads every PNG chunk before the pixels. Bytes
    this reader does not fully understand go to Pillow, so they are refused (or accepted)
    with Pillow's own reasons; the decode reads the header again with Pillow and checks it
    declares the same size (:func:`cnnserve.models.image_batch.decode_image_batch`).
    """
    header = _png_header(data) or _jpeg_header(data)
    if header is None:
        with _decoding():
            return _header(_open(data), max_pixels)
    _check_pixels(header.width, header.height, max_pixels)
    return header


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Signature, IHDR's length and type, its 13 bytes, their CRC.
_PNG_IHDR = struct.Struct(">8sI4s13sI")
_PNG_IHDR_FIELDS = struct.Struct(">IIBBBBB")
#: (bit depth, colour type) pairs the PNG specification allows (and Pillow decodes).
_PNG_MODES = frozenset(
    {(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3)}
    | {(8, 4), (16, 4), (8, 6), (16, 6)}
)
#: JPEG frame headers (SOF0–SOF15 but DHT, JPG and DAC), which carry the image's size.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers with no length after them: TEM and the restart markers.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _png_header(data: bytes) -> ImageHeader | None:
    """A PNG's size from its IHDR chunk (checked as Pillow checks it); ``None`` when the
    bytes are not a PNG with a well-formed IHDR first."""
    if len(data) < _PNG_IHDR.size or not data.startswith(_PNG_SIGNATURE):
        return None
    _, length, kind, fields, crc = _PNG_IHDR.unpack_from(data)
    if length != 13 or kind != b"IHDR" or zlib.crc32(kind + fields) != crc:
        return None
    width, height, depth, colour, compression, filtering, _ = _PNG_IHDR_FIELDS.unpack(fields)
    if (
        width == 0
        or height == 0
        or (depth, colour) not in _PNG_MODES
        or compression != 0
        or filtering != 0
    ):
        return None
    return ImageHeader(width, height, "PNG")


def _jpeg_header(data: bytes) -> ImageHeader | None:
    """A JPEG's size from its frame header, reached by walking the marker segments before it;
    ``None`` at anything unusual (fill between segments, a scan before the frame, an
    unsupported precision or component count)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    position, end = 2, len(data)
    # Each step moves at least two bytes, so the walk is bounded by the image's length.
    while position + 4 <= end and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        (length,) = struct.unpack_from(">H", data, position + 2)
        if marker in _JPEG_FRAMES:
            if length < 8 or position + 10 > end:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", data, position + 4)
            if precision != 8 or height == 0 or width == 0 or components not in (1, 3, 4):
                return None
            return ImageHeader(width, height, "JPEG")
        if length < 2 or marker in (0xD8, 0xD9, 0xDA):
            return None
        position += 2 + length
    return None


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
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object's address: different on every call
        # and meaningless to the caller.
        raise InvalidInputError(
            "could not decode image: its bytes are not a PNG or JPEG image"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"could not decode image: {exc}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"image rejected: {exc}") from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise InvalidInputError("image is empty (0 bytes)")
    return Image.open(io.BytesIO(data))


def _header(image: Image.Image, max_pixels: int) -> ImageHeader:
    width, height = image.size
    _check_pixels(width, height, max_pixels)
    if image.format not in {"PNG", "JPEG"}:
        raise InvalidInputError(f"image format {image.format} is not accepted; send PNG or JPEG")
    return ImageHeader(width, height, image.format)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidInputError(
            f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"
        )


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
