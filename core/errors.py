"""The one error table: every failure cnnserve reports, with its gRPC and HTTP status.

Each exception class carries its own status, so transports never decide a status themselves;
they call :func:`grpc_status` / :func:`http_status` (or read the class attributes).
"""

from __future__ import annotations

import grpc


class CnnserveError(Exception):
    """Base of every error a caller may see; the message is safe to show them."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500


class InvalidInputError(CnnserveError):
    """Bad input: shape, datatype, size or an undecodable image."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class UnknownModelError(CnnserveError):
    """The named model is not served here."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class PayloadTooLargeError(CnnserveError):
    """The request is over a configured size limit."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class OverloadedError(CnnserveError):
    """The model's queue is full; retry later."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class UnavailableError(CnnserveError):
    """The model is not ready or its backend is down."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceededError(CnnserveError):
    """The request's deadline passed before it could be answered."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class UnauthenticatedError(CnnserveError):
    """The call carries no valid API key (``authorization: Bearer <key>``)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


GENERIC_INTERNAL_MESSAGE = "internal error; the server logged the details"


def public_message(exc: BaseException) -> str:
    """The message a caller may see: ours verbatim, anything else generic (never internals)."""
    return str(exc) if isinstance(exc, CnnserveError) else GENERIC_INTERNAL_MESSAGE


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for any exception (INTERNAL for ones that are not ours)."""
    return exc.grpc_code if isinstance(exc, CnnserveError) else grpc.StatusCode.INTERNAL


def http_status(exc: BaseException) -> int:
    """The HTTP status for any exception (500 for ones that are not ours)."""
    return exc.http_status if isinstance(exc, CnnserveError) else 500
