"""The packed-batch formats (float32 and encoded images, and the answers with per-item
failures): exact round trips, and every malformed batch named and refused."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc

import numpy as np
import pytest

from cnnserve.errors import (
    ERROR_CLASSES,
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    InvalidInputError,
    PayloadTooLargeError,
)
from cnnserve.handlers.packing import (
    IMAGES_MAGIC,
    MAX_BATCH_IMAGES,
    RESULTS_MAGIC,
    error_body,
    is_image_batch,
    is_packed,
    pack,
    pack_images,
    pack_results,
    unpack,
    unpack_images,
    unpack_response,
    unpack_results,
)
from cnnserve.protocol.status import http_status


def npy(array: np.ndarray) -> bytes:
    """``array`` saved by NumPy itself, bypassing pack()'s checks."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def batch(*shape: int) -> np.ndarray:
    return np.random.default_rng(sum(shape)).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 3, 28, 28), (3, 3, 45, 64), (2, 3, 7, 512)])
def test_inputs_round_trip_exactly(shape: tuple[int, ...]) -> None:
    original = batch(*shape)
    data = pack(original)
    assert is_packed(data)
    restored = unpack(data)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(restored, original)
    restored[0, 0, 0, 0] = 5.0  # the caller owns a writable copy
    assert original[0, 0, 0, 0] != 5.0


@pytest.mark.parametrize("shape", [(3, 10), (2, 4, 9, 11)])
def test_outputs_of_either_rank_round_trip(shape: tuple[int, ...]) -> None:
    original = batch(*shape)
    np.testing.assert_array_equal(unpack_response(pack(original, ndim=None)), original)


