"""Bad input, fuzzed: generated Open Inference Protocol requests against a real gateway.

Each test draws requests that are wrong in one way (shape, datatype, length, dimensions,
names, images, size, body, headers), sends each over a real gRPC or HTTP connection to a
``cnnserve serve`` process and checks the answer is the error table's row for that fault
(``cnnserve.protocol.status``; docs/architecture.md, "Errors") with a message that says what
was wrong — never INTERNAL/500, a dropped connection or a hang. After each test's examples a
valid request must still succeed over both transports, and the gateway's memory must not
have grown by what a bad header declared. Examples are bounded and deadlines off so the
suite stays within minutes.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnserve.errors import InvalidInputError
from cnnserve.models.registry import get_spec
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.http_codec import HEADER_LENGTH
from tests.gateway.bad_input import (
    MODELS,
    WIRES,
    Case,
    Clients,
    Wire,
    assert_answer,
    element_count,
    http_body,
    http_path,
    post,
    send,
    send_raw_grpc,
    valid_case,
)
from tests.gateway.conftest import FUZZ_MAX_ITEMS, FUZZ_MAX_MESSAGE_BYTES
from tests.gateway.harness import digit_pixels
from tests.images import digit_png, encode, png_declaring, shapes_png

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
INPUT_DATATYPES = {"input": "FP32", "pixels": "UINT8"}
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
DATATYPES += ("FP16", "FP32", "FP64", "BYTES")


# --- strategies -----------------------------------------------------------------------------


@st.composite
def tensor_values(draw: st.DrawFn, datatype: str, count: int) -> np.ndarray:
    """``count`` values of ``datatype``: pixels for UINT8, normalized floats for FP32, and
    sometimes NaN or ±Inf in a float tensor."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if datatype == "BYTES":
        values = np.empty(count, dtype=object)
        values[:] = [draw(st.binary(max_size=8)) for _ in range(min(count, 4))] + [b"x"] * max(
            0, count - 4
        )
        return values
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool)
    if datatype.startswith(("UINT", "INT")):
        info = np.iinfo(np.dtype(datatype.lower()))
        return rng.integers(max(info.min, -100), min(info.max, 255), count, endpoint=True).astype(
            datatype.lower()
        )
    values = rng.uniform(-1, 1, count).astype(np.float32)
    special = draw(st.sampled_from([None, None, math.nan, math.inf, -math.inf]))
    if special is not None and count:
        values[draw(st.integers(0, count - 1))] = special
    return values


#: Shapes near the accepted ones (one dimension off at a time) and arbitrary small ones.
near_shapes = st.tuples(
    st.integers(0, FUZZ_MAX_ITEMS + 2),
    st.sampled_from([1, 3, 4]),
    st.sampled_from([5, 7, 27, 28, 29, 33]),
    st.sampled_from([6, 7, 28, 30]),
)
#: Kept under ~20k elements, so even as JSON text a request stays under the message limit.
any_shapes = (
    st.lists(st.integers(0, 12), max_size=6)
    .map(tuple)
    .filter(lambda shape: element_count(shape) <= 20_000)
)


def shape_outcome(model: str, shape: tuple[int, ...], values: np.ndarray) -> tuple[str, str]:
    """The error-table row a well-formed tensor of ``shape`` earns, and a message fragment."""
    spec = get_spec(model)
    if len(shape) != 4:
        return "invalid", spec.shape_text()
    count, channels, height, width = shape
    try:
        spec.check_size(height, width)
        fits = channels == 3
    except InvalidInputError:
        fits = False
    faults = [
        (count == 0, "invalid", "no items"),
        (count > FUZZ_MAX_ITEMS, "too_large", "max_items_per_request"),
        (not fits, "invalid", spec.shape_text()),
        (not np.isfinite(values.astype(np.float64)).all(), "invalid", "NaN"),
    ]
    return next(((kind, text) for fault, kind, text in faults if fault), ("ok", ""))


wires = st.sampled_from(WIRES)


# --- tensors --------------------------------------------------------------------------------


@st.composite
def shaped_cases(draw: st.DrawFn) -> Case:
    """Correct datatype and element count; the shape (rank, N, C, H, W) is what varies."""
    model = draw(st.sampled_from(MODELS))
    name = draw(st.sampled_from(sorted(INPUT_DATATYPES)))
    shape = draw(st.one_of(near_shapes, any_shapes))
    datatype = INPUT_DATATYPES[name]
    return Case(model, name, datatype, shape, draw(tensor_values(datatype, element_count(shape))))


