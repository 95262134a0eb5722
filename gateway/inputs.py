"""The three input forms a model accepts, validated and turned into one float32 batch.

Each request carries exactly one input, chosen by name:

- ``input``  FP32  ``[N,3,H,W]`` — what the network consumes, already normalized;
- ``pixels`` UINT8 ``[N,3,H,W]`` — raw pixels, normalized here (4× less on the wire);
- ``image``  BYTES ``[N,1]``     — encoded PNG/JPEG; ``[N]`` is accepted too. Only their
  headers are read here (:func:`declared_input`); they are batched encoded and decoded a
  batch at a time (:mod:`cnnserve.gateway.decode_worker`).

Metadata lists ``image`` as ``[-1,1]`` (one encoded image per row), as Triton models declare
such inputs (``dims: [1]``): tools that build requests from the metadata, perf_analyzer
among them, need a per-item shape, which ``[-1]`` lacks.

Every check raises :class:`InvalidInputError` (or :class:`PayloadTooLargeError` for the item
limit) with a message that says what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from cnnserve.errors import InvalidInputError, PayloadTooLargeError
from cnnserve.models.imaging import ImageHeader
from cnnserve.models.spec import ModelSpec
from cnnserve.models.steps import normalize
from cnnserve.protocol.domain import DATATYPES, Tensor, TensorMetadata

TENSOR_INPUT = "input"
PIXELS_INPUT = "pixels"
IMAGE_INPUT = "image"
#: Input name → OIP datatype, in the order metadata lists them.
INPUT_DATATYPES: dict[str, str] = {
    TENSOR_INPUT: "FP32",
    PIXELS_INPUT: "UINT8",
    IMAGE_INPUT: "BYTES",
}
#: The shapes an ``image`` input may have, for messages.
IMAGE_SHAPES = "[N,1] or [N]"


def input_metadata(spec: ModelSpec) -> tuple[TensorMetadata, ...]:
    """The inputs ``spec`` accepts, with ``-1`` for every variable dimension."""
    height, width = spec.fixed_size or (-1, -1)
    return (
        TensorMetadata(TENSOR_INPUT, "FP32", (-1, 3, height, width)),
        TensorMetadata(PIXELS_INPUT, "UINT8", (-1, 3, height, width)),
        TensorMetadata(IMAGE_INPUT, "BYTES", (-1, 1)),
    )


def describe(datatype: str, shape: tuple[int, ...]) -> str:
    """``FP32 [1,3,32,32]``: how a tensor is named in error messages."""
    return f"{datatype} [{','.join(str(d) for d in shape)}]"


def _accepted(spec: ModelSpec) -> str:
    return "; ".join(
        f"{name} ({datatype} {IMAGE_SHAPES if datatype == 'BYTES' else spec.shape_text()})"
        for name, datatype in INPUT_DATATYPES.items()
    )


def select_input(spec: ModelSpec, inputs: list[Tensor]) -> Tensor:
    """The request's one input, after checking its name and datatype."""
    if len(inputs) != 1:
        got = ", ".join(t.name for t in inputs) or "none"
        raise InvalidInputError(
            f"send exactly one input to {spec.name}, got {len(inputs)} ({got}); "
            f"accepted: {_accepted(spec)}"
        )
    tensor = inputs[0]
    expected = INPUT_DATATYPES.get(tensor.name)
    if expected is None:
        raise InvalidInputError(
            f"unknown input {tensor.name!r} for {spec.name}; accepted: {_accepted(spec)}"
        )
    if tensor.datatype != expected:
        raise InvalidInputError(f"input {tensor.name!r} must be {expected}, got {tensor.datatype}")
    return tensor


def item_count(spec: ModelSpec, tensor: Tensor, max_items: int) -> int:
    """N, after checking the rank, that N ≥ 1 and that N is within the per-request limit."""
    if tensor.datatype == "BYTES":
        fits = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
    else:
        fits = len(tensor.shape) == 4
    if not fits:
        expected = IMAGE_SHAPES if tensor.datatype == "BYTES" else spec.shape_text()
        raise InvalidInputError(
            f"{spec.name} expects {tensor.datatype} {expected} for input {tensor.name!r}, "
            f"got {describe(tensor.datatype, tensor.shape)}"
        )
    count = tensor.shape[0]
    if count == 0:
        raise InvalidInputError(f"input {tensor.name!r} has no items (N = 0)")
    if count > max_items:
        raise PayloadTooLargeError(
            f"request has {count} items; the limit is {max_items} per request "
            "(max_items_per_request); split it"
        )
    if tensor.data.shape != tensor.shape:
        raise InvalidInputError(
            f"input {tensor.name!r} declares shape {list(tensor.shape)} but carries "
            f"{tensor.data.size} elements"
        )
    return count


