"""Drawing what a network sees: feature maps, vectors and channels as grids of grey tiles,
read back with Pillow; the layout's bounds; the demo scenes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.pictures import (
    MAX_GRID_PIXELS,
    MAX_TILE_SIDE,
    MIN_VECTOR_SIDE,
    Picture,
    channel_split,
    feature_grid,
    grid_layout,
    layer_picture,
    scene_png,
    vector_rows,
)
from cnnserve.models.scenes import shapes_scene

from ..images import grid_tiles


def _maps(*shape: int, seed: int = 0) -> np.ndarray:
    """Feature-map-like float32 values: ReLU'd noise, each map on its own scale."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.01, 100.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    return (np.maximum(rng.normal(size=shape), -0.5) * scales).astype(np.float32)


def _tiles(picture: Picture) -> list[np.ndarray]:
    assert Image.open(io.BytesIO(picture.png)).mode == "L"
    return grid_tiles(picture.png, picture.headers())


def _stretched(values: np.ndarray) -> np.ndarray:
    """What a tile shows of ``values`` drawn at their own size: min..max → 0..255."""
    low, high = float(values.min()), float(values.max())
    return np.rint((values.astype(np.float64) - low) / (high - low) * 255)


def test_one_tile_per_map_each_scaled_to_its_own_range() -> None:
    maps = _maps(32, 62, 62)
    picture = feature_grid(maps)
    assert picture.headers()["X-Layer-Shape"] == "32,62,62"
    assert (picture.layout.rows, picture.layout.columns) == (6, 6)
    tiles = _tiles(picture)
    assert len(tiles) == 32
    for values, tile in zip(maps, tiles, strict=True):
        assert (tile.min(), tile.max()) == (0, 255)
        # float32 arithmetic may land a value half a level the other way.
        assert np.abs(tile - _stretched(values)).max() <= 1


def test_a_constant_map_is_black() -> None:
    maps = _maps(3, 40, 40)
    maps[1] = 0.0  # a channel the ReLU silenced
    maps[2] = 7.5
    tiles = _tiles(feature_grid(maps))
    assert (tiles[0].min(), tiles[0].max()) == (0, 255)
    assert not tiles[1].any()
    assert not tiles[2].any()


def test_large_maps_are_shrunk_by_averaging_to_the_largest_tile() -> None:
    maps = _maps(32, 510, 510)  # an FCN's conv1 of a 512×512 image
    picture = feature_grid(maps)
    assert (picture.layout.tile_height, picture.layout.tile_width) == (MAX_TILE_SIDE,) * 2
    tiles = _tiles(picture)
    assert len(tiles) == 32
    assert all((tile.min(), tile.max()) == (0, 255) for tile in tiles)
    # Averaging keeps where a map is bright: a bright top-left quarter stays bright.
    quarter = np.zeros((1, 510, 510), dtype=np.float32)
    quarter[:, :255, :255] = 1.0
    (tile,) = _tiles(feature_grid(quarter))
    assert tile[:60, :60].min() == 255
    assert tile[68:, :].max() == 0


def test_small_maps_are_enlarged_by_a_whole_factor() -> None:
    maps = _maps(64, 7, 7)  # the ConvNet's pool2
    picture = feature_grid(maps)
    assert (picture.layout.tile_height, picture.layout.tile_width) == (63, 63)
    for values, tile in zip(maps, _tiles(picture), strict=True):
        cells = tile[::9, ::9]
        assert np.array_equal(np.repeat(np.repeat(cells, 9, 0), 9, 1), tile)
        assert np.abs(cells - _stretched(values)).max() <= 1


def test_non_square_maps_keep_their_aspect() -> None:
    picture = feature_grid(_maps(5, 300, 150))
    assert (picture.layout.tile_height, picture.layout.tile_width) == (128, 64)
    assert len(_tiles(picture)) == 5


@pytest.mark.parametrize(("maps", "side"), [(128, 506), (64, 508), (32, 510)])
def test_every_grid_stays_within_its_pixel_budget(maps: int, side: int) -> None:
    """The FCN's largest layers of its largest input: the layout is decided from the shape
    alone, before anything is drawn."""
    layout = grid_layout(maps, side, side)
    assert layout.pixels <= MAX_GRID_PIXELS
    assert layout.tiles == maps
    assert layout.rows * layout.columns >= maps
    assert 100 < layout.tile_height <= MAX_TILE_SIDE


def test_too_many_maps_to_draw_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="too many to draw"):
        grid_layout(300_000, 1, 1)


def test_a_vector_is_one_tile_of_cells_row_by_row() -> None:
    values = np.random.default_rng(1).normal(size=512).astype(np.float32)
    picture = layer_picture(values)
    assert picture.headers()["X-Layer-Shape"] == "512"
    (tile,) = _tiles(picture)
    cell = MIN_VECTOR_SIDE // 32
    assert tile.shape == (16 * cell, 32 * cell)
    cells = tile[::cell, ::cell]
    assert np.array_equal(np.repeat(np.repeat(cells, cell, 0), cell, 1), tile)
    assert np.abs(cells.ravel() - _stretched(values)).max() <= 1
    assert cells.ravel().argmax() == values.argmax()


@pytest.mark.parametrize(
    ("count", "shape"), [(512, (16, 32)), (12, (3, 4)), (7, (1, 7)), (1, (1, 1))]
)
def test_vector_cells_fill_every_row(count: int, shape: tuple[int, int]) -> None:
    assert vector_rows(count) == shape


def test_channel_split_shows_the_pixels_as_they_are() -> None:
    pixels = np.random.default_rng(2).integers(10, 100, size=(3, 28, 28), dtype=np.uint8)
    picture = channel_split(pixels)
    assert picture.headers()["X-Layer-Shape"] == "3,28,28"
    assert (picture.layout.rows, picture.layout.columns) == (1, 3)
    tiles = _tiles(picture)
    assert len(tiles) == 3
    for channel, tile in zip(pixels, tiles, strict=True):
        assert tile.shape == (56, 56)
        assert np.array_equal(tile[::2, ::2], channel)  # not rescaled: 10..99 stays so
        assert np.array_equal(np.repeat(np.repeat(channel, 2, 0), 2, 1), tile)


def test_layer_picture_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match="C×H×W maps or a vector"):
        layer_picture(np.zeros((2, 3), dtype=np.float32))


def test_a_demo_scene_is_the_generators_scene_drawn_from_the_seed() -> None:
    png = scene_png(7, 48)
    image = np.asarray(Image.open(io.BytesIO(png)))
    expected, _ = shapes_scene(np.random.default_rng(7), 48)
    assert np.array_equal(image, expected)
    assert scene_png(7, 48) == png
    assert scene_png(8, 48) != png
