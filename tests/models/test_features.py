"""Feature map names and shapes follow the networks; rows pack and split back exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cnnserve.models.features import (
    FEATURE_LAYERS,
    feature_metadata,
    item_shapes,
    layer_elements,
    pack_rows,
    split_rows,
)
from cnnserve.models.registry import get_spec
from tests.feature_maps import demo_network, hooked_maps


@pytest.mark.parametrize(
    ("model", "height", "width"), [("convnet", 28, 28), ("fcn", 7, 7), ("fcn", 19, 23)]
)
def test_shapes_are_the_eager_networks(model: str, height: int, width: int) -> None:
    spec = get_spec(model)
    layers = FEATURE_LAYERS[spec.architecture]
    x = np.random.default_rng(0).standard_normal((2, 3, height, width), dtype=np.float32)
    eager = hooked_maps(demo_network(model), x)
    shapes = item_shapes(spec, layers, height, width)
    assert [eager[name].shape[1:] for name in ("output", *layers)] == shapes
    assert layer_elements(spec, layers, height, width) == sum(
        eager[name][0].size for name in layers
    )


def test_metadata_shapes() -> None:
    convnet, fcn = get_spec("convnet"), get_spec("fcn")
    assert feature_metadata(convnet.architecture, ("conv1", "fc1"), (28, 28)) == [
        ("conv1", (-1, 32, 28, 28)),
        ("fc1", (-1, 512)),
    ]
    assert feature_metadata(fcn.architecture, FEATURE_LAYERS[fcn.architecture], None) == [
        ("conv1", (-1, 32, -1, -1)),
        ("conv2", (-1, 64, -1, -1)),
        ("conv3", (-1, 128, -1, -1)),
        ("unsample1", (-1, 64, -1, -1)),
        ("unsample2", (-1, 32, -1, -1)),
    ]


def test_rows_pack_and_split_back_as_views() -> None:
    rng = np.random.default_rng(1)
    shapes = [(4, 5, 6), (32, 3, 4), (512,)]
    arrays = [rng.standard_normal((3, *shape), dtype=np.float32) for shape in shapes]
    rows = pack_rows(arrays)
    assert rows.shape == (3, 4 * 5 * 6 + 32 * 3 * 4 + 512)
    # One row is one item: a batch's rows split among requests keep every item whole.
    for part, array in zip(split_rows(rows[1:], shapes), arrays, strict=True):
        np.testing.assert_array_equal(part, array[1:])
        assert np.shares_memory(part, rows)
    with pytest.raises(ValueError, match="do not hold parts of"):
        split_rows(rows, shapes[:2])
