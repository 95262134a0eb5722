"""The packed-batch wire format between the gateway and the TorchServe handler.

One TorchServe request carries a whole batch, so the two ends agree on these bytes:

- **request** — a NumPy ``.npy`` file (format 1.0/2.0, C order, little-endian float32) holding
  ``N×3×H×W`` already-normalized items, sent under the input name :data:`PACKED_INPUT_NAME`;
- **success** — a ``.npy`` file of the network's float32 output for all N items
  (``N×C`` for the ConvNet, ``N×C×H×W`` for the FCN);
- **failure** — a small JSON object ``{"code": 400, "status": "invalid_argument",
  "message": "..."}``. TorchServe's gRPC
  API answers status OK whatever HTTP status the handler sets, so the error must travel in
  the body; :func:`unpack_response` turns it back into the matching cnnserve error.

Arrays are read with the header checked first and ``allow_pickle`` never involved, so a
hostile header can neither run code nor make the reader allocate more than it was sent.
"""

from __future__ import annotations

import io
import json
import math
import tokenize

import numpy as np

from cnnserve.errors import (
    ERROR_CLASSES,
    CnnserveError,
    InvalidInputError,
    PayloadTooLargeError,
    Status,
    public_message,
    status_of,
)
from cnnserve.protocol.status import http_status

#: Input name of a packed batch in a TorchServe request (gRPC ``input`` map key).
PACKED_INPUT_NAME = "batch"
#: Media type of a packed batch or packed output.
PACKED_CONTENT_TYPE = "application/x-npy"
#: Largest packed array accepted: fits a 32-image 512×512 FCN output (128 MiB) twice over.
MAX_PACKED_BYTES = 256 * 2**20
NPY_MAGIC = b"\x93NUMPY"
#: Ranks a packed array may have: ConvNet outputs are N×C, inputs and FCN outputs N×C×H×W.
_RANKS = (2, 4)
_FLOAT32 = np.dtype("<f4")


def is_packed(data: bytes) -> bool:
    """Whether ``data`` starts like a ``.npy`` file (and so is a packed batch or output)."""
    return data[: len(NPY_MAGIC)] == NPY_MAGIC


def pack(array: np.ndarray, ndim: int | None = 4, max_bytes: int = MAX_PACKED_BYTES) -> bytes:
    """Encode a float32 array as ``.npy``, checked as :func:`unpack` will check it.

    ``ndim`` is the exact rank required (4 for an ``N×3×H×W`` input batch); ``None`` accepts
    any rank from 2 to 4 (outputs: ``N×C`` or ``N×C×H×W``).
    """
    _check(array.dtype, array.shape, max_bytes, ranks=(ndim, ndim) if ndim is not None else _RANKS)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack(data: bytes, ndim: int | None = 4, max_bytes: int = MAX_PACKED_BYTES) -> np.ndarray:
    """Decode a packed array, checking it before any memory is allocated.

    ``ndim`` is the exact rank required (4 for an input batch); ``None`` accepts any rank
    from 2 to 4 (outputs). Raises :class:`InvalidInputError` naming what is wrong.
    """
    if len(data) > max_bytes + 4096:
        raise PayloadTooLargeError(
            f"packed batch is {len(data)} bytes; the limit is {max_bytes} bytes"
        )
    if not is_packed(data):
        raise InvalidInputError("packed batch is not a .npy file (missing \\x93NUMPY magic)")
    dtype, shape, offset = _read_header(data)
    _check(dtype, shape, max_bytes, ranks=(ndim, ndim) if ndim is not None else _RANKS)
    expected = math.prod(shape) * _FLOAT32.itemsize
    if len(data) - offset != expected:
        raise InvalidInputError(
            f"packed batch header says {list(shape)} ({expected} bytes of data) "
            f"but {len(data) - offset} bytes follow it"
        )
    # A private, writable copy: the caller may hand it to torch.from_numpy.
    return np.frombuffer(data, dtype=_FLOAT32, offset=offset).reshape(shape).copy()


def _read_header(data: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif major in (2, 3):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise InvalidInputError(f"packed batch uses unsupported .npy version {major}")
    except (ValueError, SyntaxError, tokenize.TokenError) as exc:  # malformed/oversized header
        raise InvalidInputError(f"packed batch has a malformed .npy header: {exc}") from None
    if fortran_order:
        raise InvalidInputError("packed batch must be in C order, got Fortran order")
    return np.dtype(dtype), tuple(int(d) for d in shape), stream.tell()


def _check(dtype: np.dtype, shape: tuple[int, ...], max_bytes: int, ranks: tuple[int, int]) -> None:
    shown = f"{_dtype_name(dtype)} {list(shape)}"
    if dtype != _FLOAT32:
        raise InvalidInputError(f"expected little-endian FP32, got {shown}")
    low, high = ranks
    if not low <= len(shape) <= high:
        wanted = f"rank {low}" if low == high else f"rank {low} to {high}"
        raise InvalidInputError(f"expected an FP32 array of {wanted}, got {shown}")
    if shape[0] < 1 or any(d < 1 for d in shape):
        raise InvalidInputError(f"expected at least one item and no empty axis, got {shown}")
    nbytes = math.prod(shape) * _FLOAT32.itemsize
    if nbytes > max_bytes:
        raise PayloadTooLargeError(
            f"packed batch {shown} is {nbytes} bytes; the limit is {max_bytes} bytes"
        )


def _dtype_name(dtype: np.dtype) -> str:
    """Triton-style names (FP32, INT64, ...), so messages read like the rest of cnnserve's."""
    prefixes = {"f": "FP", "i": "INT", "u": "UINT"}
    if dtype.kind not in prefixes:
        return str(dtype)
    name = f"{prefixes[dtype.kind]}{dtype.itemsize * 8}"
    return f"big-endian {name}" if dtype.byteorder == ">" else name


def error_body(exc: BaseException) -> bytes:
    """The JSON body of a failed request: ``{"code": 400, "status": "invalid_argument",
    "message": "..."}`` (the HTTP status for people, the status for the gateway)."""
    body = {"code": http_status(exc), "status": status_of(exc), "message": public_message(exc)}
    return json.dumps(body, ensure_ascii=False).encode()


def unpack_response(data: bytes, max_bytes: int = MAX_PACKED_BYTES) -> np.ndarray:
    """A handler's answer to a packed batch: the output array, or the error it reports raised."""
    if is_packed(data):
        return unpack(data, ndim=None, max_bytes=max_bytes)
    try:
        error = json.loads(data)
        status, message = Status(error["status"]), str(error["message"])
    except (ValueError, TypeError, KeyError):
        raise CnnserveError(
            f"TorchServe answered neither a packed output nor an error ({len(data)} bytes)"
        ) from None
    raise ERROR_CLASSES[status](message)
