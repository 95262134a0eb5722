"""Open Inference Protocol REST bodies ↔ the gateway's domain types.

Two body forms, as Triton accepts them:

- JSON only: ``{"id", "parameters", "inputs": [{"name", "datatype", "shape", "data"}],
  "outputs": [{"name", "parameters"}]}``; ``data`` flat or nested, row-major.
- Triton's binary tensor extension: the JSON header, then raw tensor bytes. The
  ``Inference-Header-Content-Length`` header gives the JSON's length; an input whose
  ``parameters.binary_data_size`` is set takes that many bytes, in input order. Outputs are
  sent binary when their ``binary_data`` parameter (default: the request's
  ``binary_data_output``) is true; the response then has the same layout.

The server decodes requests and encodes responses; :mod:`cnnserve.client` uses the
counterparts here (:func:`encode_infer_request`, :func:`decode_infer_response`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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
from .json_text import load_json, shown
from .tensor_codec import (
    BYTES,
    InputLimits,
    check_datatype,
    check_declared,
    check_shape,
    decode_raw,
    decode_values,
    encode_raw,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
#: Parameters of the binary extension itself; the core never sees them.
_TRANSPORT_PARAMETERS = frozenset({BINARY_DATA_SIZE, BINARY_DATA, BINARY_DATA_OUTPUT})


@dataclass(frozen=True)
class HttpInferRequest:
    """A decoded infer body: the domain request and how each output is to be sent."""

    request: InferRequest
    #: Output name → send as binary; outputs not named here follow ``binary_default``.
    binary_outputs: Mapping[str, bool]
    binary_default: bool

    def wants_binary(self, output: str) -> bool:
        """Whether ``output`` goes in the binary part of the response."""
        return self.binary_outputs.get(output, self.binary_default)


def _expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CodecError(f"{where} must be {what}, got {shown(value)}")
    return value


def _parameters(raw: object, where: str) -> dict[str, ParameterValue]:
    if raw is None:
        return {}
    params = _expect(raw, dict, f"{where} parameters", "an object")
    for key, value in params.items():
        _expect(value, (bool, int, float, str), f"{where} parameter {key!r}", "a scalar")
    return dict(params)


def _public(params: dict[str, ParameterValue]) -> dict[str, ParameterValue]:
    return {k: v for k, v in params.items() if k not in _TRANSPORT_PARAMETERS}


def _split(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    if header_length < 0 or header_length > len(body):
        raise CodecError(f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:header_length]), view[header_length:]


def _tensor(
    raw: object, index: int, binary: memoryview, offset: int, limits: InputLimits | None = None
) -> tuple[Tensor, int]:
    """One ``$request_input`` (or ``$response_output``); returns it and the offset past its
    binary data, if any. The declared shape is checked against ``limits`` (when given)
    before the data is converted."""
    spec = _expect(raw, dict, f"inputs[{index}]", "an object")
    name = _expect(spec.get("name"), str, f"inputs[{index}].name", "a string")
    datatype = _expect(spec.get("datatype"), str, f"input {name!r} datatype", "a string")
    shape = check_shape(name, _expect(spec.get("shape"), list, f"input {name!r} shape", "a list"))
    check_datatype(name, datatype)
    if limits is not None:
        check_declared(name, datatype, shape, limits)
    params = _parameters(spec.get("parameters"), f"input {name!r}")
    size = params.get(BINARY_DATA_SIZE)
    if size is not None:
        size = _expect(size, int, f"input {name!r} {BINARY_DATA_SIZE}", "an integer")
        if "data" in spec:
            raise CodecError(f"input {name!r} has both data and {BINARY_DATA_SIZE}")
        if size < 0 or offset + size > len(binary):
            raise CodecError(
                f"input {name!r} declares {size} bytes of binary data but only "
                f"{len(binary) - offset} follow the JSON header"
            )
        # A view of the body (immutable bytes), not a copy of the tensor.
        data = decode_raw(name, datatype, shape, binary[offset : offset + size])
        offset += size
    elif "data" in spec:
        values = _expect(spec["data"], list, f"input {name!r} data", "a list")
        data = decode_values(name, datatype, shape, values)
    else:
        raise CodecError(f"input {name!r} has neither data nor {BINARY_DATA_SIZE}")
    return Tensor(name, datatype, shape, data, _public(params)), offset


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    model_version: str,
    limits: InputLimits | None = None,
) -> HttpInferRequest:
    """An infer body (JSON, or JSON + binary tensors) → the domain request and output form;
    each input's declared shape is checked against ``limits`` before its data is converted."""
    header, binary = _split(body, header_length)
    document = load_json(header, "request body")
    document = _expect(document, dict, "request body", "a JSON object")
    request_id = _expect(document.get("id", ""), str, "id", "a string")
    params = _parameters(document.get("parameters"), "request")
    binary_default = _expect(
        params.get(BINARY_DATA_OUTPUT, False), bool, BINARY_DATA_OUTPUT, "true or false"
    )
    raw_inputs = _expect(document.get("inputs"), list, "inputs", "a list")
    inputs: list[Tensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _tensor(raw, index, binary, offset, limits)
        inputs.append(tensor)
    if offset != len(binary):
        raise CodecError(
            f"{len(binary) - offset} bytes after the JSON header belong to no input "
            f"(inputs declare {offset} bytes of {BINARY_DATA_SIZE})"
        )
    outputs: list[RequestedOutput] = []
    binary_outputs: dict[str, bool] = {}
    for index, raw in enumerate(_expect(document.get("outputs", []), list, "outputs", "a list")):
        spec = _expect(raw, dict, f"outputs[{index}]", "an object")
        name = _expect(spec.get("name"), str, f"outputs[{index}].name", "a string")
        out_params = _parameters(spec.get("parameters"), f"output {name!r}")
        if BINARY_DATA in out_params:
            binary_outputs[name] = _expect(
                out_params[BINARY_DATA], bool, f"output {name!r} {BINARY_DATA}", "true or false"
            )
        outputs.append(RequestedOutput(name, _public(out_params)))
    request = InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        outputs=outputs or None,
        parameters=_public(params),
    )
    return HttpInferRequest(request, binary_outputs, binary_default)


