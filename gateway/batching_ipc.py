"""Frames between gateway frontends and the batching process (``shared_batcher``).

One frame on a Unix-domain stream socket is a fixed prefix — the JSON header's length and the
body's length, two big-endian uint32 — then a small JSON header (the call and its array
descriptors), then the arrays' raw bytes back to back. A numeric array travels as its dtype,
shape and C-order bytes; an object array of encoded images (``bytes`` items) as each item's
length and the items' bytes. A reply carries rows, or an error as its status and message (the
class is found again from the status, :data:`cnnserve.errors.ERROR_CLASSES`), or rows with
per-item failures (:class:`~.batcher.PartialResults`).

Both lengths are checked before a byte of the frame is read: a header over
:data:`MAX_HEADER_BYTES` or a body over the reader's limit (``max_request_bytes``: no request
the data plane admits, input or output, is bigger) ends the connection.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve.errors import ERROR_CLASSES, CnnserveError, Status, public_message, status_of

from .batcher import BatchAnswer, PartialResults

#: Header length, body length.
PREFIX = struct.Struct("!II")
#: A header holds the call and, for a batch of encoded images, one length per image.
MAX_HEADER_BYTES = 1 << 20
#: The dtype name an object array of ``bytes`` items travels under.
BYTES_DTYPE = "bytes"

Header = dict[str, Any]


class FrameError(Exception):
    """A frame broke the format or its limits; the connection it came on is closed."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its header and its arrays, in order."""

    header: Header
    arrays: list[np.ndarray]


def encode(header: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> list[bytes]:
    """``header`` and ``arrays`` as the byte strings of one frame (write them in order)."""
    descriptors: list[Header] = []
    bodies: list[bytes] = []
    for array in arrays:
        if array.dtype == object:
            items = [bytes(item) for item in array.ravel()]
            descriptors.append(
                {
                    "dtype": BYTES_DTYPE,
                    "shape": list(array.shape),
                    "lengths": [len(b) for b in items],
                }
            )
            bodies.extend(items)
        else:
            contiguous = np.ascontiguousarray(array)
            descriptors.append({"dtype": contiguous.dtype.str, "shape": list(contiguous.shape)})
            bodies.append(contiguous.tobytes())
    head = json.dumps({**header, "arrays": descriptors}, separators=(",", ":")).encode()
    return [PREFIX.pack(len(head), sum(len(b) for b in bodies)), head, *bodies]


def body_bytes(arrays: Sequence[np.ndarray]) -> int:
    """How many body bytes ``arrays`` take in a frame (checked against the peer's limit)."""
    return sum(
        sum(len(bytes(item)) for item in a.ravel()) if a.dtype == object else a.nbytes
        for a in arrays
    )


async def read_frame(reader: asyncio.StreamReader, max_body_bytes: int) -> Frame:
    """The next frame; :class:`FrameError` when it breaks the format or its limits,
    ``asyncio.IncompleteReadError`` when the peer closed the connection."""
    head_size, body_size = PREFIX.unpack(await reader.readexactly(PREFIX.size))
    if head_size > MAX_HEADER_BYTES or body_size > max_body_bytes:
        raise FrameError(
            f"frame of {head_size} header and {body_size} body bytes is over the limits "
            f"({MAX_HEADER_BYTES}, {max_body_bytes})"
        )
    try:
        header = json.loads(await reader.readexactly(head_size))
    except ValueError as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    # Arrays view the bytes read (read-only, no copy): the backends take read-only batches.
    body = await reader.readexactly(body_size) if body_size else b""
    return Frame(header, _arrays(header.get("arrays", []), body))


def _arrays(descriptors: list[Header], body: bytes) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    offset = 0
    view = memoryview(body)
    try:
        for descriptor in descriptors:
            shape = tuple(int(side) for side in descriptor["shape"])
            if descriptor["dtype"] == BYTES_DTYPE:
                array = np.empty(len(descriptor["lengths"]), dtype=object)
                for index, length in enumerate(descriptor["lengths"]):
                    array[index] = bytes(view[offset : offset + length])
                    offset += length
                arrays.append(array.reshape(shape))
                continue
            dtype = np.dtype(descriptor["dtype"])
            count = int(np.prod(shape, dtype=np.int64))
            size = count * dtype.itemsize
            if offset + size > len(body):
                raise FrameError("frame body is shorter than its arrays")
            arrays.append(np.frombuffer(body, dtype, count, offset).reshape(shape))
            offset += size
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameError(f"bad array descriptor: {exc}") from None
    if offset != len(body):
        raise FrameError(f"frame body holds {len(body)} bytes, its arrays {offset}")
    return arrays


def error_header(exc: BaseException) -> Header:
    """An error as a reply carries it: its status and the message a caller may see."""
    return {"status": status_of(exc).value, "message": public_message(exc)}


def raise_error(error: Mapping[str, Any]) -> CnnserveError:
    """The exception :func:`error_header` described, to raise in this process."""
    return ERROR_CLASSES.get(Status(error["status"]), CnnserveError)(error["message"])


def reply_rows(outputs: BatchAnswer) -> tuple[Header, list[np.ndarray]]:
    """A batch's result as reply header fields and arrays: per-item failures, if any, by
    index in the header."""
    if isinstance(outputs, PartialResults):
        failures = {str(i): error_header(exc) for i, exc in outputs.failures.items()}
        return {"failures": failures, "item_noun": outputs.item_noun}, [outputs.rows]
    return {}, [outputs]


def rows_of(frame: Frame) -> BatchAnswer:
    """The result :func:`reply_rows` encoded."""
    rows = frame.arrays[0]
    failures = frame.header.get("failures")
    if not failures:
        return rows
    errors = {int(i): raise_error(e) for i, e in failures.items()}
    return PartialResults(rows, errors, str(frame.header.get("item_noun", "item")))