def test_shapes_ranks_and_values(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Wrong ranks, N = 0, N over the limit, wrong C/H/W, NaN/Inf: the table's row each."""

    @FUZZ
    @given(case=shaped_cases(), wire=wires)
    def check(case: Case, wire: Wire) -> None:
        kind, fragment = shape_outcome(case.model, case.shape, case.values)
        assert_answer(send(fuzz_clients, case, wire), kind, fragment)

    check()
    serving()


@st.composite
def mistyped_cases(draw: st.DrawFn) -> Case:
    """A valid convnet shape whose datatype is another one of the table's, or unknown."""
    name = draw(st.sampled_from(sorted(INPUT_DATATYPES)))
    datatype = draw(
        st.one_of(
            st.sampled_from(DATATYPES).filter(lambda d: d != INPUT_DATATYPES[name]),
            st.text(max_size=12).filter(lambda d: d not in DATATYPES),
        )
    )
    shape = (1, 3, 28, 28)
    values = draw(tensor_values(datatype if datatype in DATATYPES else "FP32", 3 * 28 * 28))
    return Case("convnet", name, datatype, shape, values)


def test_wrong_and_unknown_datatypes(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Every other datatype, and names that are none: INVALID_ARGUMENT naming the tensor."""

    @FUZZ
    @given(case=mistyped_cases(), wire=wires)
    def check(case: Case, wire: Wire) -> None:
        answer = send(fuzz_clients, case, wire)
        assert_answer(answer, "invalid")
        assert case.name in answer.message or case.datatype in answer.message

    check()
    serving()


@st.composite
def mislength_cases(draw: st.DrawFn) -> Case:
    """Raw bytes (or values) that disagree with the declared shape."""
    name = draw(st.sampled_from(sorted(INPUT_DATATYPES)))
    datatype = INPUT_DATATYPES[name]
    shape = draw(st.sampled_from([(1, 3, 28, 28), (2, 3, 28, 28), (1, 3, 9, 9)]))
    itemsize = 4 if datatype == "FP32" else 1
    expected = element_count(shape) * itemsize
    length = draw(st.integers(0, expected + 64).filter(lambda n: n != expected))
    values = draw(tensor_values(datatype, length // itemsize))
    raw = draw(st.binary(min_size=length, max_size=length))
    model = "convnet" if shape[2] == 28 else "fcn"
    return Case(model, name, datatype, shape, values, raw=raw)


def test_contents_disagreeing_with_the_shape(
    fuzz_clients: Clients, serving: Callable[[], None]
) -> None:
    """Raw bytes of the wrong length, too few or too many values: INVALID_ARGUMENT."""

    @FUZZ
    @given(case=mislength_cases(), wire=wires)
    def check(case: Case, wire: Wire) -> None:
        answer = send(fuzz_clients, case, wire)
        assert_answer(answer, "invalid", case.name)

    check()
    serving()


huge = st.integers(2**31, 2**62)


@st.composite
def huge_cases(draw: st.DrawFn) -> Case:
    """Dimensions that would need terabytes (or negative ones, or a rank numpy cannot hold)
    behind a few bytes of data: refused from the header, before any allocation."""
    shape = draw(
        st.one_of(
            st.tuples(st.integers(1, 2), st.just(3), huge, huge),
            st.tuples(huge, st.just(3), st.just(28), st.just(28)),
            st.tuples(st.just(0), huge, huge, huge),
            st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=5).map(tuple),
            st.integers(5, 100).map(lambda rank: (1,) * rank),
        )
    )
    values = draw(tensor_values("FP32", draw(st.integers(0, 16))))
    return Case(draw(st.sampled_from(MODELS)), "input", "FP32", shape, values)


def test_huge_declared_dimensions(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """A shape declaring more than it carries is refused without allocating it."""

    @FUZZ
    @given(case=huge_cases(), wire=wires)
    def check(case: Case, wire: Wire) -> None:
        answer = send(fuzz_clients, case, wire)
        # [1,…,1] of rank > 4 with one value is well-formed; the model still refuses it.
        assert_answer(answer, "invalid")

    check()
    serving()


names = st.text(min_size=1, max_size=16)


def output_fault(outputs: list[str], offered: list[str]) -> str:
    """What the first bad output name is reported as ("" when every one is fine)."""
    for index, name in enumerate(outputs):
        if name not in offered:
            return "unknown output"
        if name in outputs[:index]:
            return "more than once"
    return ""


@st.composite
def misnamed_cases(draw: st.DrawFn) -> tuple[Case, str]:
    """An unknown input name, unknown/duplicate outputs, or an unknown model or version."""
    fault = draw(st.sampled_from(["input", "output", "model", "version"]))
    pixels = np.full(2 * 3 * 28 * 28, 128, dtype=np.uint8)
    case = Case("convnet", "pixels", "UINT8", (2, 3, 28, 28), pixels)
    # Path segments "." and ".." would be resolved away by the HTTP client.
    unnamed = names.filter(lambda n: n not in {".", ".."})
    if fault == "input":
        name = draw(unnamed.filter(lambda n: n not in ("input", "pixels", "image")))
        return Case("convnet", name, "UINT8", case.shape, pixels), "unknown input"
    if fault == "output":
        offered = ["logits", "probabilities", "labels", "conv1", "pool1", "conv2", "pool2", "fc1"]
        outputs = draw(st.lists(st.one_of(st.sampled_from(offered), unnamed), min_size=1))
        return Case(**{**case.__dict__, "outputs": tuple(outputs)}), output_fault(outputs, offered)
    if fault == "model":
        model = draw(unnamed.filter(lambda n: n not in MODELS))
        return Case(**{**case.__dict__, "model": model}), "not_found"
    version = draw(unnamed.filter(lambda v: v != "1"))
    return Case(**{**case.__dict__, "version": version}), "not_found"


def test_unknown_names(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Inputs and outputs that do not exist: INVALID_ARGUMENT listing the valid ones;
    unknown models and versions: NOT_FOUND."""

    @FUZZ
    @given(drawn=misnamed_cases(), wire=wires)
    def check(drawn: tuple[Case, str], wire: Wire) -> None:
        case, fragment = drawn
        answer = send(fuzz_clients, case, wire)
        if fragment == "not_found":
            assert_answer(answer, "not_found")
        elif fragment:
            assert_answer(answer, "invalid", fragment)
        else:
            assert_answer(answer, "ok")

    check()
    serving()


# --- images ---------------------------------------------------------------------------------

DIGIT = digit_png(3)[0]
DIGIT_PIXELS = digit_pixels([3])[0].reshape(-1)
SCENE = shapes_png(2, 24)[0]


@st.composite
def image_items(draw: st.DrawFn, model: str) -> tuple[bytes, bool]:
    """One BYTES element and whether it is a valid image for ``model``."""
    valid = DIGIT if model == "convnet" else SCENE
    kind = draw(st.sampled_from(["valid", "garbage", "truncated", "huge", "empty", "format"]))
    if kind == "valid":
        return valid, True
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=256)), False
    if kind == "truncated":
        # Cut inside the pixel data: Pillow decodes a PNG whose last ~22 bytes (IEND, the
        # IDAT CRC, zlib's checksum) are gone, as every row is already there.
        return valid[: draw(st.integers(1, len(valid) - 40))], False
    if kind == "huge":
        return png_declaring(
            draw(st.integers(5000, 2**31 - 1)), draw(st.integers(5000, 2**31 - 1))
        ), False
    if kind == "format":
        pixels = np.zeros((16, 16, 3), dtype=np.uint8)
        return encode(pixels, draw(st.sampled_from(["GIF", "BMP", "TIFF"]))), False
    return b"", False


