"""Open Inference Protocol protobuf messages ↔ the gateway's domain types, both ways.

The server decodes requests and encodes responses; :mod:`cnnserve.client` does the reverse
with the same functions' counterparts here, so the two sides cannot drift apart.

Requests carry each input either in ``raw_input_contents`` (the fast path: all inputs or
none, one entry per input in order) or as typed ``contents``; responses always carry
outputs in ``raw_output_contents``, as Triton does, so standard clients read them with one
:func:`numpy.frombuffer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from cnnserve.protocol import open_inference_pb2 as pb

from .domain import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ParameterValue,
    RequestedOutput,
    ServerMetadata,
    Tensor,
    TensorMetadata,
)
from .errors import CodecError
from .status import grpc_code_name
from .tensor_codec import (
    BYTES,
    InputLimits,
    check_count,
    check_datatype,
    check_declared,
    check_shape,
    decode_raw,
    decode_values,
    encode_raw,
)

#: Which typed ``InferTensorContents`` field carries each datatype (FP16 has none: send raw).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: The numpy dtype of each numeric typed field, so its values are read straight into an
#: array (no Python list of a message's worth of int or float objects).
_FIELD_DTYPES: dict[str, np.dtype[np.generic]] = {
    "bool_contents": np.dtype(np.bool_),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
#: Typed elements are counted as this many bytes of decoding work (see :func:`decode_work`).
_TYPED_ELEMENT_WORK = 8
#: Typed elements converted per step (a few ms): each step is one C call holding the GIL, so
#: an event loop in another thread gets its turn between steps, not after millions of them.
_TYPED_CHUNK = 1 << 16

_INT64_MAX = 2**63 - 1
#: The tag of one ``raw_input_contents`` entry (field 7, length-delimited) in the wire format.
_RAW_INPUT_TAG = (
    pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number << 3
) | 2
#: Messages from this size on keep their raw contents in the received bytes (see
#: :func:`parse_infer_request`); below it, the parser's copies are cheaper than the walk.
VIEW_MIN_BYTES = 32 << 10
#: Top-level fields past which the walk hands the message to the protobuf parser: a request
#: has a few (names, one entry per input, output and parameter); a message of millions of
#: tiny fields costs the C parser little and a Python loop seconds.
MAX_WALKED_FIELDS = 256
#: Varint bytes past which a tag or length is malformed (a 64-bit value takes at most 10).
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True)
class ReceivedInferRequest:
    """A ModelInferRequest as received: the message without its raw contents, and each
    ``raw_input_contents`` entry as a read-only view of the received bytes (not copied)."""

    message: pb.ModelInferRequest
    raw: Sequence[bytes | memoryview]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ``IndexError``/``ValueError`` when
    malformed."""
    byte = data[pos]
    if byte < 0x80:  # tags and short lengths: one byte
        return byte, pos + 1
    value = byte & 0x7F
    shift = 7
    for index in range(pos + 1, pos + _MAX_VARINT_BYTES):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, index + 1
        shift += 7
    raise ValueError("varint too long")


#: Bytes a fixed-size wire type's value takes (1: 64-bit, 5: 32-bit).
_FIXED_SIZE = {1: 8, 5: 4}


def _raw_spans(data: bytes) -> tuple[list[memoryview], list[memoryview]] | None:
    """Walk the top-level fields of a serialized ModelInferRequest: the raw contents' views
    and every other field's bytes, in order; ``None`` when the walk cannot vouch for the
    bytes (then the protobuf parser reads them and reports what is wrong)."""
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = 0
    size = len(data)
    try:
        while pos < size:
            start = pos
            tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == 2:
                length, pos = _varint(data, pos)
                end = pos + length
            elif wire == 0:
                _, end = _varint(data, pos)
            elif wire in _FIXED_SIZE:
                end = pos + _FIXED_SIZE[wire]
            else:  # groups: never in this message; the parser says what is wrong
                return None
            if end > size:
                return None
            if tag == _RAW_INPUT_TAG:
                raw.append(view[pos:end])
            else:
                rest.append(view[start:end])
            if len(raw) + len(rest) > MAX_WALKED_FIELDS:
                return None
            pos = end
    except (IndexError, ValueError):
        return None
    return raw, rest


