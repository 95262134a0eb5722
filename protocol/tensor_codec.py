"""Tensor bytes and value lists ↔ numpy arrays, shared by the gRPC and HTTP transports.

Both wire formats of the Open Inference Protocol carry a tensor either as *raw bytes*
(gRPC ``raw_input_contents``, HTTP's binary tensor extension: little-endian, row-major, no
padding; a BYTES element is a 4-byte little-endian length followed by its bytes) or as a
*list of values* (gRPC typed ``contents``, HTTP JSON ``data``). Fixed-size datatypes decode
with one :func:`numpy.frombuffer` call — no Python per element on the fast path — after the
byte count is checked against shape × element size, so a lying header costs nothing.
Every failure is a :class:`~cnnserve.protocol.errors.CodecError` naming the tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .domain import DATATYPES
from .errors import CodecError

BYTES = "BYTES"
#: Length prefix of one BYTES element in the raw format.
_LENGTH = struct.Struct("<I")
#: Most dimensions a tensor may declare (numpy holds at most 64; no model here needs 5).
MAX_RANK = 32
#: Most elements a shape may declare, zero dimensions counted as 1: far beyond any message,
#: and small enough that numpy can size the array (it refuses (0, 2**62) outright).
MAX_ELEMENTS = 2**48
_INT_TYPE = {int}


def check_datatype(name: str, datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype of an OIP datatype, or an error listing the accepted names."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise CodecError(
            f"tensor {name!r} has unknown datatype {datatype!r}; "
            f"expected one of {', '.join(DATATYPES)}"
        ) from None


def check_shape(name: str, shape: Iterable[int]) -> tuple[int, ...]:
    """The shape as a tuple, after checking every dimension is a non-negative integer."""
    dims = tuple(shape)
    # Every request's shape passes here: checked with C-level passes (the types, the
    # smallest dimension), not a Python loop over the dimensions. ``type is int`` also
    # refuses bool, an int subclass.
    if not set(map(type, dims)) <= _INT_TYPE or (dims and min(dims) < 0):
        raise CodecError(f"tensor {name!r} has shape {list(dims)}; dimensions must be integers ≥ 0")
    if len(dims) > MAX_RANK:
        raise CodecError(
            f"tensor {name!r} has {len(dims)} dimensions; at most {MAX_RANK} are accepted"
        )
    counted = dims if 0 not in dims else [dim or 1 for dim in dims]
    if math.prod(counted) > MAX_ELEMENTS:
        raise CodecError(
            f"tensor {name!r} has shape {list(dims)}, more elements than any request can carry"
        )
    return dims


@dataclass(frozen=True)
class InputLimits:
    """What a server accepts in one input, checked against its declared shape before any of
    its contents are converted: a message within the size limit can still hold millions of
    tiny elements, each a Python object while it is converted."""

    #: Most elements a numeric input may declare.
    max_elements: int
    #: Most elements a BYTES input may declare.
    max_bytes_elements: int


def check_declared(name: str, datatype: str, dims: tuple[int, ...], limits: InputLimits) -> None:
    """Refuse an input declaring more elements than ``limits`` allow: it can never succeed."""
    count = math.prod(dims)
    limit = limits.max_bytes_elements if datatype == BYTES else limits.max_elements
    if count > limit:
        raise CodecError(
            f"tensor {name!r} declares {count} {datatype} elements {list(dims)}; a request may "
            f"carry at most {limit}"
        )


def check_count(name: str, datatype: str, dims: tuple[int, ...], count: int) -> None:
    """Refuse contents of ``count`` elements for a shape that declares another number."""
    if count != math.prod(dims):
        raise _count_error(name, datatype, dims, count)


def _wire_dtype(datatype: str) -> np.dtype[np.generic]:
    # Wire bytes are little-endian whatever the host's order.
    return DATATYPES[datatype].newbyteorder("<")


def decode_raw(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> np.ndarray:
    """Raw tensor bytes → an array of ``shape`` (object array of ``bytes`` for BYTES).

    A fixed-size datatype's array is a read-only view of ``raw``, not a copy: it keeps
    ``raw``'s buffer alive, and a received message's bytes never change under it."""
    check_datatype(name, datatype)
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if datatype == BYTES:
        return _decode_bytes_elements(name, raw, count).reshape(dims)
    dtype = _wire_dtype(datatype)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise CodecError(
            f"tensor {name!r}: {datatype} {list(dims)} needs {expected} bytes of raw data, "
            f"got {len(raw)}"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(dims)
    if datatype == "BOOL" and array.view(np.uint8).max(initial=0) > 1:
        raise CodecError(f"tensor {name!r}: BOOL elements must be bytes 0 or 1")
    return array


def _decode_bytes_elements(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """Length-prefixed elements; the data must hold exactly ``count`` of them."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(elements) == count:
            raise CodecError(
                f"tensor {name!r}: raw BYTES data continues after the {count} elements its "
                "shape declares"
            )
        if offset + _LENGTH.size > len(view):
            raise CodecError(
                f"tensor {name!r}: raw BYTES data ends inside the 4-byte length of element "
                f"{len(elements)}"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise CodecError(
                f"tensor {name!r}: BYTES element {len(elements)} declares {length} bytes but "
                f"only {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise CodecError(
            f"tensor {name!r}: shape declares {count} BYTES elements, raw data holds "
            f"{len(elements)}"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array


def encode_raw(datatype: str, array: np.ndarray) -> bytes:
    """An array → raw tensor bytes in the wire format of ``datatype``."""
    if datatype == BYTES:
        return b"".join(
            _LENGTH.pack(len(item)) + item for item in (_as_bytes(x) for x in array.flat)
        )
    return np.ascontiguousarray(array, dtype=_wire_dtype(datatype)).tobytes()


def _as_bytes(item: object) -> bytes:
    if isinstance(item, str):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview | np.bytes_):
        return bytes(item)
    raise TypeError(f"BYTES element must be bytes or str, got {type(item).__name__}")


def decode_values(
    name: str, datatype: str, shape: Sequence[int], values: Sequence[object] | np.ndarray
) -> np.ndarray:
    """A list of element values (flat or nested, row-major) → an array of ``shape``.

    Values must fit the datatype exactly: no fractions in an integer tensor, no out-of-range
    integers, ``true``/``false`` only for BOOL, strings or bytes only for BYTES.
    """
    dtype = check_datatype(name, datatype)
    dims = check_shape(name, shape)
    count = math.prod(dims)
    if datatype == BYTES:
        flat = _flatten_bytes(name, values, count)
        if len(flat) > count:
            raise CodecError(
                f"tensor {name!r}: {datatype} {list(dims)} needs {count} elements, got more"
            )
        if len(flat) < count:
            raise _count_error(name, datatype, dims, len(flat))
        array = np.empty(count, dtype=object)
        array[:] = flat
        return array.reshape(dims)
    try:
        given = np.asarray(values)
    except ValueError:
        raise CodecError(
            f"tensor {name!r}: data is a ragged nested list; send a flat list or a rectangular one"
        ) from None
    if given.size != count:
        raise _count_error(name, datatype, dims, given.size)
    if dtype.kind in "iu" and given.size and given.dtype.kind in "fO":
        # Integers past int64 make numpy guess float64 (losing digits) or object: when every
        # value is a Python int, range-check the values as given.
        exact = np.asarray(values, dtype=object).reshape(dims)
        if all(type(v) is int for v in exact.flat):
            _check_range(name, datatype, dtype, min(exact.flat), max(exact.flat))
            return exact.astype(dtype)
    return _convert(name, datatype, dtype, given.reshape(dims))


def _count_error(name: str, datatype: str, dims: tuple[int, ...], got: int) -> CodecError:
    return CodecError(
        f"tensor {name!r}: {datatype} {list(dims)} needs {math.prod(dims)} elements, got {got}"
    )


def _convert(
    name: str, datatype: str, dtype: np.dtype[np.generic], given: np.ndarray
) -> np.ndarray:
    """Cast ``given`` to ``dtype`` only where no value changes."""
    kind = given.dtype.kind
    if given.size == 0:
        return given.astype(dtype)
    if dtype.kind == "b":
        if kind != "b":
            raise CodecError(f"tensor {name!r}: BOOL data must be true/false values")
        return given.astype(dtype)
    if dtype.kind in "iu":
        if kind not in "iu":
            raise CodecError(
                f"tensor {name!r}: {datatype} data must be integers, got {_kind_name(kind)}"
            )
        _check_range(name, datatype, dtype, int(given.min()), int(given.max()))
        return given.astype(dtype)
    if kind not in "iuf":
        raise CodecError(
            f"tensor {name!r}: {datatype} data must be numbers, got {_kind_name(kind)}"
        )
    return given.astype(dtype)


def _check_range(
    name: str, datatype: str, dtype: np.dtype[np.generic], low: int, high: int
) -> None:
    info = np.iinfo(dtype)  # type: ignore[type-var]
    if low < info.min or high > info.max:
        raise CodecError(
            f"tensor {name!r}: {datatype} values must lie in [{info.min}, {info.max}], "
            f"got values in [{low}, {high}]"
        )


def _kind_name(kind: str) -> str:
    return {"b": "booleans", "f": "fractional numbers", "U": "strings", "O": "mixed values"}.get(
        kind, "other values"
    )


def _flatten_bytes(name: str, values: Sequence[object] | np.ndarray, count: int) -> list[bytes]:
    """The elements, row-major; stops at ``count + 1`` (already too many: no need to walk
    millions more)."""
    flat: list[bytes] = []
    stack: list[object] = [values]
    # Depth-first, row-major, without recursion (a deeply nested body cannot blow the stack).
    while stack and len(flat) <= count:
        item = stack.pop()
        if isinstance(item, str):
            flat.append(item.encode())
        elif isinstance(item, bytes | bytearray | memoryview | np.bytes_):
            flat.append(bytes(item))
        elif isinstance(item, list | tuple | np.ndarray):
            stack.extend(reversed(list(item)))
        else:
            raise CodecError(
                f"tensor {name!r}: BYTES data must be strings, got {type(item).__name__}"
            )
    return flat
