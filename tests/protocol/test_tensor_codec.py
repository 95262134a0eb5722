"""Raw tensor bytes and value lists ↔ arrays: exact round trips and actionable errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cnnserve.protocol.domain import DATATYPES
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.tensor_codec import decode_raw, decode_values, encode_raw

FIXED = [name for name in DATATYPES if name != "BYTES"]


@given(st.sampled_from(FIXED), st.data())
def test_raw_round_trip_every_fixed_datatype(datatype: str, data: st.DataObject) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4))
    array = data.draw(hnp.arrays(DATATYPES[datatype], shape))
    raw = encode_raw(datatype, array)
    assert len(raw) == array.size * DATATYPES[datatype].itemsize
    decoded = decode_raw("t", datatype, shape, raw)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_raw_is_little_endian_row_major() -> None:
    array = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert encode_raw("FP32", array) == struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    big_endian = array.astype(">f4")
    assert encode_raw("FP32", big_endian) == struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_bytes_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    raw = encode_raw("BYTES", array)
    assert raw == b"".join(struct.pack("<I", len(i)) + i for i in items)
    assert decode_raw("t", "BYTES", (len(items),), raw).tolist() == items


def test_bytes_reshaped_to_declared_shape() -> None:
    raw = b"".join(struct.pack("<I", 1) + bytes([i]) for i in range(6))
    decoded = decode_raw("t", "BYTES", (2, 3), raw)
    assert decoded.shape == (2, 3)
    assert decoded[1, 2] == b"\x05"


@pytest.mark.parametrize(
    ("datatype", "shape", "raw", "message"),
    [
        ("FP32", (1, 3, 28, 28), b"\0" * 100, "needs 9408 bytes of raw data, got 100"),
        ("INT64", (2,), b"\0" * 17, "needs 16 bytes"),
        ("FP32", (-1, 3), b"", "dimensions must be integers ≥ 0"),
        ("FLOAT", (1,), b"\0" * 4, "unknown datatype 'FLOAT'"),
        ("BOOL", (2,), b"\x01\x02", "BOOL elements must be bytes 0 or 1"),
        ("BYTES", (2,), struct.pack("<I", 1) + b"a", "declares 2 BYTES elements, raw data holds 1"),
        ("BYTES", (1,), struct.pack("<I", 9) + b"abc", "declares 9 bytes but only 3 remain"),
        ("BYTES", (1,), b"\x01\x00", "ends inside the 4-byte length"),
        ("BYTES", (1,), struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), "continues after"),
    ],
)
def test_raw_errors_name_the_problem(
    datatype: str, shape: tuple[int, ...], raw: bytes, message: str
) -> None:
    with pytest.raises(CodecError, match="tensor 'x'") as caught:
        decode_raw("x", datatype, shape, raw)
    assert message in str(caught.value)


def test_values_flat_and_nested_agree() -> None:
    flat = decode_values("t", "FP32", (2, 2), [1, 2.5, 3, 4])
    nested = decode_values("t", "FP32", (2, 2), [[1, 2.5], [3, 4]])
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, [[1, 2.5], [3, 4]])


def test_values_of_each_kind() -> None:
    assert decode_values("t", "BOOL", (2,), [True, False]).tolist() == [True, False]
    assert decode_values("t", "UINT8", (3,), [0, 7, 255]).dtype == np.uint8
    assert decode_values("t", "BYTES", (1, 2), [["a", "é"]]).tolist() == [[b"a", "é".encode()]]
    assert decode_values("t", "FP64", (0,), []).shape == (0,)


@pytest.mark.parametrize(
    ("datatype", "shape", "values", "message"),
    [
        ("UINT8", (2,), [0, 256], "values must lie in [0, 255], got values in [0, 256]"),
        ("INT32", (1,), [1.5], "INT32 data must be integers, got fractional numbers"),
        ("FP32", (1,), ["1"], "FP32 data must be numbers, got strings"),
        ("BOOL", (1,), [1], "BOOL data must be true/false values"),
        ("FP32", (2, 2), [1, 2, 3], "FP32 [2, 2] needs 4 elements, got 3"),
        ("FP32", (2, 2), [[1, 2], [3]], "ragged nested list"),
        ("BYTES", (1,), [1], "BYTES data must be strings, got int"),
    ],
)
def test_value_errors_name_the_problem(
    datatype: str, shape: tuple[int, ...], values: list[object], message: str
) -> None:
    with pytest.raises(CodecError, match="tensor 'x'") as caught:
        decode_values("x", datatype, shape, values)
    assert message in str(caught.value)


def test_empty_integer_tensor() -> None:
    assert decode_values("t", "INT32", (0, 3), []).shape == (0, 3)


def test_uint64_values_past_int64_keep_every_digit() -> None:
    assert decode_values("t", "UINT64", (2,), [1, 2**64 - 1]).tolist() == [1, 2**64 - 1]


@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((0, 2**62), "more elements than any request can carry"),
        ((0, 2**40, 2**40), "more elements than any request can carry"),
        ((1,) * 70, "70 dimensions; at most 32"),
    ],
)
def test_shapes_numpy_cannot_hold_are_bad_input(
    datatype: str, shape: tuple[int, ...], message: str
) -> None:
    """Regression (found by tests/gateway/test_bad_input.py): numpy refuses these shapes
    with a ValueError that used to surface as INTERNAL, even with zero elements."""
    # One element in either format: an FP32 zero, or a BYTES element of length 0.
    raw = b"" if 0 in shape else bytes(4)
    with pytest.raises(CodecError, match=message):
        decode_raw("t", datatype, shape, raw)
    with pytest.raises(CodecError, match=message):
        decode_values("t", datatype, shape, [])
