"""The error table: each :class:`~cnnserve.errors.Status` as a gRPC code and an HTTP status.

The one place a status meets a wire. It names gRPC codes rather than importing grpc, so the
TorchServe worker side (which answers over HTTP) can use it without a gRPC dependency; the
gRPC transport turns the name into ``grpc.StatusCode``.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import NamedTuple

from cnnserve.errors import Status, status_of


class WireStatus(NamedTuple):
    """How one status is reported on each wire."""

    #: A ``grpc.StatusCode`` member name.
    grpc_code: str
    http_status: int


ERROR_TABLE = MappingProxyType(
    {
        Status.INVALID_ARGUMENT: WireStatus("INVALID_ARGUMENT", 400),
        Status.UNAUTHENTICATED: WireStatus("UNAUTHENTICATED", 401),
        Status.NOT_FOUND: WireStatus("NOT_FOUND", 404),
        Status.PAYLOAD_TOO_LARGE: WireStatus("RESOURCE_EXHAUSTED", 413),
        Status.OVERLOADED: WireStatus("RESOURCE_EXHAUSTED", 429),
        Status.UNAVAILABLE: WireStatus("UNAVAILABLE", 503),
        Status.DEADLINE_EXCEEDED: WireStatus("DEADLINE_EXCEEDED", 504),
        Status.INTERNAL: WireStatus("INTERNAL", 500),
    }
)


def http_status(exc: BaseException) -> int:
    """The HTTP status for any exception (500 for ones that are not ours)."""
    return ERROR_TABLE[status_of(exc)].http_status


def grpc_code_name(exc: BaseException) -> str:
    """The name of the gRPC status code for any exception (INTERNAL for ones not ours)."""
    return ERROR_TABLE[status_of(exc)].grpc_code