def to_batch(spec: ModelSpec, tensor: Tensor, keep_pixels: bool = False) -> np.ndarray:
    """The validated tensor input (FP32 or UINT8) as the float32 ``N×3×H×W`` batch the
    network consumes.

    With ``keep_pixels`` (a backend that normalizes on its device), UINT8 pixels stay uint8
    ``N×3×H×W``.
    """
    _check_tensor_shape(spec, tensor)
    # Not copied: a transport's array is a read-only view of the message it received, which
    # never changes, and when several requests share a batch the batcher joins them into a
    # new array. A backend whose runtime wants a writable array (torch) copies it itself.
    data = np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype])
    if tensor.datatype == "UINT8":
        return data if keep_pixels else normalize(data, spec.normalization)
    if not np.isfinite(data).all():
        raise InvalidInputError(f"input {tensor.name!r} contains NaN or infinite values")
    return data


def _check_tensor_shape(spec: ModelSpec, tensor: Tensor) -> None:
    """Refuse a tensor input whose ``3×H×W`` items the network cannot take (rank checked)."""
    shape = tensor.shape
    try:
        if shape[1] != 3:
            raise InvalidInputError("not three channels")
        spec.check_size(shape[2], shape[3])
    except InvalidInputError:
        raise InvalidInputError(
            f"{spec.name} expects {tensor.datatype} {spec.shape_text()}, "
            f"got {describe(tensor.datatype, shape)}"
        ) from None


@dataclass(frozen=True)
class DeclaredInput:
    """What a request's input will cost to prepare, known before anything is decoded."""

    #: One item's network input, ``3×H×W`` (from the tensor's shape or the images' headers).
    item_shape: tuple[int, ...]
    #: The largest image's size from its header, in pixels (0: not images).
    largest_image_pixels: int = 0
    #: The images, an object array ``N`` of ``bytes`` (None: not images).
    encoded: np.ndarray | None = None


def declared_input(spec: ModelSpec, tensor: Tensor, max_image_pixels: int) -> DeclaredInput:
    """The item shape the input declares — for images, read from every header, each checked
    (format, the model's pixel cap, its size range, one size per FCN request) before any
    pixel is decoded. Call after :func:`item_count`."""
    if tensor.datatype != "BYTES":
        # A shape the network cannot take is refused as such, not priced.
        _check_tensor_shape(spec, tensor)
        return DeclaredInput(tuple(tensor.shape[1:]))
    first: ImageHeader | None = None
    largest = 0
    encoded = np.empty(tensor.data.size, dtype=object)
    for index, item in enumerate(_images(tensor.data)):
        encoded[index] = item
        try:
            header = spec.read_image_header(item, max_image_pixels)
        except InvalidInputError as exc:
            raise InvalidInputError(f"image {index}: {exc}") from None
        if first is None:
            first = header
        elif spec.fixed_size is None and header.size != first.size:
            _refuse_mixed_sizes(spec, first.size, index, header.size)
        largest = max(largest, header.pixels)
    assert first is not None  # item_count refused N = 0
    height, width = spec.fixed_size or (first.height, first.width)
    return DeclaredInput((3, height, width), largest, encoded)


def _images(images: np.ndarray) -> Iterator[bytes]:
    """Each element of a BYTES input as bytes; anything else is refused, naming the item."""
    for index, item in enumerate(images.reshape(-1)):
        if not isinstance(item, bytes | bytearray | memoryview):
            raise InvalidInputError(
                f"image {index}: expected encoded PNG/JPEG bytes, got {type(item).__name__}"
            )
        yield bytes(item)


def _refuse_mixed_sizes(
    spec: ModelSpec, first: tuple[int, int], index: int, this: tuple[int, int]
) -> NoReturn:
    """An FCN request's images must share one size (``(width, height)`` each)."""
    raise InvalidInputError(
        f"images in one {spec.name} request must share one size (their outputs share "
        f"one tensor): image 0 is {first[0]}×{first[1]}, image {index} is "
        f"{this[0]}×{this[1]}; send them in separate requests"
    )
