"""The packed-batch wire format between the gateway and the TorchServe handler.

One TorchServe request carries a whole batch, so the two ends agree on these bytes. A batch
travels in one of two forms, told apart by their first bytes:

- **float32 batch** — a NumPy ``.npy`` file (format 1.0/2.0, C order, little-endian float32)
  holding ``N×3×H×W`` already-normalized items (tensor and pixel inputs), sent under the input
  name :data:`PACKED_INPUT_NAME`;
- **image batch** — the encoded PNG/JPEG bytes of ``N`` images, decoded by the handler in its
  worker process (:func:`pack_images`): :data:`IMAGES_MAGIC`, then little-endian ``uint32``
  count, declared width and height (``0, 0``: none; a size-variable model's batch shares one
  size, the one the gateway priced), a ``uint32`` length per image, then the images back to
  back.

The handler answers:

- **success** — a ``.npy`` file of the network's float32 output for all N items
  (``N×C`` for the ConvNet, ``N×C×H×W`` for the FCN);
- **partial success** (image batches only) — :data:`RESULTS_MAGIC`, ``uint32`` count and
  length of a JSON list of the failed items (``[{"index": 2, "status": "invalid_argument",
  "message": "..."}]``), that JSON, then the ``.npy`` output for all N items (a failed item's
  row is a placeholder), or nothing when every item failed (:func:`pack_results`);
- **failure** — a small JSON object ``{"code": 400, "status": "invalid_argument",
  "message": "..."}``. TorchServe's gRPC
  API answers status OK whatever HTTP status the handler sets, so the error must travel in
  the body; :func:`unpack_response` turns it back into the matching cnnserve error.

Every size is checked before anything is allocated: ``.npy`` headers are read with
``allow_pickle`` never involved, an image batch's count is capped and its lengths must add up
to exactly the bytes that follow, so hostile bytes can neither run code nor make the reader
allocate more than it was sent.
"""

from __future__ import annotations

import io
import json
import math
import struct
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
#: Input beside a packed batch naming the feature maps to answer with the output, comma
#: separated (:mod:`cnnserve.models.features`); absent: the output alone.
LAYERS_INPUT_NAME = "layers"
#: Media type of a packed batch or packed output.
PACKED_CONTENT_TYPE = "application/x-npy"
#: Largest packed array accepted: fits a 32-image 512×512 FCN output (128 MiB) twice over.
MAX_PACKED_BYTES = 256 * 2**20
NPY_MAGIC = b"\x93NUMPY"
#: Ranks a packed array may have: ConvNet outputs are N×C, inputs and FCN outputs N×C×H×W.
_RANKS = (2, 4)
_FLOAT32 = np.dtype("<f4")
#: First bytes of a packed image batch (like ``.npy``'s, a byte no text or image starts with).
IMAGES_MAGIC = b"\x93CNNIMGS"
#: First bytes of an answer that carries per-item failures.
RESULTS_MAGIC = b"\x93CNNRSLT"
#: Media type of an answer with per-item failures.
RESULTS_CONTENT_TYPE = "application/x-cnnserve-results"
#: Most images one packed image batch may hold: far above any batch the gateway forms, and
#: it bounds the length table read before anything else.
MAX_BATCH_IMAGES = 4096
#: An image batch's count, declared width and declared height.
_IMAGES_HEADER = struct.Struct("<III")
#: A results answer's count and failure-list length.
_RESULTS_HEADER = struct.Struct("<II")
_UINT32 = np.dtype("<u4")


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


@dataclass(frozen=True)
class ImageBatch:
    """A packed image batch, read: the encoded images, and the ``(width, height)`` every one
    declared when the batch was formed (``None``: not declared; a fixed-size model's images
    may differ)."""

    images: list[bytes]
    declared_size: tuple[int, int] | None


