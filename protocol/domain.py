"""Wire-neutral request and response types: what transports and the data plane exchange.

Transports (gRPC servicer, HTTP routes) only convert their wire format to and from these
types and call :class:`~cnnserve.gateway.dataplane.DataPlane`. Datatype names are the Open
Inference Protocol's (``FP32``, ``UINT8``, ``BYTES``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: OIP datatype name → numpy dtype (BYTES is carried as an object array of ``bytes``).
DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class Tensor:
    """One named tensor. ``data.shape == shape``; for BYTES, ``data`` holds ``bytes`` objects."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the caller asked for by name, with its OIP parameters (e.g. ``classification``)."""

    name: str
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    """One inference call, any number of items (rows of the batch dimension)."""

    model_name: str
    inputs: list[Tensor]
    #: ``None`` means "the model's default outputs".
    outputs: list[RequestedOutput] | None = None
    model_version: str = ""
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)
    #: Absolute deadline on ``time.monotonic()``; ``None`` for none.
    deadline: float | None = None


@dataclass(frozen=True)
class InferResponse:
    """The answer to one :class:`InferRequest`."""

    model_name: str
    outputs: list[Tensor]
    model_version: str = "1"
    id: str = ""
    parameters: dict[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorMetadata:
    """Name, datatype and shape (``-1`` for a variable dimension) of an input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata / ``GET /v2/models/{m}`` report."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True)
class ServerMetadata:
    """What ServerMetadata / ``GET /v2`` report."""

    name: str
    version: str
    extensions: tuple[str, ...]