@st.composite
def image_cases(draw: st.DrawFn) -> tuple[Case, bool]:
    """1–4 images, each valid or broken (garbage, truncated, huge, empty, wrong format)."""
    model = draw(st.sampled_from(MODELS))
    items = draw(st.lists(image_items(model), min_size=1, max_size=4))
    values = np.empty(len(items), dtype=object)
    values[:] = [data for data, _ in items]
    return Case(model, "image", "BYTES", (len(items),), values), all(ok for _, ok in items)


def test_broken_images(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Garbage, truncated PNGs, enormous declared sizes, GIF/BMP/TIFF: INVALID_ARGUMENT
    naming the image; a request of valid images beside them still succeeds."""

    @FUZZ
    @given(drawn=image_cases(), wire=st.sampled_from(["grpc-raw", "grpc-typed", "http-binary"]))
    def check(drawn: tuple[Case, bool], wire: Wire) -> None:
        case, valid = drawn
        answer = send(fuzz_clients, case, wire)
        if valid:
            assert_answer(answer, "ok")
        else:
            assert_answer(answer, "invalid", "image ")

    check()
    serving()


@pytest.mark.parametrize(
    ("model", "width", "height"),
    [
        ("convnet", 100_000, 100_000),
        ("fcn", 100_000, 100_000),
        ("convnet", 2**31 - 1, 1),
        # Within max_image_pixels, but the FCN takes at most 512×512: refused by its header.
        ("fcn", 4000, 4000),
    ],
)
def test_enormous_declared_images_are_refused_from_the_header(
    fuzz_clients: Clients, serving: Callable[[], None], model: str, width: int, height: int
) -> None:
    """An image header declaring more pixels than allowed (or than the FCN takes) is refused
    before its pixels are decoded: the answer names the size, memory stays flat."""
    values = np.empty(1, dtype=object)
    values[:] = [png_declaring(width, height)]
    answer = send(fuzz_clients, Case(model, "image", "BYTES", (1,), values), "grpc-raw")
    assert_answer(answer, "invalid", f"{width}")
    serving()


# --- sizes ----------------------------------------------------------------------------------


def test_oversized_requests(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """More items than max_items_per_request: RESOURCE_EXHAUSTED/413 saying to split;
    a message over max_message_bytes: RESOURCE_EXHAUSTED/413."""

    @settings(FUZZ, max_examples=12)
    @given(extra=st.integers(1, 4), wire=wires)
    def check(extra: int, wire: Wire) -> None:
        count = FUZZ_MAX_ITEMS + extra
        pixels = np.zeros(count * 3 * 28 * 28, dtype=np.uint8)
        case = Case("convnet", "pixels", "UINT8", (count, 3, 28, 28), pixels)
        assert_answer(send(fuzz_clients, case, wire), "too_large", "split")

    check()
    side = 300  # 4 × 3 × 300² FP32 values: over the 1 MiB limit on every wire form
    big = np.zeros(4 * 3 * side * side, dtype=np.float32)
    for wire in WIRES:
        answer = send(fuzz_clients, Case("fcn", "input", "FP32", (4, 3, side, side), big), wire)
        assert_answer(answer, "too_large")
    assert big.nbytes > FUZZ_MAX_MESSAGE_BYTES
    serving()


# --- timeouts -------------------------------------------------------------------------------


def test_timeout_parameter(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """The OIP ``timeout`` parameter: a non-negative integer of µs, anything else refused."""

    @FUZZ
    @given(
        timeout=st.one_of(
            st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=8)
        ),
        wire=wires,
    )
    def check(timeout: object, wire: Wire) -> None:
        case = Case("convnet", "pixels", "UINT8", (1, 3, 28, 28), DIGIT_PIXELS)
        answer = send(
            fuzz_clients, Case(**{**case.__dict__, "parameters": {"timeout": timeout}}), wire
        )
        if isinstance(timeout, int) and timeout >= 0:
            # A budget of a few µs may run out before the answer: that is the table's row.
            assert answer.kind in ("ok", "deadline"), answer
        else:
            assert_answer(answer, "invalid", "timeout")

    check()
    serving()


# --- gRPC-only mistakes ---------------------------------------------------------------------


def test_grpc_contents_mixups(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Both raw and typed contents, typed values in another datatype's field, raw entries
    not matching the inputs, several inputs: INVALID_ARGUMENT saying which."""
    pixels = np.full(3 * 28 * 28, 7, dtype=np.uint8)

    def request(**extra: object) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="convnet")
        message.inputs.add(name="pixels", datatype="UINT8", shape=[1, 3, 28, 28], **extra)
        return message

    both = request()
    both.inputs[0].contents.uint_contents.extend(pixels.tolist())
    both.raw_input_contents.append(pixels.tobytes())
    assert_answer(send_raw_grpc(fuzz_clients, both), "invalid", "both")

    @FUZZ
    @given(
        field=st.sampled_from(
            [
                "fp32_contents",
                "int_contents",
                "int64_contents",
                "bool_contents",
                "bytes_contents",
                "fp64_contents",
                "uint64_contents",
            ]
        )
    )
    def wrong_field(field: str) -> None:
        message = request()
        values: list[object] = (
            [b"x"] * pixels.size
            if field == "bytes_contents"
            else [True] * pixels.size
            if field == "bool_contents"
            else pixels.tolist()
        )
        getattr(message.inputs[0].contents, field).extend(values)
        assert_answer(send_raw_grpc(fuzz_clients, message), "invalid", field)

    wrong_field()

    @FUZZ
    @given(entries=st.integers(2, 5), inputs=st.integers(0, 3))
    def raw_count(entries: int, inputs: int) -> None:
        message = pb.ModelInferRequest(model_name="convnet")
        for _ in range(inputs):
            message.inputs.add(name="pixels", datatype="UINT8", shape=[1, 3, 28, 28])
        message.raw_input_contents.extend([pixels.tobytes()] * entries)
        if entries == inputs:
            assert_answer(send_raw_grpc(fuzz_clients, message), "invalid", "exactly one input")
        else:
            assert_answer(send_raw_grpc(fuzz_clients, message), "invalid", "raw_input_contents")

    raw_count()
    serving()


