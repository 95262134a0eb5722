"""A batch of encoded images decoded where it runs: each failure stays with its item, and no
image decodes to more than the size its batch was formed for."""

from __future__ import annotations

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError
from cnnserve.models.image_batch import decode_image_batch
from cnnserve.models.imaging import DEFAULT_MAX_IMAGE_PIXELS
from cnnserve.models.registry import get_spec

from ..images import digit_png, encode, png_declaring, shapes_png

CONVNET = get_spec("convnet")
FCN = get_spec("fcn")


def test_digits_of_any_size_decode_as_the_model_steps_do() -> None:
    small = encode(np.full((20, 12), 255, np.uint8))
    digits = [digit_png(0)[0], small, digit_png(1, invert=True)[0]]
    decoded = decode_image_batch(CONVNET, digits, DEFAULT_MAX_IMAGE_PIXELS)
    assert decoded.failures == {}
    assert decoded.pixels.dtype == np.uint8
    expected = np.stack([CONVNET.image_to_pixels(d) for d in digits])
    np.testing.assert_array_equal(decoded.pixels, expected)


def test_failed_items_keep_zero_rows_and_their_own_errors() -> None:
    good = digit_png(2)[0]
    cut = good[: len(good) // 2]
    decoded = decode_image_batch(CONVNET, [cut, good, b"", good], DEFAULT_MAX_IMAGE_PIXELS)
    assert sorted(decoded.failures) == [0, 2]
    assert "could not decode image" in str(decoded.failures[0])
    assert "empty" in str(decoded.failures[2])
    assert not decoded.pixels[0].any() and not decoded.pixels[2].any()
    np.testing.assert_array_equal(decoded.pixels[1], CONVNET.image_to_pixels(good))


def test_an_image_declaring_another_size_than_its_batch_is_not_decoded() -> None:
    scene, _ = shapes_png(side=24)
    bomb = png_declaring(500, 500)  # in the model's range, not the batch's size
    decoded = decode_image_batch(FCN, [scene, bomb], DEFAULT_MAX_IMAGE_PIXELS, (24, 24))
    assert list(decoded.failures) == [1]
    assert "its batch was formed for 24×24 images" in str(decoded.failures[1])
    assert decoded.pixels.shape == (2, 3, 24, 24)


def test_every_item_failed_still_gives_a_row_each() -> None:
    decoded = decode_image_batch(FCN, [b"x", b"y", b"z"], DEFAULT_MAX_IMAGE_PIXELS, (9, 7))
    assert sorted(decoded.failures) == [0, 1, 2]
    assert decoded.pixels.shape == (3, 3, 7, 9)


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="at least one image"):
        decode_image_batch(CONVNET, [], DEFAULT_MAX_IMAGE_PIXELS)
