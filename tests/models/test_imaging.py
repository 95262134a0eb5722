"""Decoding untrusted image bytes: formats, channel handling, and every way it can fail."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cnnserve.errors import InvalidInputError
from cnnserve.models import imaging
from cnnserve.models.imaging import (
    MASK_COLOURS,
    ImageHeader,
    decode_rgb,
    encode_mask_png,
    encode_png,
    read_header,
)

from ..images import encode, png_declaring


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    rgb = decode_rgb(encode(gray))
    assert rgb.shape == (30, 20, 3)
    assert np.array_equal(rgb[..., 0], gray)
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_jpeg_decodes() -> None:
    rgb = np.full((16, 24, 3), 200, dtype=np.uint8)
    decoded = decode_rgb(encode(rgb, fmt="JPEG"))
    assert decoded.shape == (16, 24, 3)
    assert abs(int(decoded.mean()) - 200) <= 2


def test_rgba_dark_ink_on_transparency_lands_on_white() -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[4:6, :, 3] = 255  # an opaque black bar; the rest transparent
    rgb = decode_rgb(encode(rgba))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[5, 5].tolist() == [0, 0, 0]


def test_rgba_light_ink_on_transparency_lands_on_black() -> None:
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[4:6, :] = 255
    rgb = decode_rgb(encode(rgba))
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[5, 5].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "could not decode"),
        (encode(np.zeros((8, 8), dtype=np.uint8))[:40], "could not decode"),
        (encode(np.zeros((8, 8), dtype=np.uint8), fmt="GIF"), "GIF is not accepted"),
    ],
    ids=["empty", "garbage", "truncated-png", "gif"],
)
def test_bad_bytes_are_invalid_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        decode_rgb(data)


def test_bytes_of_no_image_format_get_the_same_message_every_time() -> None:
    # Pillow's own message names a BytesIO object's address, new on every call.
    messages = set()
    for _ in range(3):
        with pytest.raises(InvalidInputError) as refused:
            decode_rgb(b"definitely not an image")
        messages.add(str(refused.value))
    assert messages == {"could not decode image: its bytes are not a PNG or JPEG image"}


def test_declared_size_is_checked_before_decoding() -> None:
    big = encode(np.zeros((300, 300), dtype=np.uint8))
    with pytest.raises(InvalidInputError, match=r"300×300 = 90000 pixels; the limit is 1000"):
        decode_rgb(big, max_pixels=1000)


def test_png_round_trip() -> None:
    mask = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    assert np.array_equal(decode_rgb(encode_png(mask))[..., 0], mask)


def test_mask_png_keeps_class_indices_and_shows_colours() -> None:
    mask = np.random.default_rng(0).integers(0, 4, (9, 13)).astype(np.uint8)
    image = Image.open(io.BytesIO(encode_mask_png(mask)))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask)
    rgb = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(rgb[mask == 1][0], MASK_COLOURS[1])
    assert (rgb[mask == 0] == 0).all()


def test_size_check_runs_on_the_header_before_decoding() -> None:
    """A header-only PNG declaring 4000×4000 (data truncated): ``check_header`` refuses it by
    its declared size, where decoding would first allocate 48 MB and then fail."""
    seen: list[tuple[int, int]] = []

    def refuse(header: ImageHeader) -> None:
        seen.append((header.height, header.width))
        raise InvalidInputError(f"{header.width}×{header.height} is too big for this model")

    with pytest.raises(InvalidInputError, match="4000×3000 is too big"):
        decode_rgb(png_declaring(4000, 3000), check_header=refuse)
    assert seen == [(3000, 4000)]
    with pytest.raises(InvalidInputError, match="could not decode image"):
        decode_rgb(png_declaring(4000, 3000))  # without the check: decoding is attempted


def test_a_big_png_is_shrunk_before_it_is_converted_and_blended_in_uint8() -> None:
    """A 2048² transparent PNG with light ink comes back at most 256 px a side; the blend
    rounds as float compositing does (200 at alpha 128 over black: 200·128/255 = 100.4)."""
    rgba = np.zeros((2048, 2048, 4), dtype=np.uint8)
    rgba[512:1536, 768:1280] = 255
    rgba[:, :16] = (200, 200, 200, 128)  # half-transparent gray stripe, 16 px → 1 px
    rgb = decode_rgb(encode(rgba), shrink_to_side=256)
    assert rgb.shape == (256, 256, 3)
    assert rgb[128, 128].tolist() == [255, 255, 255]
    assert rgb[0, 100].tolist() == [0, 0, 0]
    assert rgb[100, 0].tolist() == [100, 100, 100]


def test_a_big_jpeg_is_decoded_at_a_smaller_scale() -> None:
    rgb = np.full((2048, 1024, 3), 90, dtype=np.uint8)
    decoded = decode_rgb(encode(rgb, fmt="JPEG"), shrink_to_side=256)
    assert decoded.shape == (256, 128, 3)  # the decoder's 1/8 scale
    assert abs(int(decoded.mean()) - 90) <= 2


@pytest.mark.parametrize("mode", ["P", "I;16", "1"])
def test_modes_that_reduce_cannot_take_are_converted_first(mode: str) -> None:
    image = Image.new("L", (600, 300), 255).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_rgb(buffer.getvalue(), shrink_to_side=100).shape == (50, 100, 3)


def test_read_header_decodes_nothing() -> None:
    header = read_header(png_declaring(4000, 3000))  # truncated: decoding would fail
    assert (header.width, header.height, header.format) == (4000, 3000, "PNG")
    with pytest.raises(InvalidInputError, match="the limit is 1000"):
        read_header(png_declaring(40, 30), max_pixels=1000)


# --- the header reader without Pillow: the same answers as Pillow's own header ---


def _pillow_header(data: bytes) -> ImageHeader:
    with Image.open(io.BytesIO(data)) as image:
        return ImageHeader(image.size[0], image.size[1], str(image.format))


def _png_with_ihdr(fields: bytes, crc: int | None = None) -> bytes:
    ihdr = b"IHDR" + fields
    checksum = zlib.crc32(ihdr) if crc is None else crc
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(fields)) + ihdr + struct.pack(">I", checksum)
    )


def _jpeg_with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """``jpeg`` with marker segments inserted right after its SOI."""
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


GRAY = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
RGB = np.stack([GRAY, GRAY[::-1], 255 - GRAY], axis=-1)


@pytest.mark.parametrize(
    "data",
    [
        encode(GRAY),
        encode(RGB),
        encode(RGB, mode="RGBA"),
        encode(RGB, mode="P"),
        encode(RGB, mode="1"),
        encode(GRAY.astype(np.uint16) * 200, mode="I;16"),
        encode(RGB, fmt="JPEG"),
        encode(GRAY, fmt="JPEG"),
        encode(RGB, fmt="JPEG", mode="CMYK"),
        _jpeg_with_segments(encode(RGB, fmt="JPEG"), _segment(0xE1, b"Exif\0\0" + b"x" * 300)),
        _jpeg_with_segments(encode(RGB, fmt="JPEG"), b"\xff\xff\xff"),  # fill bytes
        png_declaring(4096, 3000),
    ],
    ids=[
        "gray",
        "rgb",
        "rgba",
        "palette",
        "bilevel",
        "16-bit",
        "jpeg",
        "jpeg-gray",
        "cmyk",
        "jpeg-exif",
        "jpeg-fill",
        "declared-only",
    ],
)
def test_header_reader_agrees_with_pillow(data: bytes) -> None:
    assert read_header(data, max_pixels=1 << 30) == _pillow_header(data)
    # Read by the struct reader itself, not handed to Pillow.
    assert (imaging._png_header(data) or imaging._jpeg_header(data)) == _pillow_header(data)


def test_progressive_and_interlaced_images_are_read() -> None:
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="JPEG", progressive=True)
    assert read_header(buffer.getvalue()) == ImageHeader(20, 30, "JPEG")
    buffer = io.BytesIO()
    Image.fromarray(RGB).save(buffer, format="PNG", interlace=1)
    assert read_header(buffer.getvalue()) == ImageHeader(20, 30, "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "could not decode"),
        (b"\x89PNG\r\n\x1a\n", "could not decode"),
        (encode(GRAY)[:20], "could not decode"),
        (_png_with_ihdr(struct.pack(">IIBBBBB", 20, 30, 8, 2, 0, 0, 0), crc=1), "could not"),
        (_png_with_ihdr(struct.pack(">IIBBBBB", 0, 30, 8, 2, 0, 0, 0)), "could not decode"),
        (_png_with_ihdr(struct.pack(">IIBBBBB", 20, 30, 8, 2, 1, 0, 0)), "could not decode"),
        (_png_with_ihdr(struct.pack(">IIBB", 20, 30, 8, 2)), "could not decode"),
        (encode(RGB, fmt="JPEG")[:30], "could not decode"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x14\x03" + b"\0" * 9, "could not decode"),
        (encode(GRAY, fmt="GIF"), "GIF is not accepted"),
        (encode(GRAY, fmt="BMP"), "BMP is not accepted"),
    ],
    ids=[
        "empty",
        "garbage",
        "png-signature-only",
        "png-cut-in-ihdr",
        "ihdr-bad-crc",
        "png-zero-width",
        "png-bad-compression",
        "ihdr-short",
        "jpeg-cut",
        "jpeg-zero-height",
        "gif",
        "bmp",
    ],
)
def test_header_reader_refuses_what_pillow_refuses(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        read_header(data)


def test_header_reader_checks_the_pixel_limit_of_either_format() -> None:
    for data in (png_declaring(300, 300), encode(np.zeros((300, 300), np.uint8), fmt="JPEG")):
        with pytest.raises(InvalidInputError, match=r"300×300 = 90000 pixels; the limit is 1000"):
            read_header(data, max_pixels=1000)


def test_a_jpeg_frame_after_many_segments_is_found() -> None:
    many = [_segment(0xE0 + i % 16, bytes(i % 50)) for i in range(500)]
    data = _jpeg_with_segments(encode(RGB, fmt="JPEG"), *many)
    assert read_header(data) == _pillow_header(data) == ImageHeader(20, 30, "JPEG")
