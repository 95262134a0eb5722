"""The HTTP and gRPC decoders fuzzed at the DEFAULT limits: arbitrary JSON, headers,
parameters, protobuf fields and raw bytes, each answered from the error table — never
500/INTERNAL/UNKNOWN, never a dropped connection.

The other fuzzers (test_bad_input.py, test_openapi.py) run against a gateway whose limits are
lowered so small requests reach them; lowered limits refuse big and odd requests early and hid
the ones this module found (deep JSON, huge integers, non-ASCII digits, undecodable protobuf).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cnnserve.gateway.grpc_service import INFERENCE_SERVICE
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import CONTENTS_FIELD
from tests.gateway.bad_input import CALL_TIMEOUT_S
from tests.support import GatewayProcess, gateway_process

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: What a malformed request may be answered with: the error table's caller-side rows.
HTTP_ANSWERS = {200, 400, 404, 413, 429, 503, 504}
GRPC_ANSWERS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MODELS = st.sampled_from(["convnet", "fcn", "nope", "", "convnet/../x"])
INPUT_NAMES = st.sampled_from(["input", "pixels", "image", "x", ""])
DATATYPES = st.sampled_from([*CONTENTS_FIELD, "FP16", "fp32", "", "INT128"])
#: Integers around every boundary a decoder may trip on: int32/int64/uint64, 4,300 digits.
INTEGERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**400]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTEGERS, st.floats(allow_nan=True), st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
PARAMETERS = st.dictionaries(
    st.sampled_from(["timeout", "top_k", "classification", "binary_data", "binary_data_size", "k"]),
    JSON_VALUES,
    max_size=3,
)
SHAPES = st.lists(st.one_of(st.integers(-2, 600), INTEGERS), max_size=5)


@pytest.fixture(scope="module")
def gateway(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``cnnserve serve`` at its defaults (only the model repository and device set)."""
    log = tmp_path_factory.mktemp("fuzz_defaults") / "gateway.log"
    with gateway_process("onnxruntime", log, model_repository=model_repository, device="cpu") as g:
        yield g
    # Any traceback means an exception escaped the error table somewhere.
    text = g.output()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=CALL_TIMEOUT_S
    ) as client:
        yield client


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as opened:
        yield opened


def _http_ok(reply: httpx.Response) -> None:
    assert reply.status_code in HTTP_ANSWERS, (reply.status_code, reply.text[:300])
    if reply.status_code != 200:
        assert set(reply.json()) == {"error"}, reply.text[:300]


def _grpc_ok(call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, timeout=CALL_TIMEOUT_S, **kwargs)
    except grpc.RpcError as exc:
        assert exc.code() in GRPC_ANSWERS, (exc.code(), exc.details())


def _input_document() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"name": INPUT_NAMES, "datatype": DATATYPES, "shape": SHAPES},
        optional={"data": JSON_VALUES, "parameters": PARAMETERS},
    )


@FUZZ
@given(
    model=MODELS,
    document=st.one_of(
        JSON_VALUES,
        st.fixed_dictionaries(
            {"inputs": st.lists(_input_document(), max_size=2)},
            optional={
                "id": JSON_VALUES,
                "parameters": PARAMETERS,
                "outputs": st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["labels", "scores", "mask", "x"])},
                        optional={"parameters": PARAMETERS},
                    ),
                    max_size=2,
                ),
            },
        ),
    ),
    # Visible characters only: the HTTP client refuses to send control characters.
    header_length=st.one_of(
        st.none(),
        st.text(st.characters(min_codepoint=0x21, exclude_categories=["Cc", "Cs"]), max_size=6),
        INTEGERS.map(str),
    ),
    tail=st.binary(max_size=16),
)
def test_http_infer_bodies(
    http: httpx.Client, model: str, document: Any, header_length: str | None, tail: bytes
) -> None:
    body = json.dumps(document).encode()
    headers = {}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length.encode("utf-8", "replace")
        body += tail
    _http_ok(http.post(f"/v2/models/{model}/infer", content=body, headers=headers))


