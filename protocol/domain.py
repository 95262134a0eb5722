"""Wire-neutral request and response types: what transports and the data plane exchange.

Transports (gRPC servicer, HTTP routes) only convert their wire format to and from these
types and call :class:`~cnnserve.gateway.dataplane.DataPlane`. Datatype names are the Open
Inference Protocol's (``FP32``, ``UINT8``, ``BYTES``, ...).

The repository index and statistics are described by what the codecs read (protocols), not
by classes: the gateway's model manager owns the records and hands them over as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

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


@dataclass(frozen=True)
class ConfigTensor:
    """An input or output as a model configuration lists it: without the batch dimension."""

    name: str
    datatype: str
    #: ``-1`` for a variable dimension.
    dims: tuple[int, ...]
    #: ``"NCHW"`` for an image tensor (channels, height, width); ``""`` for anything else.
    image_format: str = ""
    #: Whether a request may leave this input out.
    optional: bool = False


@dataclass(frozen=True)
class VersionChoice:
    """Which versions of a model are served, as Triton's version policy says it."""

    #: ``latest``: the ``num_versions`` highest; ``all``; ``specific``: those in ``versions``.
    kind: Literal["latest", "all", "specific"]
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfiguration:
    """What ModelConfig / ``GET /v2/models/{m}/config`` report: how one version is served,
    in the terms of Triton's model configuration."""

    name: str
    #: Triton's platform name (``onnxruntime_onnx``, ``pytorch_libtorch``, ...).
    platform: str
    #: Triton's backend name (``onnxruntime``, ``pytorch``, ...).
    backend: str
    version_policy: VersionChoice
    #: The most items one batch runs.
    max_batch_size: int
    inputs: tuple[ConfigTensor, ...]
    outputs: tuple[ConfigTensor, ...]
    #: How long a partial batch may wait for company.
    max_queue_delay_us: int
    #: Items that may wait in the queue before requests are refused.
    max_queue_size: int
    #: The timeout of a request that sets none; 0: none.
    default_timeout_us: int


class IndexEntry(Protocol):
    """One row of the repository index: a model version and its state."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str:
        """The version number as text; ``""`` for a model with no loadable version."""

    @property
    def state(self) -> str:
        """``READY``, ``UNAVAILABLE``, ``LOADING`` or ``UNLOADING``."""

    @property
    def reason(self) -> str:
        """Why the version is in this state; ``""`` when there is nothing to say."""


class DurationStat(Protocol):
    """How many times something happened, and how long it took in all."""

    @property
    def count(self) -> int: ...
    @property
    def ns(self) -> int: ...


class BatchStat(Protocol):
    """The batches of one size: counts and times of their three steps."""

    @property
    def batch_size(self) -> int: ...
    @property
    def compute_input(self) -> DurationStat: ...
    @property
    def compute_infer(self) -> DurationStat: ...
    @property
    def compute_output(self) -> DurationStat: ...


class VersionStats(Protocol):
    """One model version's statistics, with the meaning of Triton's ``ModelStatistics``."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def last_inference(self) -> int:
        """Milliseconds since the epoch of the last inference; 0: none yet."""

    @property
    def inference_count(self) -> int:
        """Items inferred."""

    @property
    def execution_count(self) -> int:
        """Batches run."""

    @property
    def success(self) -> DurationStat: ...
    @property
    def fail(self) -> DurationStat: ...
    @property
    def queue(self) -> DurationStat: ...
    @property
    def compute_input(self) -> DurationStat: ...
    @property
    def compute_infer(self) -> DurationStat: ...
    @property
    def compute_output(self) -> DurationStat: ...
    @property
    def batch_stats(self) -> Sequence[BatchStat]: ...
