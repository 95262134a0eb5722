"""Model-side pre- and postprocessing shared by every backend."""

from __future__ import annotations

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError, UnknownModelError
from cnnserve.models.imaging import resize_rgb
from cnnserve.models.registry import MODELS, get_spec
from cnnserve.models.steps import (
    CONVNET_SIDE,
    DIGIT_BOX,
    class_mask,
    digit_pixels,
    normalize,
    to_chw,
)

from ..images import digit_png, encode, held_out_digit, png_declaring, shapes_png


def test_normalize_maps_pixels_to_unit_range() -> None:
    out = normalize(np.array([0, 255, 51], dtype=np.uint8))
    assert out.dtype == np.float32
    assert out.tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_digit_polarity_and_placement_do_not_matter() -> None:
    rgb, _ = held_out_digit(3)
    canonical = digit_pixels(rgb)
    assert canonical.shape == (3, 28, 28)
    assert np.array_equal(digit_pixels(255 - rgb), canonical)
    padded = np.zeros((200, 120, 3), dtype=np.uint8)
    padded[20:84, 40:104] = rgb
    assert np.abs(digit_pixels(padded).astype(int) - canonical.astype(int)).mean() < 8


def _digit_pixels_by_definition(rgb: np.ndarray) -> np.ndarray:
    """digit_pixels' steps as its docstring states them, on a float grey image."""
    gray = rgb.mean(axis=2)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if float(np.median(border)) > 127.5:
        rgb, gray = 255 - rgb, 255.0 - gray
    if gray.max() > 0:
        ink = gray > 0.3 * float(gray.max())
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        rgb = rgb[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = DIGIT_BOX / max(rgb.shape[:2])
    new_h, new_w = (max(1, round(side * scale)) for side in rgb.shape[:2])
    canvas = np.zeros((CONVNET_SIDE, CONVNET_SIDE, 3), dtype=np.uint8)
    top, left = (CONVNET_SIDE - new_h) // 2, (CONVNET_SIDE - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resize_rgb(
        np.ascontiguousarray(rgb), new_h, new_w
    )
    return to_chw(canvas)


def test_digit_pixels_equals_its_definition_to_the_bit() -> None:
    # digit_pixels reads grey levels from a table by channel sum; any image, including the
    # ties at the ink threshold and the border's median, must come out as the float steps do.
    rng = np.random.default_rng(0)
    levels = np.array([0, 1, 2, 76, 77, 127, 128, 254, 255], dtype=np.uint8)
    for case in range(600):
        height, width = (int(side) for side in rng.integers(1, 60, 2))
        if case % 3 == 0:
            rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        elif case % 3 == 1:
            rgb = rng.choice(levels, (height, width, 3))
        else:
            rgb = np.full((height, width, 3), rng.choice(levels), dtype=np.uint8)
        np.testing.assert_array_equal(digit_pixels(rgb), _digit_pixels_by_definition(rgb))


def test_blank_image_gives_a_blank_digit() -> None:
    assert not digit_pixels(np.zeros((28, 28, 3), dtype=np.uint8)).any()


@pytest.mark.parametrize("mode", [None, "L", "RGBA"])
def test_convnet_image_to_pixels_accepts_any_size_and_mode(mode: str | None) -> None:
    data, _ = digit_png(0, mode=mode)
    assert MODELS["convnet"].image_to_pixels(data).shape == (3, 28, 28)


def test_fcn_keeps_image_size() -> None:
    data, mask = shapes_png(side=40)
    assert MODELS["fcn"].image_to_pixels(data).shape == (3, 40, 40)
    assert mask.shape == (40, 40)


@pytest.mark.parametrize("side", [6, 513])
def test_fcn_rejects_sizes_out_of_range(side: int) -> None:
    data = encode(np.zeros((side, 10, 3), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match=r"fcn expects \[N,3,H,W\] with 7 ≤ H, W ≤ 512"):
        MODELS["fcn"].image_to_pixels(data)


def test_convnet_shape_check_names_expected_and_actual() -> None:
    with pytest.raises(InvalidInputError, match=r"expects \[N,3,28,28\], got \[N,3,32,32\]"):
        MODELS["convnet"].check_item_shape((3, 32, 32))
    with pytest.raises(InvalidInputError, match=r"got \[1, 28, 28\]"):
        MODELS["convnet"].check_item_shape((1, 28, 28))


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(UnknownModelError, match="served models are: convnet, fcn"):
        get_spec("resnet")


def test_mask_is_the_argmax_class() -> None:
    scores = np.zeros((1, 3, 2, 2), dtype=np.float32)
    scores[0, 2, 0, 0] = 1.0
    scores[0, 1, 1, :] = 1.0
    mask = class_mask(scores)
    assert mask.tolist() == [[[2, 0], [1, 1]]]


def test_convnet_refuses_a_png_over_its_own_pixel_cap_from_the_header() -> None:
    """A fixed-size model's PNGs are checked against its cap (1024², below the server's
    4096²) by their header: these are truncated, so decoding would fail differently."""
    spec = MODELS["convnet"]
    refused = r"convnet takes PNG images of at most 1048576 pixels \(1024×1024\); this one is "
    with pytest.raises(InvalidInputError, match=refused + "1025×1024: send it smaller, or as JPEG"):
        spec.image_to_pixels(png_declaring(1025, 1024))
    with pytest.raises(InvalidInputError, match=refused):
        spec.read_image_header(png_declaring(1025, 1024))
    assert spec.read_image_header(png_declaring(1024, 1024)).pixels == 1024 * 1024


def test_convnet_takes_a_big_jpeg_decoded_at_a_smaller_scale() -> None:
    """A JPEG is decoded at 1/8 of its size, so only the server's cap applies to it."""
    photo = np.full((3000, 4000, 3), 230, dtype=np.uint8)
    photo[1000:2000, 1800:2200] = 20  # a dark stroke on paper
    pixels = MODELS["convnet"].image_to_pixels(encode(photo, fmt="JPEG"))
    assert pixels.shape == (3, 28, 28) and pixels[:, 14, 14].min() > 200


def test_a_big_digit_image_gives_the_pixels_of_its_small_copy() -> None:
    """Shrinking while decoding changes little: a digit drawn 16× larger prepares like itself."""
    rgb, _ = held_out_digit(7)
    big = np.repeat(np.repeat(rgb, 16, axis=0), 16, axis=1)
    small = MODELS["convnet"].image_to_pixels(encode(rgb)).astype(int)
    assert np.abs(MODELS["convnet"].image_to_pixels(encode(big)).astype(int) - small).mean() < 8
