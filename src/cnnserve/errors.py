"""Every failure cnnserve reports, each carrying its status as data.

A :class:`Status` says *what* went wrong in transport-neutral terms; it is all the lower layers
(models, handlers) know. The one table that turns a status into a gRPC code and an HTTP status
is :mod:`cnnserve.protocol.status`, used by the transports; nothing else decides a status.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import ClassVar


class Status(StrEnum):
    """The kinds of failure a caller can see (one row each of the error table)."""

    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class CnnserveError(Exception):
    """Base of every error a caller may see; the message is safe to show them."""

    status: ClassVar[Status] = Status.INTERNAL


class InvalidInputError(CnnserveError):
    """Bad input: shape, datatype, size or an undecodable image."""

    status = Status.INVALID_ARGUMENT


class UnknownModelError(CnnserveError):
    """The named model is not served here."""

    status = Status.NOT_FOUND


class PayloadTooLargeError(CnnserveError):
    """The request is over a configured size limit."""

    status = Status.PAYLOAD_TOO_LARGE


class OverloadedError(CnnserveError):
    """The model's queue is full; retry later."""

    status = Status.OVERLOADED


class UnavailableError(CnnserveError):
    """The model is not ready or its backend is down."""

    status = Status.UNAVAILABLE


class DeadlineExceededError(CnnserveError):
    """The request's deadline passed before it could be answered."""

    status = Status.DEADLINE_EXCEEDED


class UnauthenticatedError(CnnserveError):
    """The call carries no valid API key (``authorization: Bearer <key>``)."""

    status = Status.UNAUTHENTICATED


class MissingExtraError(UnavailableError):
    """A part of cnnserve was asked for without the optional packages it needs installed; the
    message names the extra of the ``cnnserve`` distribution that installs them."""

    def __init__(self, what: str, module: str, extra: str) -> None:
        super().__init__(
            f"{what} needs {module!r}, which is not installed: pip install 'cnnserve[{extra}]'"
        )


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` that is not installed.

    For what a library imports only deep inside a call (torch imports onnxscript when it
    exports) or another process runs (``python -m ts.model_server``): checked up front,
    nothing is left half done when one is missing.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(what, module, extra)


@contextmanager
def needs_extra(extra: str, what: str, *modules: str) -> Iterator[None]:
    """Run the block — ``what``, for the message — as a part that needs the extra ``extra``
    (one of pyproject.toml's optional dependencies): ``modules`` are checked first
    (:func:`require_extra`), and a third-party module found missing inside the block becomes
    one :class:`MissingExtraError` naming the extra to install."""
    require_extra(extra, what, *modules)
    try:
        yield
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "cnnserve":
            raise  # a broken install or a bug, not a missing extra
        raise MissingExtraError(what, missing, extra) from None


#: The error class of each status, to raise again an error that crossed a process boundary.
ERROR_CLASSES: dict[Status, type[CnnserveError]] = {
    cls.status: cls
    for cls in (
        CnnserveError,
        InvalidInputError,
        UnknownModelError,
        PayloadTooLargeError,
        OverloadedError,
        UnavailableError,
        DeadlineExceededError,
        UnauthenticatedError,
    )
}

GENERIC_INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_of(exc: BaseException) -> Status:
    """The status of any exception (INTERNAL for ones that are not ours)."""
    return exc.status if isinstance(exc, CnnserveError) else Status.INTERNAL


def public_message(exc: BaseException) -> str:
    """The message a caller may see: ours verbatim, anything else generic (never internals)."""
    return str(exc) if isinstance(exc, CnnserveError) else GENERIC_INTERNAL_MESSAGE
