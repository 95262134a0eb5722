"""The packed-batch format: exact round trips, and every malformed batch named and refused."""

from __future__ import annotations

import io
import json

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
    error_body,
    is_packed,
    pack,
    unpack,
    unpack_response,
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
