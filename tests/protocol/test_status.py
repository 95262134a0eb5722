"""The error table: every status has one row, on real gRPC codes, equal to the documented one."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cnnserve.errors import (
    ERROR_CLASSES,
    GENERIC_INTERNAL_MESSAGE,
    CnnserveError,
    InvalidInputError,
    Status,
    public_message,
    status_of,
)
from cnnserve.protocol.grpc_codec import grpc_status
from cnnserve.protocol.status import ERROR_TABLE, WireStatus, grpc_code_name, http_status

README = Path(__file__).parents[2] / "README.md"

#: The table as the README documents it.
DOCUMENTED = {
    Status.INVALID_ARGUMENT: ("INVALID_ARGUMENT", 400),
    Status.UNAUTHENTICATED: ("UNAUTHENTICATED", 401),
    Status.NOT_FOUND: ("NOT_FOUND", 404),
    Status.PAYLOAD_TOO_LARGE: ("RESOURCE_EXHAUSTED", 413),
    Status.OVERLOADED: ("RESOURCE_EXHAUSTED", 429),
    Status.UNAVAILABLE: ("UNAVAILABLE", 503),
    Status.DEADLINE_EXCEEDED: ("DEADLINE_EXCEEDED", 504),
    Status.INTERNAL: ("INTERNAL", 500),
}


def test_every_status_has_a_row() -> None:
    assert set(ERROR_TABLE) == set(Status)


@pytest.mark.parametrize("status", list(Status))
def test_each_grpc_code_name_is_a_real_grpc_status_code(status: Status) -> None:
    row = ERROR_TABLE[status]
    assert row.grpc_code in grpc.StatusCode.__members__
    assert grpc.StatusCode[row.grpc_code] != grpc.StatusCode.OK
    assert 400 <= row.http_status <= 599


def test_the_table_is_the_documented_one() -> None:
    assert dict(ERROR_TABLE) == {s: WireStatus(*row) for s, row in DOCUMENTED.items()}


def test_the_readme_documents_every_row() -> None:
    """The README's table (error | gRPC | HTTP) lists exactly the table's pairs."""
    lines = iter(README.read_text().splitlines())
    for line in lines:
        if line.replace(" ", "") == "|error|gRPC|HTTP|":
            break
    else:
        pytest.fail("README.md has no error table (| error | gRPC | HTTP |)")
    next(lines)  # | --- | --- | --- |
    pairs = set()
    for line in lines:
        if not line.startswith("|"):
            break
        *_, code, status, _ = (cell.strip() for cell in line.split("|"))
        pairs.add(WireStatus(code, int(status)))
    assert pairs == set(ERROR_TABLE.values())


def test_every_status_has_an_error_class_that_reports_it() -> None:
    assert set(ERROR_CLASSES) == set(Status)
    for status, cls in ERROR_CLASSES.items():
        assert cls.status is status
        error = cls("item 2 is bad")
        assert status_of(error) is status
        assert grpc_code_name(error) == ERROR_TABLE[status].grpc_code
        assert grpc_status(error) == grpc.StatusCode[ERROR_TABLE[status].grpc_code]
        assert http_status(error) == ERROR_TABLE[status].http_status
        # Our messages are written for the caller: shown as they are.
        assert public_message(error) == "item 2 is bad"


def test_a_subclass_keeps_its_parents_row() -> None:
    class CorruptImageError(InvalidInputError):
        pass

    error = CorruptImageError("not a PNG")
    assert (grpc_code_name(error), http_status(error)) == ("INVALID_ARGUMENT", 400)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("CUDA out of memory at 0x7f3a"), KeyError("/srv/secret"), ValueError("x")],
)
def test_an_exception_that_is_not_ours_is_internal_with_the_generic_message(
    error: Exception,
) -> None:
    assert status_of(error) is Status.INTERNAL
    assert grpc_code_name(error) == "INTERNAL"
    assert grpc_status(error) == grpc.StatusCode.INTERNAL
    assert http_status(error) == 500
    assert public_message(error) == GENERIC_INTERNAL_MESSAGE
    assert str(error) not in public_message(error)


def test_our_own_internal_error_keeps_its_message() -> None:
    error = CnnserveError("TorchServe failed to run convnet (INTERNAL)")
    assert (grpc_code_name(error), http_status(error)) == ("INTERNAL", 500)
    assert public_message(error) == "TorchServe failed to run convnet (INTERNAL)"