@dataclass(frozen=True)
class BatchResults:
    """A handler's answer to an image batch: the outputs for all its items (``None`` when
    every item failed) and each failed item's error by its index in the batch."""

    outputs: np.ndarray | None
    failures: dict[int, CnnserveError]


def is_image_batch(data: bytes) -> bool:
    """Whether ``data`` starts like a packed image batch."""
    return data[: len(IMAGES_MAGIC)] == IMAGES_MAGIC


def pack_images(
    images: Sequence[bytes],
    declared_size: tuple[int, int] | None = None,
    max_bytes: int = MAX_PACKED_BYTES,
) -> bytes:
    """Encode ``images`` (PNG/JPEG bytes) as one image batch, checked as
    :func:`unpack_images` will check it; ``declared_size`` is ``(width, height)``."""
    lengths = np.array([len(image) for image in images], dtype=np.int64)
    _check_image_count(len(images))
    _check_declared_size(declared_size)
    if (lengths < 1).any():
        raise InvalidInputError(f"image {int(np.argmin(lengths))} of the batch is empty")
    total = int(lengths.sum())
    if total > max_bytes:
        raise PayloadTooLargeError(
            f"image batch is {total} bytes of images; the limit is {max_bytes} bytes"
        )
    width, height = declared_size or (0, 0)
    return b"".join(
        (
            IMAGES_MAGIC,
            _IMAGES_HEADER.pack(len(images), width, height),
            lengths.astype(_UINT32).tobytes(),
            *images,
        )
    )


def unpack_images(data: bytes, max_bytes: int = MAX_PACKED_BYTES) -> ImageBatch:
    """Read a packed image batch, every size checked before anything is allocated: the
    count (1 to :data:`MAX_BATCH_IMAGES`), the length table, and the lengths, which must
    each be at least 1 and add up to exactly the bytes that follow the table."""
    fixed = len(IMAGES_MAGIC) + _IMAGES_HEADER.size
    if len(data) > max_bytes + fixed + 4 * MAX_BATCH_IMAGES:
        raise PayloadTooLargeError(
            f"image batch is {len(data)} bytes; the limit is {max_bytes} bytes of images"
        )
    if not is_image_batch(data):
        raise InvalidInputError("not a packed image batch (missing its magic bytes)")
    if len(data) < fixed:
        raise InvalidInputError(f"image batch is {len(data)} bytes, shorter than its header")
    count, width, height = _IMAGES_HEADER.unpack_from(data, len(IMAGES_MAGIC))
    _check_image_count(count)
    declared = (width, height) if (width, height) != (0, 0) else None
    _check_declared_size(declared)
    start = fixed + 4 * count
    if len(data) < start:
        raise InvalidInputError(
            f"image batch says {count} images, but its {len(data)} bytes cannot hold their "
            "length table"
        )
    lengths = np.frombuffer(data, dtype=_UINT32, count=count, offset=fixed).astype(np.int64)
    if (lengths < 1).any():
        raise InvalidInputError(f"image {int(np.argmin(lengths))} of the batch is empty")
    total = int(lengths.sum())  # at most 4096 · (2**32 - 1): no overflow in int64
    if total != len(data) - start:
        raise InvalidInputError(
            f"image batch lengths add up to {total} bytes, but {len(data) - start} follow them"
        )
    if total > max_bytes:
        raise PayloadTooLargeError(
            f"image batch is {total} bytes of images; the limit is {max_bytes} bytes"
        )
    ends = (start + np.cumsum(lengths)).tolist()
    images = [data[begin:end] for begin, end in zip([start, *ends[:-1]], ends, strict=True)]
    return ImageBatch(images, declared)


def _check_image_count(count: int) -> None:
    if not 1 <= count <= MAX_BATCH_IMAGES:
        raise InvalidInputError(
            f"an image batch holds 1 to {MAX_BATCH_IMAGES} images, this one says {count}"
        )


