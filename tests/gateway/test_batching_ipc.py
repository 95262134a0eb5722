"""Frames between frontends and the batching process: arrays, encoded images and partial
results survive the trip; a frame over its limits or inconsistent with itself is refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError, UnavailableError
from cnnserve.gateway import batching_ipc as ipc
from cnnserve.gateway.batcher import PartialResults

pytestmark = pytest.mark.asyncio


def reader_of(*chunks: bytes) -> asyncio.StreamReader:
    """A stream reader that has received ``chunks`` and then the end of the stream."""
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


async def test_arrays_and_encoded_images_round_trip() -> None:
    floats = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    images = np.empty(3, dtype=object)
    images[:] = [b"\x89PNG one", b"", b"\xff\xd8 three"]
    pixels = np.arange(6, dtype=np.uint8).reshape(1, 6)[:, ::2]  # not contiguous
    frame = await ipc.read_frame(
        reader_of(*ipc.encode({"op": "infer", "id": 7}, [floats, images, pixels])), 1 << 20
    )
    assert frame.header["op"] == "infer" and frame.header["id"] == 7
    got_floats, got_images, got_pixels = frame.arrays
    np.testing.assert_array_equal(got_floats, floats)
    assert got_images.dtype == object and list(got_images) == list(images)
    np.testing.assert_array_equal(got_pixels, pixels)


async def test_partial_results_and_errors_keep_their_status() -> None:
    rows = np.ones((3, 10), np.float32)
    partial = PartialResults(rows, {1: InvalidInputError("could not decode image")}, "image")
    fields, arrays = ipc.reply_rows(partial)
    frame = await ipc.read_frame(reader_of(*ipc.encode({"id": 1, **fields}, arrays)), 1 << 20)
    got = ipc.rows_of(frame)
    assert isinstance(got, PartialResults)
    np.testing.assert_array_equal(got.rows, rows)
    assert got.item_noun == "image"
    assert list(got.failures) == [1]
    assert isinstance(got.failures[1], InvalidInputError)
    assert str(got.failures[1]) == "could not decode image"
    error = ipc.raise_error(ipc.error_header(UnavailableError("gone")))
    assert isinstance(error, UnavailableError) and str(error) == "gone"
    # Not ours: a generic message, never the internals.
    internal = ipc.error_header(RuntimeError("secret path /etc/x"))
    assert "secret" not in internal["message"]


async def test_a_frame_over_the_limit_is_refused_before_its_body_is_read() -> None:
    big = np.zeros(1000, np.float32)
    prefix, head, _ = ipc.encode({"id": 1}, [big])
    # Only the prefix and header arrive: the limit is checked from the prefix alone.
    with pytest.raises(ipc.FrameError, match="over the limits"):
        await ipc.read_frame(reader_of(prefix, head), max_body_bytes=3999)
    huge_header = ipc.PREFIX.pack(ipc.MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(ipc.FrameError, match="over the limits"):
        await ipc.read_frame(reader_of(huge_header), max_body_bytes=1 << 20)


async def test_a_body_that_disagrees_with_its_arrays_is_refused() -> None:
    _, head, body = ipc.encode({"id": 1}, [np.zeros(4, np.float32)])
    for wrong in (body[:-4], body + b"\0\0\0\0"):
        with pytest.raises(ipc.FrameError):
            await ipc.read_frame(
                reader_of(ipc.PREFIX.pack(len(head), len(wrong)), head, wrong), 1 << 20
            )