def parse_infer_request(data: bytes) -> ReceivedInferRequest:
    """A serialized ModelInferRequest → its message and raw contents, the contents left in
    ``data`` as views: the protobuf parser copies a bytes field into its own memory, and
    reading the field copies it again into a new ``bytes``, two copies of every tensor for
    nothing. ``data`` is immutable, so a view of it can never change under the request.
    Messages under :data:`VIEW_MIN_BYTES` are parsed whole: their copies cost less than
    walking the fields in Python.

    Raises :class:`google.protobuf.message.DecodeError` for bytes that are not the message.
    """
    spans = _raw_spans(data) if len(data) >= VIEW_MIN_BYTES else None
    if spans is None or not spans[0]:
        message = pb.ModelInferRequest.FromString(data)
        return ReceivedInferRequest(message, message.raw_input_contents)
    raw, rest = spans
    return ReceivedInferRequest(pb.ModelInferRequest.FromString(b"".join(rest)), raw)


def parameters_from_proto(params: Mapping[str, pb.InferParameter]) -> dict[str, ParameterValue]:
    """A protobuf parameter map → plain values (an unset choice is skipped)."""
    if not params:  # the usual case, once per request and per tensor
        return {}
    values: dict[str, ParameterValue] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(param, choice)
    return values


def parameters_to_proto(
    values: Mapping[str, ParameterValue], target: MutableMapping[str, pb.InferParameter]
) -> None:
    """Plain values → the protobuf parameter map ``target``."""
    for key, value in values.items():
        param = target[key]
        # bool before int: True is an int in Python.
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            if value > _INT64_MAX:
                param.uint64_param = value
            else:
                param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = value


_Tensor = pb.ModelInferRequest.InferInputTensor | pb.ModelInferResponse.InferOutputTensor


def _typed_field(tensor: _Tensor) -> str:
    """The name of the one typed field ``tensor``'s datatype uses (the others must be empty)."""
    field = CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise CodecError(
            f"tensor {tensor.name!r}: {tensor.datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    for other in set(CONTENTS_FIELD.values()) - {field}:
        if len(getattr(tensor.contents, other)):
            raise CodecError(
                f"tensor {tensor.name!r} is {tensor.datatype} but its contents are in "
                f"{other}; use {field}"
            )
    return field


def _typed_values(tensor: _Tensor, field: str) -> list[Any] | np.ndarray:
    values = getattr(tensor.contents, field)
    dtype = _FIELD_DTYPES.get(field)
    if dtype is None:  # bytes_contents: the elements are bytes objects anyway
        return list(values)
    array = np.empty(len(values), dtype=dtype)
    for start in range(0, len(values), _TYPED_CHUNK):
        array[start : start + _TYPED_CHUNK] = values[start : start + _TYPED_CHUNK]
    return array


def _check_input(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | memoryview | None,
    limits: InputLimits | None,
) -> str | None:
    """Everything about an input that is known without converting its contents: datatype,
    shape, ``limits``, and how many elements or bytes the contents hold. Returns the typed
    field to read (``None``: raw contents)."""
    check_datatype(tensor.name, tensor.datatype)
    dims = check_shape(tensor.name, tensor.shape)
    field = None
    if raw is not None:
        if tensor.HasField("contents"):
            raise CodecError(
                f"input {tensor.name!r} has both typed contents and raw_input_contents; send one"
            )
        # decode_raw checks the exact length; a BYTES element takes at least its 4-byte length.
        if tensor.datatype == BYTES and len(raw) < 4 * math.prod(dims):
            raise CodecError(
                f"tensor {tensor.name!r}: shape {list(dims)} declares {math.prod(dims)} BYTES "
                f"elements, more than {len(raw)} bytes of raw data can hold"
            )
    else:
        field = _typed_field(tensor)
        check_count(tensor.name, tensor.datatype, dims, len(getattr(tensor.contents, field)))
    if limits is not None:
        check_declared(tensor.name, tensor.datatype, dims, limits)
    return field


def _input_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | memoryview | None,
    field: str | None,
) -> Tensor:
    shape = tuple(tensor.shape)
    if field is None:
        assert raw is not None
        data = decode_raw(tensor.name, tensor.datatype, shape, raw)
    else:
        data = decode_values(tensor.name, tensor.datatype, shape, _typed_values(tensor, field))
    return Tensor(
        name=tensor.name,
        datatype=tensor.datatype,
        shape=shape,
        data=data,
        parameters=parameters_from_proto(tensor.parameters),
    )