#: JSON Python's parser refuses with more than JSONDecodeError: deep nesting, long integers.
ODD_JSON = st.one_of(
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(4_200, 5_000).map(lambda n: '{"id": ' + "9" * n + "}"),
    st.integers(1, 3000).map(lambda n: '{"inputs": ' + '{"a": ' * n + "1" + "}" * n + "}"),
)
#: Header values of digits ``int`` may not read: other scripts' digits, superscripts, many.
ODD_DIGITS = st.one_of(
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=4),
    st.integers(19, 5000).map(lambda n: "1" * n),
)


@FUZZ
@given(model=MODELS, body=ODD_JSON, header_length=st.one_of(st.none(), ODD_DIGITS))
def test_http_odd_json_and_header_lengths(
    http: httpx.Client, model: str, body: str, header_length: str | None
) -> None:
    headers = {}
    if header_length is not None:
        # Headers travel as latin-1; what cannot be written so goes as UTF-8 bytes.
        try:
            headers["Inference-Header-Content-Length"] = header_length.encode("latin-1")
        except UnicodeEncodeError:
            headers["Inference-Header-Content-Length"] = header_length.encode()
    _http_ok(http.post(f"/v2/models/{model}/infer", content=body.encode(), headers=headers))


@FUZZ
@given(request_parameters=PARAMETERS, output_parameters=PARAMETERS, binary=st.booleans())
@example(request_parameters={"timeout": 10**400}, output_parameters={}, binary=False)
@example(request_parameters={}, output_parameters={"top_k": 2**64}, binary=True)
def test_http_parameters_of_a_valid_request(
    http: httpx.Client,
    request_parameters: dict[str, Any],
    output_parameters: dict[str, Any],
    binary: bool,
) -> None:
    # A request valid but for its parameters, so each parameter is read where it is used.
    document = {
        "parameters": request_parameters,
        "inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 28, 28], "data": [0] * 2352}
        ],
        "outputs": [{"name": "labels", "parameters": output_parameters}],
    }
    body = json.dumps(document).encode()
    headers = {"Inference-Header-Content-Length": str(len(body))} if binary else {}
    _http_ok(http.post("/v2/models/convnet/infer", content=body, headers=headers))


@FUZZ
@given(body=st.binary(max_size=64), path=st.sampled_from(["index", "models/convnet/load"]))
def test_http_repository_bodies(http: httpx.Client, body: bytes, path: str) -> None:
    _http_ok(http.post(f"/v2/repository/{path}", content=body))


@FUZZ
@given(data=st.binary(max_size=256))
def test_grpc_bytes_that_may_not_be_a_message(channel: grpc.Channel, data: bytes) -> None:
    for method in ("ModelInfer", "ModelMetadata", "ModelReady", "RepositoryIndex", "ModelConfig"):
        _grpc_ok(channel.unary_unary(f"/{INFERENCE_SERVICE}/{method}"), data)


def _set_parameter(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int) and -(2**63) <= value < 2**63:
        param.int64_param = value
    elif isinstance(value, int) and 0 <= value < 2**64:
        param.uint64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)[:20]


@FUZZ
@given(
    model=MODELS,
    name=INPUT_NAMES,
    datatype=DATATYPES,
    shape=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    raw=st.one_of(st.none(), st.binary(max_size=64)),
    typed=st.sampled_from(sorted(set(CONTENTS_FIELD.values()))),
    count=st.integers(0, 3000),
    parameters=PARAMETERS,
    outputs=st.lists(st.sampled_from(["labels", "probabilities", "mask", "x"]), max_size=2),
)
def test_grpc_infer_messages(
    channel: grpc.Channel,
    model: str,
    name: str,
    datatype: str,
    shape: list[int],
    raw: bytes | None,
    typed: str,
    count: int,
    parameters: dict[str, Any],
    outputs: list[str],
) -> None:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        values: list[Any] = {
            "bool_contents": [True] * count,
            "bytes_contents": [b"x"] * count,
            "fp32_contents": [1.5] * count,
            "fp64_contents": [1.5] * count,
        }.get(typed, [1] * count)
        getattr(tensor.contents, typed).extend(values)
    for key, value in parameters.items():
        _set_parameter(request.parameters[key], value)
    for output in outputs:
        _set_parameter(request.outputs.add(name=output).parameters["top_k"], parameters.get("k"))
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    _grpc_ok(stub.ModelInfer, request)