def test_numpy_files_from_elsewhere_are_accepted() -> None:
    original = batch(2, 3, 28, 28)
    np.testing.assert_array_equal(unpack(npy(original)), original)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            batch(2, 3, 28, 28).astype(np.float64),
            "expected little-endian FP32, got FP64 [2, 3, 28, 28]",
        ),
        (batch(2, 3, 28, 28).astype(">f4"), "got big-endian FP32 [2, 3, 28, 28]"),
        (np.zeros((2, 3, 28, 28), np.int64), "got INT64 [2, 3, 28, 28]"),
        (batch(3, 28, 28), "expected an FP32 array of rank 4, got FP32 [3, 28, 28]"),
        (np.zeros((0, 3, 28, 28), np.float32), "at least one item"),
        (np.asfortranarray(batch(2, 3, 8, 8)), "must be in C order"),
    ],
)
def test_malformed_batches_are_named(array: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        unpack(npy(array))
    assert message in str(info.value)


def test_pack_refuses_what_unpack_would() -> None:
    with pytest.raises(InvalidInputError, match="got FP64"):
        pack(batch(1, 3, 8, 8).astype(np.float64))
    with pytest.raises(InvalidInputError, match="rank 4"):
        pack(batch(3, 10))


def test_bytes_that_are_not_npy_are_refused() -> None:
    with pytest.raises(InvalidInputError, match=r"not a \.npy file"):
        unpack(b"\x89PNG\r\n\x1a\n not a batch")


def test_truncated_data_is_refused() -> None:
    data = pack(batch(2, 3, 28, 28))
    with pytest.raises(InvalidInputError, match=r"header says \[2, 3, 28, 28\]"):
        unpack(data[:-4])


def lying_npy(shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npy header claiming ``shape``, followed by ``data``."""
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def test_a_header_claiming_more_than_follows_is_refused_before_allocating() -> None:
    with pytest.raises(PayloadTooLargeError, match=r"\[1000000000, 3, 512, 512\]"):
        unpack(lying_npy((10**9, 3, 512, 512), b"\0" * 64))
    with pytest.raises(InvalidInputError, match="but 64 bytes follow it"):
        unpack(lying_npy((1000, 3, 8, 8), b"\0" * 64))


def test_a_header_whose_size_overflows_int64_is_refused() -> None:
    # 2**32 · 2**32 · 1 · 4 items wrap to 0 in int64: counted as such, the header would pass
    # the size check and claim an empty body.
    with pytest.raises(PayloadTooLargeError, match=r"\[4294967296, 4294967296, 1, 4\]"):
        unpack(lying_npy((2**32, 2**32, 1, 4), b""))


def test_size_limit() -> None:
    data = pack(batch(4, 3, 64, 64))
    with pytest.raises(PayloadTooLargeError, match="the limit is 1000 bytes"):
        unpack(data, max_bytes=1000)
    with pytest.raises(PayloadTooLargeError):
        pack(batch(4, 3, 64, 64), max_bytes=1000)


def test_a_malformed_header_is_refused() -> None:
    data = bytearray(pack(batch(1, 3, 8, 8)))
    data[10:20] = b"@@@@@@@@@@"
    with pytest.raises(InvalidInputError, match=r"malformed \.npy header"):
        unpack(bytes(data))


@pytest.mark.parametrize("error", list(ERROR_CLASSES.values()))
def test_error_bodies_raise_the_matching_error(error: type[CnnserveError]) -> None:
    body = error_body(error("item 2 is bad"))
    with pytest.raises(error, match="item 2 is bad") as info:
        unpack_response(body)
    assert type(info.value) is error
    # People calling TorchServe directly read the HTTP status in the body too.
    assert json.loads(body)["code"] == http_status(error("x"))


def test_an_error_that_is_not_ours_travels_as_internal_with_no_details() -> None:
    body = error_body(RuntimeError("CUDA out of memory at 0x7f3a"))
    with pytest.raises(CnnserveError) as info:
        unpack_response(body)
    assert type(info.value) is CnnserveError
    assert str(info.value) == GENERIC_INTERNAL_MESSAGE
    assert json.loads(body)["code"] == 500


def test_an_answer_that_is_neither_output_nor_error_is_internal() -> None:
    with pytest.raises(CnnserveError, match="neither a packed output nor an error"):
        unpack_response(b"Prediction failed")


# --- image batches: encoded images in, outputs and per-item failures out ---

IMAGES = [b"\x89PNG first", b"J", b"third image, longer than the others"]


@pytest.mark.parametrize("declared", [None, (64, 45)])
def test_image_batches_round_trip_exactly(declared: tuple[int, int] | None) -> None:
    data = pack_images(IMAGES, declared)
    assert is_image_batch(data) and not is_packed(data)
    batch = unpack_images(data)
    assert batch.images == IMAGES
    assert batch.declared_size == declared


def lying_images(
    count: int, lengths: list[int], body: bytes, size: tuple[int, int] = (0, 0)
) -> bytes:
    """An image batch header claiming ``count`` images of ``lengths``, followed by ``body``."""
    table = struct.pack(f"<{len(lengths)}I", *lengths)
    return IMAGES_MAGIC + struct.pack("<III", count, *size) + table + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lying_images(2, [5, 5], b"x" * 9), "add up to 10 bytes, but 9 follow them"),
        (lying_images(2, [5, 5], b"x" * 11), "add up to 10 bytes, but 11 follow them"),
        (lying_images(3, [4, 0, 4], b"x" * 8), "image 1 of the batch is empty"),
        (lying_images(0, [], b""), "holds 1 to 4096 images, this one says 0"),
        (lying_images(4097, [], b""), "this one says 4097"),
        (lying_images(1000, [1] * 10, b"x" * 10), "cannot hold their length table"),
        (lying_images(1, [1], b"x", (0, 45)), "declared size must be positive, got 0×45"),
        (IMAGES_MAGIC + b"\0\0", "shorter than its header"),
        (b"\x89PNG\r\n\x1a\n", "missing its magic bytes"),
    ],
)
def test_malformed_image_batches_are_named(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        unpack_images(data)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        # Every length at its largest: 4096 · 4 GiB claimed, a few bytes sent.
        lying_images(MAX_BATCH_IMAGES, [2**32 - 1] * MAX_BATCH_IMAGES, b"x" * 64),
        lying_images(2**32 - 1, [2**32 - 1] * 16, b"x" * 64),
    ],
)
def test_lying_image_batches_are_refused_before_allocating(data: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError):
            unpack_images(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The length table itself (16 KiB at most) and small change; nothing sized by the lie.
    assert peak < 4 * len(data) + 64 * 1024


def test_image_batch_size_limit() -> None:
    with pytest.raises(PayloadTooLargeError, match="the limit is 20 bytes"):
        pack_images(IMAGES, max_bytes=20)
    with pytest.raises(PayloadTooLargeError, match="the limit is 20 bytes"):
        unpack_images(pack_images(IMAGES), max_bytes=20)
    with pytest.raises(PayloadTooLargeError):
        unpack_images(pack_images([b"x" * 50_000]), max_bytes=20)


def test_pack_images_refuses_what_unpack_would() -> None:
    with pytest.raises(InvalidInputError, match="image 1 of the batch is empty"):
        pack_images([b"a", b"", b"c"])
    with pytest.raises(InvalidInputError, match="this one says 0"):
        pack_images([])


def failures(*indices: int) -> dict[int, CnnserveError]:
    return {index: InvalidInputError(f"could not decode image {index}") for index in indices}


def test_results_without_failures_are_a_plain_packed_output() -> None:
    outputs = batch(3, 10)
    data = pack_results(outputs, {}, 3)
    assert is_packed(data)
    results = unpack_results(data, 3)
    np.testing.assert_array_equal(results.outputs, outputs)
    assert results.failures == {}


def test_results_carry_the_outputs_of_every_item_and_each_failure() -> None:
    outputs = batch(3, 4, 9, 11)
    results = unpack_results(pack_results(outputs, failures(0, 2), 3), 3)
    np.testing.assert_array_equal(results.outputs, outputs)
    assert sorted(results.failures) == [0, 2]
    assert all(type(error) is InvalidInputError for error in results.failures.values())
    assert str(results.failures[2]) == "could not decode image 2"


def test_results_of_a_batch_whose_every_item_failed_carry_no_outputs() -> None:
    results = unpack_results(pack_results(None, failures(0, 1), 2), 2)
    assert results.outputs is None
    assert sorted(results.failures) == [0, 1]


def test_an_error_body_answering_an_image_batch_raises_it() -> None:
    with pytest.raises(PayloadTooLargeError, match="too big"):
        unpack_results(error_body(PayloadTooLargeError("too big")), 2)


def results_with(count: int, listed: object, outputs: bytes = b"") -> bytes:
    text = json.dumps(listed).encode()
    return RESULTS_MAGIC + struct.pack("<II", count, len(text)) + text + outputs


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (pack_results(batch(2, 10), failures(1), 2), "answered for 2 items of a 3-item batch"),
        (pack(batch(2, 10), ndim=None), "answered 2 outputs for 3 items"),
        (
            results_with(3, [{"index": 0, "status": "invalid_argument", "message": "x"}]),
            "no outputs, but only 1 of 3 items failed",
        ),
        (
            results_with(3, [{"index": 3, "status": "invalid_argument", "message": "x"}]),
            "names items outside 0…2",
        ),
        (
            results_with(3, [{"index": 1, "status": "exploded", "message": "x"}]),
            "failure list is malformed",
        ),
        (results_with(3, []), "empty or names an item twice"),
        (
            results_with(3, [{"index": 0, "status": "internal", "message": "x"}])[:-5],
            "shorter than its failure list says",
        ),
        (
            results_with(
                3,
                [{"index": 0, "status": "invalid_argument", "message": "x"}],
                pack(batch(2, 10), ndim=None),
            ),
            "answered 2 outputs for 3 items",
        ),
    ],
)
def test_results_that_do_not_account_for_every_item_are_internal(data: bytes, message: str) -> None:
    with pytest.raises(CnnserveError) as info:
        unpack_results(data, 3)
    assert type(info.value) is CnnserveError
    assert message in str(info.value)
