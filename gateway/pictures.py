"""What a network sees, drawn for people: feature maps and channels as PNG grids of tiles,
and the FCN's demo scenes as PNGs.

Pure functions (arrays in, PNG bytes out) behind the gateway's ``POST
/predict/{model}/features`` and ``GET /demo/scene.png`` (:mod:`.http_api`), drawn as the
tutorial shows a convolution's output: each channel on its own, in grey, one after another —
here as tiles in rows, ``ceil(√C)`` tiles to a row, :data:`TILE_GAP` white pixels around each.

- Feature maps (``C×H×W``): each tile is scaled to its own range, its smallest value black
  and its largest white (min..max → 0..255), as ``plt.imshow`` scales one map. A map with
  one value throughout (a channel no input pixel excites, common after a ReLU) is black, as
  ``plt.imshow`` draws a constant map.
- A vector (``fc1``'s 512 values): one tile of cells, one cell per value, row by row
  (:func:`vector_rows`: 16 rows of 32), scaled over the vector's range.
- The input's channels (``3×H×W`` uint8 pixels, as the network is given them): R, G and B
  tiles in one row, each pixel's value as it is (0 black, 255 white), not rescaled — the
  tutorial's ``func2`` shows an image's channels this way.

Bounds, set from the array's shape before any pixel is drawn (:func:`grid_layout`): a map
larger than :data:`MAX_TILE_SIDE` is shrunk to it (each tile pixel the mean of the map
pixels it covers), a small one is enlarged by a whole factor to about :data:`MIN_TILE_SIDE`
(each value a crisp square), and the whole grid stays within :data:`MAX_GRID_PIXELS` (its
tiles shrink further when needed) — so the picture of a 512×512 FCN's ``conv3``, 128 maps
of 506×506, costs a pass over the maps and at most 2 million grey pixels. The PNG is written
at zlib level :data:`PNG_COMPRESS_LEVEL`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.models.scenes import shapes_scene

#: White pixels between tiles and around the grid.
TILE_GAP = 2
#: The grey of the gaps and of the grid's cells past its last tile: white.
BACKGROUND = 255
#: Longest tile side: a larger map is shrunk to fit (2.6× a ConvNet digit's 28 px enlarged,
#: 1/4 of a 512×512 FCN map).
MAX_TILE_SIDE = 128
#: A map whose longer side is smaller is enlarged by the whole factor that brings it closest
#: to this (a 28 px map ×2, a 7 px one ×9).
MIN_TILE_SIDE = 64
#: A vector's cells are enlarged towards this longer side instead (fc1's 32×16 cells: ×8).
MIN_VECTOR_SIDE = 256
#: Most pixels of one grid, gaps included (2 MiB of grey): 128 tiles of 124×124.
MAX_GRID_PIXELS = 1 << 21
#: Most bytes drawing any picture takes besides the array drawn, reserved before it starts:
#: per grid pixel, the tiles at their shown size as float32, their grey levels as float32,
#: then as uint8, the canvas and the PNG.
DRAWING_BYTES = MAX_GRID_PIXELS * 16
#: zlib level of the PNGs: the trained FCN's maps of a 512×512 scene encode 1.3–1.9× faster
#: at level 1 than at Pillow's default 6 (conv3's grid: 103 against 195 ms) for 4–13 % more
#: bytes, and a picture is sent once.
PNG_COMPRESS_LEVEL = 1
#: Channels of the input image, in tile order.
RGB_CHANNELS = ("R", "G", "B")
#: Response headers describing a picture: the layer's shape, and the grid's layout.
LAYER_SHAPE_HEADER = "X-Layer-Shape"
GRID_SHAPE_HEADER = "X-Grid-Shape"
TILE_SHAPE_HEADER = "X-Tile-Shape"


@dataclass(frozen=True)
class Layout:
    """Where the tiles of a grid go: ``rows×columns`` tiles of ``tile_height×tile_width``
    pixels, :data:`TILE_GAP` apart; tile ``i`` in row ``i // columns``."""

    tiles: int
    columns: int
    rows: int
    tile_height: int
    tile_width: int

    @property
    def height(self) -> int:
        """The grid's height in pixels."""
        return TILE_GAP + self.rows * (self.tile_height + TILE_GAP)

    @property
    def width(self) -> int:
        """The grid's width in pixels."""
        return TILE_GAP + self.columns * (self.tile_width + TILE_GAP)

    @property
    def pixels(self) -> int:
        """The grid's pixels, gaps included."""
        return self.height * self.width

    def origin(self, index: int) -> tuple[int, int]:
        """The top-left pixel ``(y, x)`` of tile ``index``."""
        row, column = divmod(index, self.columns)
        return (
            TILE_GAP + row * (self.tile_height + TILE_GAP),
            TILE_GAP + column * (self.tile_width + TILE_GAP),
        )


