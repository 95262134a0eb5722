"""Test images made on the spot (rendered digits and shape scenes as PNG/JPEG bytes), and the
tiles of the gateway's pictures read back."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping

import numpy as np
from PIL import Image

from cnnserve.gateway.pictures import (
    BACKGROUND,
    GRID_SHAPE_HEADER,
    LAYER_SHAPE_HEADER,
    TILE_SHAPE_HEADER,
    Layout,
)
from cnnserve.models.scenes import shapes_scene
from cnnserve.training.datasets import digits_split, render_digit


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    """Encode an array as image bytes, optionally converting the PIL mode first."""
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def held_out_digit(index: int = 0) -> tuple[np.ndarray, int]:
    """A held-out digit rendered plainly (white on black, 64×64 RGB) and its label."""
    split = digits_split(0)
    return render_digit(split.test_images[index], None), int(split.test_labels[index])


def digit_png(
    index: int = 0, *, invert: bool = False, mode: str | None = None
) -> tuple[bytes, int]:
    """A held-out digit as PNG bytes, optionally inverted (black on white) or re-moded."""
    rgb, label = held_out_digit(index)
    return encode(255 - rgb if invert else rgb, mode=mode), label


def shapes_png(seed: int = 1, side: int = 64) -> tuple[bytes, np.ndarray]:
    """A synthetic segmentation scene as PNG bytes and its true class mask."""
    image, mask = shapes_scene(np.random.default_rng(seed), side)
    return encode(image), mask


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width×height`` RGB but whose data holds a few bytes.

    Decoding it for real would allocate ``3·width·height`` bytes; a server must refuse it
    from the header alone.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def grid_tiles(png: bytes, headers: Mapping[str, str]) -> list[np.ndarray]:
    """The tiles of a picture grid (``cnnserve.gateway.pictures``), found from its headers:
    one per channel of ``X-Layer-Shape`` (one for a vector), row by row. The gaps around
    them are checked white on the way."""
    grid = np.asarray(Image.open(io.BytesIO(png)))
    rows, columns = (int(v) for v in headers[GRID_SHAPE_HEADER].split(","))
    height, width = (int(v) for v in headers[TILE_SHAPE_HEADER].split(","))
    shape = headers[LAYER_SHAPE_HEADER].split(",")
    layout = Layout(int(shape[0]) if len(shape) == 3 else 1, columns, rows, height, width)
    assert grid.shape == (layout.height, layout.width)
    tiles = []
    gaps = np.ones(grid.shape, dtype=bool)
    for index in range(layout.tiles):
        top, left = layout.origin(index)
        tiles.append(grid[top : top + height, left : left + width])
        gaps[top : top + height, left : left + width] = False
    assert (grid[gaps] == BACKGROUND).all()
    return tiles