# --- HTTP-only mistakes ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
#: Documents shaped like an infer request, with every field possibly of the wrong kind.
request_like = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "parameters": json_values,
        "inputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.sampled_from(["input", "pixels", "image"]) | json_values,
                    "datatype": st.sampled_from(DATATYPES) | json_values,
                    "shape": st.lists(st.integers(-2, 2**64), max_size=5) | json_values,
                    "data": st.lists(st.floats() | st.integers(), max_size=8) | json_values,
                    "parameters": st.fixed_dictionaries(
                        {}, optional={"binary_data_size": st.integers(-5, 2**64) | json_values}
                    )
                    | json_values,
                },
            )
            | json_values,
            max_size=3,
        )
        | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({}, optional={"name": json_values, "parameters": json_values})
            | json_values,
            max_size=3,
        )
        | json_values,
    },
)


def test_http_malformed_bodies(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Bytes that are not JSON, JSON that is not an object, objects with wrong fields of any
    kind: 400 with a message (413 only for a body over the limit), never a 500."""

    @FUZZ
    @given(
        body=st.one_of(
            st.binary(max_size=300),
            json_values.map(lambda v: json.dumps(v).encode()),
            request_like.map(lambda v: json.dumps(v).encode()),
        ),
        model=st.sampled_from(MODELS),
    )
    def check(body: bytes, model: str) -> None:
        answer = post(fuzz_clients, f"/v2/models/{model}/infer", body, {})
        assert_answer(answer, "invalid")

    check()
    serving()


def test_http_headers(fuzz_clients: Clients, serving: Callable[[], None]) -> None:
    """Any Content-Type is accepted (standard clients send none or a generic one);
    an unknown Content-Encoding or a lying Inference-Header-Content-Length is a 400."""
    case = valid_case("convnet", 1)
    json_body, _ = http_body(
        Case("convnet", "pixels", "UINT8", (1, 3, 28, 28), np.zeros(2352, np.uint8)), False
    )
    binary_body, binary_headers = http_body(case, True)
    path = http_path(case)
    header_length = int(binary_headers[HEADER_LENGTH])
    # HTTP header values: visible ASCII, no surrounding whitespace (clients refuse to send it).
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
        str.strip
    )

    @FUZZ
    @given(content_type=printable, encoding=printable, length=printable, valid=st.booleans())
    def check(content_type: str, encoding: str, length: str, valid: bool) -> None:
        body = json_body if valid else b"{not json"
        answer = post(fuzz_clients, path, body, {"Content-Type": content_type})
        assert_answer(answer, "ok" if valid else "invalid")

        identity = encoding.strip().lower() in ("", "identity")
        compressed = gzip.compress(json_body) if encoding.strip().lower() == "gzip" else json_body
        answer = post(fuzz_clients, path, compressed, {"Content-Encoding": encoding})
        if identity or encoding.strip().lower() in ("gzip",):
            assert_answer(answer, "ok")
        elif encoding.strip().lower() != "deflate":
            assert_answer(answer, "invalid", "Content-Encoding")

        answer = post(fuzz_clients, path, binary_body, {HEADER_LENGTH: length})
        if length.strip().isdigit() and int(length) == header_length:
            assert_answer(answer, "ok")
        else:
            assert_answer(answer, "invalid")

    check()
    serving()