def grid_layout(
    tiles: int,
    height: int,
    width: int,
    *,
    columns: int | None = None,
    min_side: int = MIN_TILE_SIDE,
) -> Layout:
    """The layout of ``tiles`` maps of ``height×width`` (see the module docstring for the
    sizes): ``columns`` to a row (default ``ceil(√tiles)``), within :data:`MAX_GRID_PIXELS`.

    :class:`InvalidInputError` when even 1-pixel tiles would not fit."""
    if min(tiles, height, width) < 1:
        raise ValueError(f"nothing to draw: {tiles} maps of {height}×{width}")
    columns = min(columns or math.isqrt(tiles - 1) + 1, tiles)
    rows = -(-tiles // columns)
    longest = max(height, width)
    # A whole factor when enlarging, so every value stays a square of equal pixels.
    scale = MAX_TILE_SIDE / longest if longest > MAX_TILE_SIDE else max(1.0, min_side // longest)
    while True:
        layout = Layout(
            tiles,
            columns,
            rows,
            max(1, round(height * scale)),
            max(1, round(width * scale)),
        )
        if layout.pixels <= MAX_GRID_PIXELS:
            return layout
        if layout.tile_height == layout.tile_width == 1:
            raise InvalidInputError(
                f"{tiles} maps are too many to draw in {MAX_GRID_PIXELS} pixels "
                f"({TILE_GAP}-pixel gaps around 1-pixel tiles)"
            )
        scale = scale - 1 if scale >= 2 else scale * 0.9


@dataclass(frozen=True)
class Picture:
    """A drawn grid: the PNG and what it shows."""

    png: bytes
    #: The drawn array's shape: ``C,H,W`` (maps, channels) or ``N`` (a vector).
    shape: tuple[int, ...]
    layout: Layout

    def headers(self) -> dict[str, str]:
        """The layer's shape and the grid's layout, for a caller to find the tiles."""
        layout = self.layout
        return {
            LAYER_SHAPE_HEADER: ",".join(str(d) for d in self.shape),
            GRID_SHAPE_HEADER: f"{layout.rows},{layout.columns}",
            TILE_SHAPE_HEADER: f"{layout.tile_height},{layout.tile_width}",
        }


def layer_picture(values: np.ndarray) -> Picture:
    """One item's feature maps (``C×H×W``) or vector (``N``), drawn as a grid."""
    if values.ndim == 3:
        return feature_grid(values)
    if values.ndim == 1:
        return vector_picture(values)
    raise ValueError(f"a layer is drawn from C×H×W maps or a vector, got shape {values.shape}")


def feature_grid(maps: np.ndarray) -> Picture:
    """``C×H×W`` feature maps → one tile per map, each scaled to its own range."""
    layout = grid_layout(*maps.shape)
    return Picture(_grid_png(_stretched(maps, _shown(maps, layout)), layout), maps.shape, layout)


def channel_split(pixels: np.ndarray) -> Picture:
    """``3×H×W`` uint8 network pixels → R, G and B tiles in one row, values as they are."""
    channels, height, width = pixels.shape
    if channels != len(RGB_CHANNELS):
        raise ValueError(f"an RGB image has 3 channels, got {channels}")
    layout = grid_layout(channels, height, width, columns=channels)
    grey = np.rint(_shown(pixels, layout)).astype(np.uint8)
    return Picture(_grid_png(grey, layout), pixels.shape, layout)


def vector_rows(count: int) -> tuple[int, int]:
    """``(rows, columns)`` of a vector's cells: twice as wide as tall where ``count``
    allows (512 values: 16×32), every row full — the widest divisor of ``count`` up to
    ``√(2·count)`` (a prime count is one row)."""
    limit = math.isqrt(2 * count)
    columns = max(d for d in range(1, limit + 1) if count % d == 0)
    if columns == 1:
        return 1, count
    return count // columns, columns


def vector_picture(values: np.ndarray) -> Picture:
    """An ``N`` vector → one tile of cells, one per value, scaled to the vector's range."""
    (count,) = values.shape
    cells = values.reshape(vector_rows(count))[None]
    layout = grid_layout(1, *cells.shape[1:], min_side=MIN_VECTOR_SIDE)
    return Picture(_grid_png(_stretched(cells, _shown(cells, layout)), layout), (count,), layout)


def png_bytes(array: np.ndarray) -> bytes:
    """An ``H×W`` grey or ``H×W×3`` RGB uint8 array as a PNG at :data:`PNG_COMPRESS_LEVEL`."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def scene_png(seed: int, side: int) -> bytes:
    """The FCN's demo scene drawn from ``seed``, ``side×side`` pixels, as an RGB PNG."""
    image, _ = shapes_scene(np.random.default_rng(seed), side)
    return png_bytes(image)


def _shown(maps: np.ndarray, layout: Layout) -> np.ndarray:
    """The maps at the layout's tile size, as float32: enlarged by repeating each value,
    shrunk by averaging the pixels each tile pixel covers (Pillow's box filter)."""
    height, width = maps.shape[1:]
    if (layout.tile_height, layout.tile_width) == (height, width):
        return maps.astype(np.float32)
    if layout.tile_height >= height and layout.tile_width >= width:
        factor = layout.tile_height // height
        return np.repeat(np.repeat(maps.astype(np.float32), factor, 1), factor, 2)
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(
                    (layout.tile_width, layout.tile_height), Image.Resampling.BOX
                )
            )
            for m in maps
        ]
    )


def _stretched(maps: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """Each shown tile's own min..max → 0..255 (uint8); black where the map (full size)
    or its shown tile is constant."""
    flat = maps.reshape(len(maps), -1)
    varying = flat.min(axis=1) != flat.max(axis=1)
    tiles = shown.reshape(len(shown), -1)
    low = tiles.min(axis=1)
    span = tiles.max(axis=1) - low
    varying &= span > 0
    gain = np.divide(np.float32(255), span, out=np.zeros_like(span), where=varying)
    grey: np.ndarray = shown - low[:, None, None]
    grey *= gain[:, None, None]
    # The largest value lands on 255 within a rounding error: rint makes it exactly 255.
    np.rint(np.clip(grey, 0, 255, out=grey), out=grey)
    return grey.astype(np.uint8)


def _grid_png(tiles: np.ndarray, layout: Layout) -> bytes:
    """``C×h×w`` uint8 tiles placed on a white grid, as a grey PNG."""
    canvas = np.full((layout.height, layout.width), BACKGROUND, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        top, left = layout.origin(index)
        canvas[top : top + layout.tile_height, left : left + layout.tile_width] = tile
    return png_bytes(canvas)
