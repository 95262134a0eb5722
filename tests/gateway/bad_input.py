"""Bad Open Inference Protocol requests, sent over every wire form, and how they must end.

A :class:`Case` is one tensor request described independently of the wire: model, input
name, datatype, declared shape, the element values, and optionally raw bytes that disagree
with the shape. :func:`send` puts it on one of four wire forms — gRPC raw contents, gRPC
typed contents, HTTP JSON ``data``, HTTP binary tensor extension — and reduces the answer to
an :class:`Answer`: the error table's row (``ok``, ``invalid``, ``not_found``, ``too_large``,
``overloaded``, ``deadline``) and the message, so one expectation covers all four forms.

Anything outside the table's expected rows — INTERNAL/500, UNKNOWN, a dropped connection,
or no answer within :data:`CALL_TIMEOUT_S` (a hang) — is the kind ``unexpected``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import grpc
import httpx
import numpy as np

from cnnserve.errors import GENERIC_INTERNAL_MESSAGE
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import CONTENTS_FIELD
from cnnserve.protocol.http_codec import HEADER_LENGTH
from tests.images import digit_png, shapes_png
from tests.support import GatewayProcess

#: No well-formed or malformed request may take longer to answer than this (else: a hang).
CALL_TIMEOUT_S = 30.0
MODELS = ("convnet", "fcn")
#: What a valid request after a test's examples may still cost the gateway in memory; a bad
#: header that made it allocate what it declared would cost gigabytes.
RSS_GROWTH_LIMIT = 300 << 20

Kind = Literal["ok", "invalid", "not_found", "too_large", "overloaded", "deadline", "unexpected"]
Wire = Literal["grpc-raw", "grpc-typed", "http-json", "http-binary"]
WIRES: tuple[Wire, ...] = ("grpc-raw", "grpc-typed", "http-json", "http-binary")

_GRPC_KINDS: dict[grpc.StatusCode, Kind] = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}
_HTTP_KINDS: dict[int, Kind] = {
    200: "ok",
    400: "invalid",
    404: "not_found",
    413: "too_large",
    429: "overloaded",
    504: "deadline",
}
#: Raw-byte and typed-field dtypes of every OIP datatype (BYTES handled apart).
_WIRE_DTYPES = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}


@dataclass(frozen=True)
class Answer:
    """How a request ended: its row of the error table, and the message a caller sees."""

    kind: Kind
    message: str
    #: Status as the wire named it (``INVALID_ARGUMENT``, ``HTTP 400``), for failure reports.
    status: str


@dataclass(frozen=True)
class Case:
    """One tensor request, independent of the wire form that carries it."""

    model: str
    name: str
    datatype: str
    shape: tuple[int, ...]
    #: The elements, flat: numbers of the datatype, or ``bytes`` objects for BYTES.
    values: np.ndarray
    #: Raw bytes sent instead of ``values``' own (a length that disagrees with the shape).
    raw: bytes | None = None
    outputs: tuple[str, ...] = ()
    version: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    def raw_bytes(self) -> bytes:
        """The raw tensor bytes: the override, else the values in the OIP raw format."""
        if self.raw is not None:
            return self.raw
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(v)) + bytes(v) for v in self.values)
        return np.asarray(self.values, dtype=_WIRE_DTYPES.get(self.datatype, "<f4")).tobytes()

    def json_values(self) -> list[Any]:
        """The values as JSON can carry them (BYTES as text; NaN and ±Inf as Python emits)."""
        if self.datatype == "BYTES":
            return [bytes(v).decode("latin-1") for v in self.values]
        return np.asarray(self.values).tolist()  # type: ignore[no-any-return]


@dataclass
class Clients:
    """A synchronous gRPC stub and HTTP client on one gateway."""

    stub: pb_grpc.GRPCInferenceServiceStub
    http: httpx.Client


def _grpc_answer(call: Any, request: pb.ModelInferRequest) -> Answer:
    try:
        call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            kind: Kind = "overloaded" if "overloaded" in details else "too_large"
        else:
            kind = _GRPC_KINDS.get(code, "unexpected")
        if details == GENERIC_INTERNAL_MESSAGE:
            kind = "unexpected"
        return Answer(kind, details, code.name)
    return Answer("ok", "", "OK")


def http_answer(reply: httpx.Response) -> Answer:
    """An HTTP reply reduced to its error-table row; the message from ``{"error": ...}``."""
    kind = _HTTP_KINDS.get(reply.status_code, "unexpected")
    message = ""
    if reply.status_code != 200:
        try:
            message = str(reply.json()["error"])
        except (ValueError, KeyError, TypeError):
            kind, message = "unexpected", f"not an {{'error'}} body: {reply.text[:200]}"
        if message == GENERIC_INTERNAL_MESSAGE:
            kind = "unexpected"
    return Answer(kind, message, f"HTTP {reply.status_code}")


def grpc_request(case: Case, typed: bool) -> pb.ModelInferRequest:
    """``case`` as a ModelInferRequest (raw contents, or the datatype's typed field)."""
    request = pb.ModelInferRequest(model_name=case.model, model_version=case.version)
    tensor = request.inputs.add(name=case.name, datatype=case.datatype, shape=case.shape)
    if typed:
        # Datatypes without a typed field (FP16, unknown names) travel as FP32 values.
        target = getattr(tensor.contents, CONTENTS_FIELD.get(case.datatype, "fp32_contents"))
        target.extend(_typed(case))
    else:
        request.raw_input_contents.append(case.raw_bytes())
    for name in case.outputs:
        request.outputs.add(name=name)
    for key, value in case.parameters.items():
        _set_parameter(request.parameters[key], value)
    return request


def _typed(case: Case) -> list[Any]:
    if case.datatype == "BYTES":
        return [bytes(v) for v in case.values]
    values = np.asarray(case.values)
    if case.datatype in ("FP16", "FP32", "FP64") or case.datatype not in CONTENTS_FIELD:
        return values.astype(np.float64).tolist()  # type: ignore[no-any-return]
    if case.datatype == "BOOL":
        return values.astype(bool).tolist()  # type: ignore[no-any-return]
    return values.astype(np.int64 if case.datatype != "UINT64" else np.uint64).tolist()  # type: ignore[no-any-return]


def _set_parameter(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def http_path(case: Case) -> str:
    """The infer route of ``case``'s model (and version), path segments escaped."""
    path = f"/v2/models/{quote(case.model, safe='')}"
    if case.version:
        path += f"/versions/{quote(case.version, safe='')}"
    return path + "/infer"


def http_body(case: Case, binary: bool) -> tuple[bytes, dict[str, str]]:
    """``case`` as a JSON body (``data``) or a binary-extension body, with its headers."""
    tensor: dict[str, Any] = {"name": case.name, "datatype": case.datatype, "shape": case.shape}
    raw = case.raw_bytes()
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = case.json_values()
    document: dict[str, Any] = {"inputs": [tensor]}
    if case.outputs:
        document["outputs"] = [{"name": name} for name in case.outputs]
    if case.parameters:
        document["parameters"] = case.parameters
    header = json.dumps(document).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + raw, {
        HEADER_LENGTH: str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def send(clients: Clients, case: Case, wire: Wire) -> Answer:
    """Send ``case`` in one wire form and reduce the answer (never raises on a bad status)."""
    if wire.startswith("grpc"):
        return _grpc_answer(clients.stub.ModelInfer, grpc_request(case, wire == "grpc-typed"))
    body, headers = http_body(case, wire == "http-binary")
    return post(clients, http_path(case), body, headers)


def post(clients: Clients, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    """POST ``body`` to ``path``; a transport failure or timeout is ``unexpected``."""
    try:
        reply = clients.http.post(path, content=body, headers=headers, timeout=CALL_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Answer("unexpected", f"{type(exc).__name__}: {exc}", "no answer")
    return http_answer(reply)


def send_raw_grpc(clients: Clients, request: pb.ModelInferRequest) -> Answer:
    """Send a hand-built ModelInferRequest and reduce the answer."""
    return _grpc_answer(clients.stub.ModelInfer, request)


def element_count(shape: tuple[int, ...]) -> int:
    """Elements a shape declares."""
    return math.prod(shape)


def assert_answer(answer: Answer, kind: str, *fragments: str) -> None:
    """``answer`` is the expected row, and its message names what was wrong."""
    assert answer.kind == kind, f"expected {kind}, got {answer.status}: {answer.message}"
    if kind != "ok":
        assert answer.message.strip(), f"{answer.status} with an empty message"
    for fragment in fragments:
        assert fragment in answer.message, f"{fragment!r} not in {answer.message!r}"


def valid_case(model: str = "convnet", count: int = 2) -> Case:
    """A request the gateway must answer: digits (convnet) or a shapes scene (fcn)."""
    png = digit_png(0)[0] if model == "convnet" else shapes_png(1, 32)[0]
    values = np.empty(count, dtype=object)
    values[:] = [png] * count
    return Case(model, "image", "BYTES", (count,), values)


def assert_still_serving(clients: Clients, gateway: GatewayProcess, rss_before: int) -> None:
    """The process lives, a valid request succeeds on every wire, memory did not balloon."""
    assert gateway.process.poll() is None, "the gateway process died"
    for wire in ("grpc-raw", "http-binary"):
        for model in MODELS:
            assert_answer(send(clients, valid_case(model), wire), "ok")
    grown = gateway.rss_bytes() - rss_before
    assert grown < RSS_GROWTH_LIMIT, f"gateway RSS grew by {grown >> 20} MiB"