#: Elements of a JSON ``data`` list converted and encoded per step. One ``json.dumps`` of
#: millions of floats holds Python's GIL for seconds (~0.8 µs an element), freezing the event
#: loop even from a worker thread; between steps the loop gets its turn.
_JSON_CHUNK = 1 << 14
_COMPACT = (",", ":")


def _json_data(tensor: Tensor) -> str:
    """The tensor's elements as the JSON text of a flat list, encoded a chunk at a time."""
    flat = np.asarray(tensor.data).reshape(-1)
    parts = []
    for start in range(0, flat.size, _JSON_CHUNK):
        chunk = flat[start : start + _JSON_CHUNK]
        values = chunk.tolist() if tensor.datatype != BYTES else _texts(tensor.name, chunk)
        parts.append(json.dumps(values, separators=_COMPACT)[1:-1])
    return f"[{','.join(parts)}]"


def _texts(name: str, items: np.ndarray) -> list[str]:
    try:
        return [bytes(item).decode() for item in items]
    except UnicodeDecodeError:
        raise CodecError(
            f"output {name!r} holds bytes that are not UTF-8 text; request it with "
            f'"parameters": {{"{BINARY_DATA}": true}}'
        ) from None


def encode_infer_response(
    response: InferResponse, decoded: HttpInferRequest
) -> tuple[bytes, int | None]:
    """The response body and, when binary tensors follow the JSON, the JSON's length."""
    chunks: list[bytes] = []
    outputs: list[str] = []
    for tensor in response.outputs:
        out: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        params: dict[str, Any] = dict(tensor.parameters)
        data = None
        if decoded.wants_binary(tensor.name):
            chunk = encode_raw(tensor.datatype, np.asarray(tensor.data))
            params[BINARY_DATA_SIZE] = len(chunk)
            chunks.append(chunk)
        else:
            data = _json_data(tensor)
        if params:
            out["parameters"] = params
        text = json.dumps(out, separators=_COMPACT)
        # The data list, already JSON text, goes in as the object's last member.
        outputs.append(text if data is None else f'{text[:-1]},"data":{data}}}')
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = dict(response.parameters)
    head = json.dumps(document, separators=_COMPACT)
    header = f'{head[:-1]},"outputs":[{",".join(outputs)}]}}'.encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_infer_request(request: InferRequest) -> tuple[bytes, int]:
    """An :class:`InferRequest` → a binary-extension body and its JSON length (client side).

    Inputs travel as raw bytes and every output is asked for in binary: no per-element JSON
    on either side.
    """
    chunks: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    for tensor in request.inputs:
        chunk = encode_raw(tensor.datatype, np.asarray(tensor.data))
        chunks.append(chunk)
        inputs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": {**tensor.parameters, BINARY_DATA_SIZE: len(chunk)},
            }
        )
    document: dict[str, Any] = {
        "parameters": {**request.parameters, BINARY_DATA_OUTPUT: True},
        "inputs": inputs,
    }
    if request.id:
        document["id"] = request.id
    if request.outputs is not None:
        document["outputs"] = [
            {"name": out.name, "parameters": {**out.parameters, BINARY_DATA: True}}
            for out in request.outputs
        ]
    header = json.dumps(document, separators=_COMPACT).encode()
    return b"".join([header, *chunks]), len(header)


def decode_infer_response(body: bytes, header_length: int | None) -> InferResponse:
    """A response body (JSON, or JSON + binary tensors) → :class:`InferResponse` (client side)."""
    header, binary = _split(body, header_length)
    document = load_json(header, "response body")
    document = _expect(document, dict, "response body", "a JSON object")
    outputs: list[Tensor] = []
    offset = 0
    for index, raw in enumerate(_expect(document.get("outputs", []), list, "outputs", "a list")):
        tensor, offset = _tensor(raw, index, binary, offset)
        outputs.append(tensor)
    return InferResponse(
        model_name=document.get("model_name", ""),
        model_version=document.get("model_version", ""),
        id=document.get("id", ""),
        outputs=outputs,
        parameters=_parameters(document.get("parameters"), "response"),
    )


def _tensor_metadata(items: tuple[TensorMetadata, ...]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]


def model_metadata_to_json(metadata: ModelMetadata) -> dict[str, Any]:
    """``$metadata_model_response``."""
    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": _tensor_metadata(metadata.inputs),
        "outputs": _tensor_metadata(metadata.outputs),
    }


def server_metadata_to_json(metadata: ServerMetadata) -> dict[str, Any]:
    """``$metadata_server_response``."""
    return {
        "name": metadata.name,
        "version": metadata.version,
        "extensions": list(metadata.extensions),
    }
