"""What the soak sends and how each answer is judged.

Each :class:`Shot` is one request — valid (digits to classify, a scene to segment) or
invalid (a wrong shape, garbage as an image, NaN, an unknown model, malformed JSON) — over
gRPC or HTTP, and :func:`fire` returns its :class:`Verdict`:

- ``succeeded``: a valid request answered with the right result;
- ``rejected``: an answer from the error table that fits — an invalid request refused as
  bad input / unknown model, or any request refused as overloaded, unavailable or past its
  deadline (expected while faults are injected);
- ``failed``: a wrong answer — a valid request refused as bad input, an invalid one
  accepted, a wrong result, an INTERNAL/500;
- ``lost``: no answer from the gateway at all — the client's own deadline (the request's
  budget plus a grace) ran out, or the connection broke.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import grpc
import httpx
import numpy as np

from cnnserve.models.imaging import encode_png
from cnnserve.models.registry import get_spec
from cnnserve.models.scenes import shapes_scene
from cnnserve.models.steps import normalize
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc

from .payloads import digit_pngs

Outcome = Literal["succeeded", "rejected", "failed", "lost"]
#: The gateway must answer within this budget (the OIP ``timeout`` parameter it honours).
BUDGET_S = 10.0
#: How much longer the client waits before it counts the request as lost.
LOST_GRACE_S = 20.0
#: Error-table rows by gRPC status and by HTTP status.
GRPC_REASONS = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_input",
    grpc.StatusCode.NOT_FOUND: "unknown_model",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline_exceeded",
}
HTTP_REASONS = {
    400: "invalid_input",
    404: "unknown_model",
    413: "too_large",
    429: "overloaded",
    503: "unavailable",
    504: "deadline_exceeded",
}
#: Refusals any request may get while faults are injected.
TRANSIENT = frozenset({"overloaded", "unavailable", "deadline_exceeded"})
#: How gRPC itself (not the gateway) words a call that never got an answer.
_TRANSPORT_FAILURES = (
    "Deadline Exceeded",
    "failed to connect",
    "Socket closed",
    "Connection reset",
    "Broken pipe",
    "Stream removed",
    "GOAWAY",
    "Cancelled",
)


@dataclass(frozen=True)
class Verdict:
    """How one request ended, and why (the error-table row, or what went wrong)."""

    outcome: Outcome
    reason: str = ""


@dataclass(frozen=True)
class Shot:
    """One request: what it sends, what it expects, and how to check a success."""

    name: str
    model: str
    #: The OIP input: name, datatype and array (object array of bytes for BYTES).
    tensor: tuple[str, str, np.ndarray] | None
    #: ``None``: a valid request; else the refusal it must get.
    expected_refusal: str | None = None
    #: Checks the decoded first output of a success (raises AssertionError if wrong).
    check: Callable[[np.ndarray], None] | None = None
    #: For HTTP: a raw body sent as is instead of the tensor (malformed JSON).
    raw_body: bytes | None = None
    #: The output asked for (and checked); ``None``: the model's defaults.
    output: str | None = None

    @property
    def over_grpc(self) -> bool:
        """Whether it can go over gRPC (a malformed JSON body cannot)."""
        return self.tensor is not None

    @property
    def over_http(self) -> bool:
        """Whether it can go as JSON (encoded images are bytes, which JSON cannot carry)."""
        return self.tensor is None or self.tensor[1] != "BYTES"


def _grpc_message(shot: Shot) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=shot.model)
    request.parameters["timeout"].int64_param = int(BUDGET_S * 1e6)
    assert shot.tensor is not None
    name, datatype, array = shot.tensor
    request.inputs.add(name=name, datatype=datatype, shape=array.shape)
    if datatype == "BYTES":
        request.inputs[0].contents.bytes_contents.extend(bytes(b) for b in array.reshape(-1))
    else:
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    if shot.output is not None:
        request.outputs.add(name=shot.output)
    return request


def _http_body(shot: Shot) -> bytes:
    if shot.raw_body is not None:
        return shot.raw_body
    assert shot.tensor is not None
    name, datatype, array = shot.tensor
    # NaN goes out as JSON's non-standard NaN, which the gateway's parser reads.
    data = array.reshape(-1).tolist()
    document = {
        "parameters": {"timeout": int(BUDGET_S * 1e6)},
        "inputs": [{"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}],
        "outputs": [{"name": shot.output}] if shot.output else [],
    }
    return json.dumps(document).encode()


def _judge(
    shot: Shot, reason: str | None, first_output: Callable[[], np.ndarray] | None = None
) -> Verdict:
    """The verdict for an answer: ``reason`` is the error-table row, ``None`` for success."""
    if reason is None:
        if shot.expected_refusal is not None:
            return Verdict("failed", f"{shot.name}: accepted, expected {shot.expected_refusal}")
        try:
            if shot.check is not None and first_output is not None:
                shot.check(first_output())
        except AssertionError as exc:
            return Verdict("failed", f"{shot.name}: wrong answer ({exc})")
        return Verdict("succeeded")
    if reason in TRANSIENT or reason == shot.expected_refusal:
        return Verdict("rejected", reason)
    return Verdict("failed", f"{shot.name}: refused as {reason}")


async def fire_grpc(stub: pb_grpc.GRPCInferenceServiceStub, shot: Shot) -> Verdict:
    """Send ``shot`` over gRPC and judge the answer."""
    try:
        response = await stub.ModelInfer(_grpc_message(shot), timeout=BUDGET_S + LOST_GRACE_S)
    except grpc.aio.AioRpcError as exc:
        details = exc.details() or ""
        if details.startswith(_TRANSPORT_FAILURES):
            return Verdict("lost", f"{exc.code().name}: {details[:80]}")
        reason = GRPC_REASONS.get(exc.code(), exc.code().name)
        return _judge(shot, reason)
    output = response.outputs[0]
    dtype = {"FP32": np.float32, "UINT8": np.uint8, "INT64": np.int64}[output.datatype]
    raw = response.raw_output_contents[0]
    return _judge(shot, None, lambda: np.frombuffer(raw, dtype=dtype).reshape(output.shape))


async def fire_http(http: httpx.AsyncClient, shot: Shot) -> Verdict:
    """Send ``shot`` as JSON over HTTP and judge the answer."""
    try:
        reply = await http.post(
            f"/v2/models/{shot.model}/infer",
            content=_http_body(shot),
            timeout=BUDGET_S + LOST_GRACE_S,
        )
    except httpx.HTTPError as exc:
        return Verdict("lost", f"HTTP: {type(exc).__name__}")
    if reply.status_code == 200:

        def first() -> np.ndarray:
            output = reply.json()["outputs"][0]
            return np.asarray(output["data"]).reshape(output["shape"])

        return _judge(shot, None, first)
    return _judge(shot, HTTP_REASONS.get(reply.status_code, f"HTTP {reply.status_code}"))


def make_shots(expected_labels: Callable[[np.ndarray], list[int]]) -> list[Shot]:
    """The soak's repertoire; ``expected_labels`` gives convnet's labels for pixels (the
    same artifact the backend runs, computed in this process)."""
    convnet = get_spec("convnet")
    digits = np.stack([convnet.image_to_pixels(png) for png in digit_pngs(6)])
    labels = expected_labels(digits)
    scene, _ = shapes_scene(np.random.default_rng(3), 32)
    scene_png = np.empty(1, dtype=object)
    scene_png[:] = [encode_png(scene)]
    garbage = np.empty(1, dtype=object)
    garbage[:] = [b"\x89PNG not really an image"]
    nan = normalize(digits[:1]).copy()
    nan[0, 0, 0, 0] = np.nan

    def classified(rows: slice) -> Callable[[np.ndarray], None]:
        def check(logits: np.ndarray) -> None:
            assert logits.argmax(axis=1).tolist() == labels[rows], logits.argmax(axis=1)

        return check

    def segmented(mask: np.ndarray) -> None:
        assert mask.shape == (1, 32, 32), mask.shape

    shots = [
        Shot(f"digits[{a}:{b}]", "convnet", ("pixels", "UINT8", digits[a:b]), None,
             classified(slice(a, b)), output="logits")
        for a, b in ((0, 1), (1, 3), (3, 6))
    ]  # fmt: skip
    shots += [
        Shot("scene", "fcn", ("image", "BYTES", scene_png), None, segmented, output="mask"),
        Shot("wrong shape", "convnet", ("input", "FP32", np.zeros((1, 3, 32, 32), np.float32)),
             "invalid_input"),
        Shot("garbage image", "convnet", ("image", "BYTES", garbage), "invalid_input"),
        Shot("NaN", "convnet", ("input", "FP32", nan), "invalid_input"),
        Shot("unknown model", "resnet", ("pixels", "UINT8", digits[:1]), "unknown_model"),
        Shot("malformed JSON", "convnet", None, "invalid_input", raw_body=b'{"inputs": [}'),
    ]  # fmt: skip
    return shots


def valid(shot: Shot) -> bool:
    """Whether ``shot`` is a request the gateway should answer with a result."""
    return shot.expected_refusal is None
