"""The FCN's demo scenes, drawn from a seed with numpy and Pillow only.

Training draws its segmentation data here (:mod:`cnnserve.training.datasets`), and the
gateway's ``GET /demo/scene.png`` draws one scene for a person to try the FCN on — so this
module imports nothing the gateway install lacks (no torch, no scikit-learn).

A scene: circles, squares and triangles of random colours on a grainy background, each drawn
solid, as an outline or striped; its class mask says which pixel belongs to which kind
(:data:`~cnnserve.models.registry.SHAPE_CLASSES`, background 0).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .registry import SHAPE_CLASSES

#: Sides of one shape, in pixels (``MAX_SHAPE_SIDE`` included).
MIN_SHAPE_SIDE = 8
MAX_SHAPE_SIDE = 24
#: Smallest scene with room for the largest shape: every seed draws a scene of this side.
MIN_SCENE_SIDE = MAX_SHAPE_SIDE + 1


def shapes_scene(rng: np.random.Generator, side: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic scene: ``side×side×3`` uint8 image and ``side×side`` uint8 class mask.

    Any seed draws a scene when ``side`` is at least :data:`MIN_SCENE_SIDE`; below, only
    those whose shapes are all smaller than the scene do (numpy refuses the others).

    The classes are told apart by how a shape is drawn — flat fill, hollow outline or
    stripes — on a grainy background; circles, squares and triangles of 8–24 px appear in
    every class, so the network must read texture and edges, not colour.
    """
    background = rng.uniform(0, 255, size=3)
    grain = rng.normal(0.0, rng.uniform(12, 30), size=(side, side, 3))
    base = np.clip(background + grain, 0, 255).astype(np.uint8)
    canvas = base.copy()
    mask = np.zeros((side, side), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 6))):
        kind = SHAPE_CLASSES[int(rng.integers(1, len(SHAPE_CLASSES)))]
        size = int(rng.integers(MIN_SHAPE_SIDE, MAX_SHAPE_SIDE + 1))
        x0 = int(rng.integers(0, side - size))
        y0 = int(rng.integers(0, side - size))
        area = _shape_area(str(rng.choice(["circle", "square", "triangle"])), size, side, x0, y0)
        if kind == "outline":
            area = area & ~_eroded(area, int(rng.integers(3, 5)))
        elif kind == "striped":
            period = int(rng.integers(4, 7))
            axis = np.indices((side, side))[int(rng.integers(0, 2))]
            paint = area & ((axis % period) < period // 2)
            canvas[area & ~paint] = base[area & ~paint]
            canvas[paint] = _contrasting_colour(rng, background)
            mask[area] = SHAPE_CLASSES.index(kind)
            continue
        canvas[area] = _contrasting_colour(rng, background)
        mask[area] = SHAPE_CLASSES.index(kind)
    return canvas, mask


def _shape_area(shape: str, size: int, side: int, x0: int, y0: int) -> np.ndarray:
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    if shape == "circle":
        draw.ellipse(box, fill=1)
    elif shape == "square":
        draw.rectangle(box, fill=1)
    else:
        draw.polygon(
            [(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=1
        )
    return np.asarray(image, dtype=bool)


def _eroded(area: np.ndarray, steps: int) -> np.ndarray:
    inner = area.copy()
    for _ in range(steps):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return inner


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    while True:
        colour = rng.uniform(0, 255, size=3)
        if np.abs(colour - background).sum() > 150:
            return (int(colour[0]), int(colour[1]), int(colour[2]))
