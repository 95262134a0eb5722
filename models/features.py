"""The networks' intermediate feature maps: their names, shapes, and how they travel with the
network's output as one array of rows.

Each feature map is named after the tutorial's layer that makes it and is what that layer
hands on to the next one (the tutorial's ``func1``/``func2`` show a convolution's output as
such maps):

- ConvNet (no activation functions in the tutorial's network): ``conv1`` ``[N,32,28,28]``,
  ``pool1`` ``[N,32,14,14]``, ``conv2`` ``[N,64,14,14]``, ``pool2`` ``[N,64,7,7]`` — each
  module's output — and ``fc1`` ``[N,512]``, the first linear layer's output;
- FCN (a ReLU after every layer): ``conv1`` ``[N,32,H-2,W-2]``, ``conv2`` ``[N,64,H-4,W-4]``,
  ``conv3`` ``[N,128,H-6,W-6]``, ``unsample1`` ``[N,64,H-4,W-4]``, ``unsample2``
  ``[N,32,H-2,W-2]`` — each layer's output after its ReLU, as the next layer receives it.

All FP32. A run that computes feature maps answers one float32 row per item: the network's
output flattened, then each requested map flattened, in the order asked
(:func:`pack_rows`); every shape follows from the item's height and width
(:func:`item_shapes`), so rows travel as one array through the batcher, the batching
process and TorchServe, and are split apart again only for the request that asked
(:func:`split_rows`).

This module needs no torch (the gateway imports it); the module that computes the maps is
:mod:`.feature_network`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .spec import Architecture, ModelSpec, Task

#: Feature maps of each architecture, in the order the network computes them.
FEATURE_LAYERS: dict[Architecture, tuple[str, ...]] = {
    Architecture.CONVNET: ("conv1", "pool1", "conv2", "pool2", "fc1"),
    Architecture.FCN: ("conv1", "conv2", "conv3", "unsample1", "unsample2"),
}
#: The network output's key beside the maps' in the feature artifacts' answers.
NETWORK_OUTPUT = "output"
#: Bytes per element of a feature map (FP32).
FEATURE_ITEM_BYTES = 4


def layer_shape(architecture: Architecture, layer: str, height: int, width: int) -> tuple[int, ...]:
    """One item's shape of ``layer`` for an input of ``height``×``width`` (no batch axis)."""
    if architecture is Architecture.CONVNET:
        shapes = {
            "conv1": (32, height, width),
            "pool1": (32, height // 2, width // 2),
            "conv2": (64, height // 2, width // 2),
            "pool2": (64, height // 4, width // 4),
            "fc1": (512,),
        }
        return shapes[layer]
    # Valid 3×3 convolutions take 2 pixels off each side, transposed ones add 2 back.
    channels, less = {
        "conv1": (32, 2),
        "conv2": (64, 4),
        "conv3": (128, 6),
        "unsample1": (64, 4),
        "unsample2": (32, 2),
    }[layer]
    return channels, height - less, width - less


def feature_metadata(
    architecture: Architecture, layers: Sequence[str], fixed_size: tuple[int, int] | None
) -> list[tuple[str, tuple[int, ...]]]:
    """Each of ``layers`` with its shape as metadata lists it: ``-1`` for the batch and, on a
    network that takes any size, for the height and width."""
    if fixed_size is not None:
        return [(n, (-1, *layer_shape(architecture, n, *fixed_size))) for n in layers]
    return [(n, (-1, layer_shape(architecture, n, 9, 9)[0], -1, -1)) for n in layers]


def output_shape(spec: ModelSpec, height: int, width: int) -> tuple[int, ...]:
    """One item's shape of the network's own output."""
    if spec.task is Task.CLASSIFICATION:
        return (spec.num_classes,)
    return spec.num_classes, height, width


def item_shapes(
    spec: ModelSpec, layers: Sequence[str], height: int, width: int
) -> list[tuple[int, ...]]:
    """The network output's item shape, then each of ``layers``'s: the parts of one row."""
    return [
        output_shape(spec, height, width),
        *(layer_shape(spec.architecture, layer, height, width) for layer in layers),
    ]


def layer_elements(spec: ModelSpec, layers: Sequence[str], height: int, width: int) -> int:
    """Elements of ``layers``'s maps for one item."""
    return sum(math.prod(layer_shape(spec.architecture, n, height, width)) for n in layers)


def all_layers_bytes_per_pixel(spec: ModelSpec, height: int, width: int) -> int:
    """Bytes every feature map of one item takes together, per pixel of its input (rounded
    up): what a run of the feature artifacts, which produce every map, holds on top of a
    plain run."""
    elements = layer_elements(spec, FEATURE_LAYERS[spec.architecture], height, width)
    return -(-elements * FEATURE_ITEM_BYTES // max(height * width, 1))


def pack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The network output and its feature maps (each ``N×…``) as one float32 ``N×total``
    array: item ``i``'s row is each array's item ``i`` flattened, back to back."""
    count = len(arrays[0])
    return np.concatenate(
        [np.asarray(a, dtype=np.float32).reshape(count, -1) for a in arrays], axis=1
    )


def split_rows(rows: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """:func:`pack_rows` undone: ``N×total`` rows → one ``N×shape`` array per item shape
    (views of ``rows``, no copy). A width that does not add up is a ``ValueError``."""
    sizes = [math.prod(shape) for shape in shapes]
    if rows.ndim != 2 or rows.shape[1] != sum(sizes):
        raise ValueError(
            f"feature rows of shape {list(rows.shape)} do not hold parts of {sum(sizes)} elements"
        )
    bounds = np.cumsum([0, *sizes]).tolist()
    count = len(rows)
    return [
        rows[:, start:stop].reshape(count, *shape)
        for start, stop, shape in zip(bounds[:-1], bounds[1:], shapes, strict=True)
    ]