def decode_work(received: ReceivedInferRequest) -> int:
    """Roughly how many bytes decoding a request's inputs touches (raw contents as sent,
    typed ones at 8 bytes an element), without reading any contents: for deciding whether
    to decode it off the event loop."""
    if received.raw:
        # With raw contents, typed contents are refused unread (request_from_proto).
        return sum(len(raw) for raw in received.raw)
    work = 0
    for tensor in received.message.inputs:
        field = CONTENTS_FIELD.get(tensor.datatype)
        if field is not None:
            work += _TYPED_ELEMENT_WORK * len(getattr(tensor.contents, field))
    return work


def request_from_proto(
    received: ReceivedInferRequest | pb.ModelInferRequest,
    deadline: float | None,
    limits: InputLimits | None = None,
) -> InferRequest:
    """A ModelInferRequest (or one :func:`parse_infer_request` read) → :class:`InferRequest`
    (``deadline`` on ``time.monotonic()``). Raw contents become arrays over the received
    bytes, read-only and not copied.

    Every input's declared shape is checked — against ``limits`` too, when given — and its
    element count against its contents, before any input's contents are converted.
    """
    if isinstance(received, ReceivedInferRequest):
        message, raw = received.message, received.raw
    else:
        message, raw = received, received.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise CodecError(
            f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; "
            "send raw contents for every input (in input order) or for none"
        )
    contents = [raw[index] if raw else None for index in range(len(message.inputs))]
    fields = [
        _check_input(tensor, contents[index], limits) for index, tensor in enumerate(message.inputs)
    ]
    inputs = [
        _input_tensor(tensor, contents[index], fields[index])
        for index, tensor in enumerate(message.inputs)
    ]
    outputs = [
        RequestedOutput(name=out.name, parameters=parameters_from_proto(out.parameters))
        for out in message.outputs
    ]
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        inputs=inputs,
        outputs=outputs or None,
        parameters=parameters_from_proto(message.parameters),
        deadline=deadline,
    )


def response_to_proto(response: InferResponse) -> pb.ModelInferResponse:
    """An :class:`InferResponse` → ModelInferResponse with raw output contents."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    parameters_to_proto(response.parameters, message.parameters)
    for tensor in response.outputs:
        out = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        parameters_to_proto(tensor.parameters, out.parameters)
        message.raw_output_contents.append(encode_raw(tensor.datatype, np.asarray(tensor.data)))
    return message


def request_to_proto(request: InferRequest) -> pb.ModelInferRequest:
    """An :class:`InferRequest` → ModelInferRequest with raw input contents (client side)."""
    message = pb.ModelInferRequest(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    parameters_to_proto(request.parameters, message.parameters)
    for tensor in request.inputs:
        entry = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        parameters_to_proto(tensor.parameters, entry.parameters)
        message.raw_input_contents.append(encode_raw(tensor.datatype, np.asarray(tensor.data)))
    for output in request.outputs or ():
        parameters_to_proto(output.parameters, message.outputs.add(name=output.name).parameters)
    return message


def response_from_proto(message: pb.ModelInferResponse) -> InferResponse:
    """A ModelInferResponse (raw or typed contents) → :class:`InferResponse` (client side)."""
    raw = message.raw_output_contents
    outputs = []
    for index, tensor in enumerate(message.outputs):
        shape = tuple(tensor.shape)
        if index < len(raw):
            data = decode_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            field = _typed_field(tensor)
            data = decode_values(tensor.name, tensor.datatype, shape, _typed_values(tensor, field))
        outputs.append(
            Tensor(
                tensor.name, tensor.datatype, shape, data, parameters_from_proto(tensor.parameters)
            )
        )
    return InferResponse(
        model_name=message.model_name,
        model_version=message.model_version,
        id=message.id,
        outputs=outputs,
        parameters=parameters_from_proto(message.parameters),
    )


def _tensor_metadata(
    items: tuple[TensorMetadata, ...],
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
        for t in items
    ]


def model_metadata_to_proto(metadata: ModelMetadata) -> pb.ModelMetadataResponse:
    """:class:`ModelMetadata` → ModelMetadataResponse."""
    return pb.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=_tensor_metadata(metadata.inputs),
        outputs=_tensor_metadata(metadata.outputs),
    )


def server_metadata_to_proto(metadata: ServerMetadata) -> pb.ServerMetadataResponse:
    """:class:`ServerMetadata` → ServerMetadataResponse."""
    return pb.ServerMetadataResponse(
        name=metadata.name, version=metadata.version, extensions=metadata.extensions
    )


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code the error table gives any exception (INTERNAL for ones not ours)."""
    return grpc.StatusCode[grpc_code_name(exc)]