def _check_declared_size(size: tuple[int, int] | None) -> None:
    if size is not None and (min(size) < 1 or max(size) > 2**32 - 1):
        raise InvalidInputError(
            f"an image batch's declared size must be positive, got {size[0]}×{size[1]}"
        )


def pack_results(
    outputs: np.ndarray | None,
    failures: Mapping[int, BaseException],
    count: int,
    max_bytes: int = MAX_PACKED_BYTES,
) -> bytes:
    """An image batch's answer: plain packed ``outputs`` when nothing failed, else the
    results form carrying ``failures`` (index → error) and the outputs of all ``count`` items
    (``None`` only when every item failed)."""
    if not failures:
        if outputs is None:
            raise ValueError("an answer without failures needs outputs")
        return pack(outputs, ndim=None, max_bytes=max_bytes)
    if outputs is None and len(failures) != count:
        raise ValueError(f"outputs left out, but only {len(failures)} of {count} items failed")
    if outputs is not None and len(outputs) != count:
        raise ValueError(f"{len(outputs)} outputs for {count} items")
    listed = [
        {"index": index, "status": status_of(exc), "message": public_message(exc)}
        for index, exc in sorted(failures.items())
    ]
    text = json.dumps(listed, ensure_ascii=False).encode()
    packed_outputs = b"" if outputs is None else pack(outputs, ndim=None, max_bytes=max_bytes)
    return b"".join((RESULTS_MAGIC, _RESULTS_HEADER.pack(count, len(text)), text, packed_outputs))


def unpack_results(data: bytes, count: int, max_bytes: int = MAX_PACKED_BYTES) -> BatchResults:
    """A handler's answer to an image batch of ``count`` items: its outputs and failures.

    A plain packed output is an answer without failures; the handler's error body raises its
    error (the whole batch failed). Anything that does not account for exactly ``count``
    items is :class:`CnnserveError` (the handler broke the format).
    """
    if data[: len(RESULTS_MAGIC)] != RESULTS_MAGIC:
        outputs = unpack_response(data, max_bytes)
        _check_rows(outputs, count)
        return BatchResults(outputs, {})
    fixed = len(RESULTS_MAGIC) + _RESULTS_HEADER.size
    if len(data) < fixed:
        raise CnnserveError(f"TorchServe's answer is {len(data)} bytes, shorter than its header")
    answered, text_length = _RESULTS_HEADER.unpack_from(data, len(RESULTS_MAGIC))
    if answered != count:
        raise CnnserveError(f"TorchServe answered for {answered} items of a {count}-item batch")
    if fixed + text_length > len(data):
        raise CnnserveError("TorchServe's answer is shorter than its failure list says")
    failures = _read_failures(data[fixed : fixed + text_length], count)
    rest = data[fixed + text_length :]
    if not rest:
        if len(failures) != count:
            raise CnnserveError(
                f"TorchServe answered no outputs, but only {len(failures)} of {count} items failed"
            )
        return BatchResults(None, failures)
    outputs = unpack(rest, ndim=None, max_bytes=max_bytes)
    _check_rows(outputs, count)
    return BatchResults(outputs, failures)


def _read_failures(text: bytes, count: int) -> dict[int, CnnserveError]:
    try:
        listed = json.loads(text)
        failures = {
            int(entry["index"]): ERROR_CLASSES[Status(entry["status"])](str(entry["message"]))
            for entry in listed
        }
    except (ValueError, TypeError, KeyError):
        raise CnnserveError("TorchServe's failure list is malformed") from None
    if len(failures) != len(listed) or not failures:
        raise CnnserveError("TorchServe's failure list is empty or names an item twice")
    if not all(0 <= index < count for index in failures):
        raise CnnserveError(f"TorchServe's failure list names items outside 0…{count - 1}")
    return failures


def _check_rows(outputs: np.ndarray, count: int) -> None:
    if len(outputs) != count:
        raise CnnserveError(f"TorchServe answered {len(outputs)} outputs for {count} items")
