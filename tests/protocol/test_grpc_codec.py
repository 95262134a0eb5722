"""Protobuf ↔ domain conversion: raw and typed contents, parameters, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol.domain import InferRequest, InferResponse, RequestedOutput, Tensor
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.grpc_codec import (
    CONTENTS_FIELD,
    MAX_WALKED_FIELDS,
    VIEW_MIN_BYTES,
    ReceivedInferRequest,
    _raw_spans,
    decode_work,
    parameters_from_proto,
    parameters_to_proto,
    parse_infer_request,
    request_from_proto,
    request_to_proto,
    response_from_proto,
    response_to_proto,
)
from tests.gateway.harness import raw_bytes_elements


def _bytes_array(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def test_parameters_round_trip_all_five_choices() -> None:
    values = {"b": True, "i": -3, "s": "x", "d": 0.25, "u": 2**63 + 5}
    message = pb.ModelInferRequest()
    parameters_to_proto(values, message.parameters)
    assert message.parameters["b"].WhichOneof("parameter_choice") == "bool_param"
    assert message.parameters["u"].WhichOneof("parameter_choice") == "uint64_param"
    assert parameters_from_proto(message.parameters) == values


def test_request_round_trip_raw() -> None:
    pixels = np.arange(2 * 3 * 28 * 28, dtype=np.uint8).reshape(2, 3, 28, 28)
    request = InferRequest(
        model_name="convnet",
        model_version="1",
        id="r1",
        inputs=[Tensor("pixels", "UINT8", pixels.shape, pixels, {"note": "n"})],
        outputs=[RequestedOutput("labels", {"top_k": 3})],
        parameters={"timeout": 5000},
    )
    message = request_to_proto(request)
    assert message.raw_input_contents[0] == pixels.tobytes()
    decoded = request_from_proto(pb.ModelInferRequest.FromString(message.SerializeToString()), 9.0)
    assert decoded.deadline == 9.0
    assert (decoded.model_name, decoded.model_version, decoded.id) == ("convnet", "1", "r1")
    assert decoded.parameters == {"timeout": 5000}
    assert decoded.outputs == [RequestedOutput("labels", {"top_k": 3})]
    (tensor,) = decoded.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("pixels", "UINT8", (2, 3, 28, 28))
    assert tensor.parameters == {"note": "n"}
    np.testing.assert_array_equal(tensor.data, pixels)


def test_no_outputs_means_defaults() -> None:
    message = pb.ModelInferRequest(model_name="convnet")
    assert request_from_proto(message, None).outputs is None


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("BOOL", [True, False]),
        ("UINT8", [0, 255]),
        ("UINT16", [1, 65535]),
        ("UINT32", [1, 2**32 - 1]),
        ("UINT64", [1, 2**64 - 1]),
        ("INT8", [-128, 127]),
        ("INT16", [-1, 2]),
        ("INT32", [-(2**31), 7]),
        ("INT64", [-(2**63), 7]),
        ("FP32", [0.5, -1.25]),
        ("FP64", [0.1, 2.0]),
        ("BYTES", [b"a", b"\xff\x00"]),
    ],
)
def test_typed_contents_of_every_datatype(datatype: str, values: list[object]) -> None:
    message = pb.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="t", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    (decoded,) = request_from_proto(message, None).inputs
    assert decoded.data.tolist() == values


def test_typed_and_raw_decode_to_the_same_array() -> None:
    data = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 2, 2)
    typed = pb.ModelInferRequest()
    typed.inputs.add(name="input", datatype="FP32", shape=data.shape).contents.fp32_contents.extend(
        data.ravel().tolist()
    )
    raw = pb.ModelInferRequest(raw_input_contents=[data.tobytes()])
    raw.inputs.add(name="input", datatype="FP32", shape=data.shape)
    np.testing.assert_array_equal(
        request_from_proto(typed, None).inputs[0].data, request_from_proto(raw, None).inputs[0].data
    )


def _refusal(message: pb.ModelInferRequest) -> str:
    with pytest.raises(CodecError) as caught:
        request_from_proto(message, None)
    return str(caught.value)


def test_refuses_raw_and_typed_for_one_input() -> None:
    message = pb.ModelInferRequest(raw_input_contents=[b"\0" * 4])
    message.inputs.add(name="t", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
    assert "both typed contents and raw_input_contents" in _refusal(message)


def test_refuses_raw_for_some_inputs_only() -> None:
    message = pb.ModelInferRequest(raw_input_contents=[b"\0" * 4])
    message.inputs.add(name="a", datatype="FP32", shape=[1])
    message.inputs.add(name="b", datatype="FP32", shape=[1])
    assert "raw_input_contents has 1 entries for 2 inputs" in _refusal(message)


def test_refuses_contents_in_the_wrong_field() -> None:
    message = pb.ModelInferRequest()
    message.inputs.add(name="t", datatype="FP32", shape=[1]).contents.int_contents.append(1)
    assert "is FP32 but its contents are in int_contents; use fp32_contents" in _refusal(message)


def test_refuses_typed_fp16() -> None:
    message = pb.ModelInferRequest()
    message.inputs.add(name="t", datatype="FP16", shape=[1])
    assert "FP16 has no typed contents field; send it in raw_input_contents" in _refusal(message)


def test_refuses_raw_length_that_does_not_match_the_shape() -> None:
    message = pb.ModelInferRequest(raw_input_contents=[b"\0" * 10])
    message.inputs.add(name="input", datatype="FP32", shape=[1, 3, 28, 28])
    assert "needs 9408 bytes of raw data, got 10" in _refusal(message)


def test_response_round_trip_is_raw() -> None:
    labels = _bytes_array([b"7", b"1"]).reshape(2, 1)
    probabilities = np.full((2, 10), 0.1, dtype=np.float32)
    response = InferResponse(
        model_name="convnet",
        model_version="1",
        id="r",
        outputs=[
            Tensor("labels", "BYTES", (2, 1), labels),
            Tensor("probabilities", "FP32", (2, 10), probabilities),
        ],
    )
    message = response_to_proto(response)
    assert [o.name for o in message.outputs] == ["labels", "probabilities"]
    assert message.raw_output_contents[0] == raw_bytes_elements([b"7", b"1"])
    assert message.raw_output_contents[1] == probabilities.tobytes()
    decoded = response_from_proto(message)
    assert decoded.outputs[0].data.tolist() == [[b"7"], [b"1"]]
    np.testing.assert_array_equal(decoded.outputs[1].data, probabilities)


def _three_inputs() -> InferRequest:
    """Inputs of 2, 3 and 1 rows and three datatypes, with parameters and outputs around
    them, so the raw contents sit between other fields of the message."""
    rng = np.random.default_rng(7)
    return InferRequest(
        model_name="convnet",
        model_version="2",
        id="req-1",
        inputs=[
            # 37.5 KiB: over VIEW_MIN_BYTES, so its contents stay in the received bytes.
            Tensor(
                "input", "FP32", (2, 3, 40, 40), rng.standard_normal((2, 3, 40, 40), np.float32)
            ),
            Tensor("pixels", "UINT8", (3, 5), rng.integers(0, 256, (3, 5), dtype=np.uint8)),
            Tensor("image", "BYTES", (1,), _bytes_array([b"\x89PNG..."]), {"hint": 3}),
        ],
        outputs=[RequestedOutput("labels", {"top_k": 2})],
        parameters={"timeout": 5000, "trace": "yes"},
    )


def test_received_raw_contents_are_views_of_the_received_bytes() -> None:
    sent = _three_inputs()
    data = request_to_proto(sent).SerializeToString()
    received = parse_infer_request(data)
    assert len(received.message.raw_input_contents) == 0  # left in data, not parsed
    assert [bytes(raw) for raw in received.raw] == list(
        pb.ModelInferRequest.FromString(data).raw_input_contents
    )
    assert decode_work(received) == sum(len(raw) for raw in received.raw)
    request = request_from_proto(received, None)
    wire = np.frombuffer(data, dtype=np.uint8)
    for got, want in zip(request.inputs, sent.inputs, strict=True):
        assert (got.name, got.datatype, got.shape) == (want.name, want.datatype, want.shape)
        np.testing.assert_array_equal(got.data, want.data)
        if got.datatype != "BYTES":
            assert np.shares_memory(got.data, wire)  # no copy of the tensor
            assert not got.data.flags.writeable  # and no way to change what was received
    assert request.inputs[2].parameters == {"hint": 3}
    assert request.outputs == sent.outputs
    assert (request.model_name, request.model_version, request.id) == ("convnet", "2", "req-1")
    assert request.parameters == sent.parameters


def test_received_requests_decode_as_the_parsed_message_does() -> None:
    """The same request read both ways gives the same arrays; typed contents (no raw
    contents to leave in place) are read by the protobuf parser as before."""
    for request in (
        _three_inputs(),
        InferRequest("fcn", [Tensor("input", "FP32", (1, 2), np.ones((1, 2), np.float32))]),
    ):
        data = request_to_proto(request).SerializeToString()
        from_views = request_from_proto(parse_infer_request(data), None)
        parsed = request_from_proto(pb.ModelInferRequest.FromString(data), None)
        for a, b in zip(from_views.inputs, parsed.inputs, strict=True):
            np.testing.assert_array_equal(a.data, b.data)
    typed = pb.ModelInferRequest(model_name="convnet")
    tensor = typed.inputs.add(name="input", datatype="FP32", shape=[1, 3])
    tensor.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    received = parse_infer_request(typed.SerializeToString())
    assert isinstance(received, ReceivedInferRequest)
    assert len(received.raw) == 0
    np.testing.assert_array_equal(request_from_proto(received, None).inputs[0].data, [[1, 2, 3]])


@pytest.mark.parametrize("cut", [1, 5, 40, 33_000, -3, -1])
def test_truncated_or_garbled_messages_are_refused_as_the_parser_refuses_them(cut: int) -> None:
    data = request_to_proto(_three_inputs()).SerializeToString()
    truncated = data[:cut]
    try:
        pb.ModelInferRequest.FromString(truncated)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(truncated)
    else:
        parse_infer_request(truncated)  # what the parser accepts is accepted here too
    with pytest.raises(DecodeError):
        parse_infer_request(b"\xff" * 40000)  # a varint longer than ten bytes


def test_raw_contents_with_a_refused_shape_are_still_refused() -> None:
    message = request_to_proto(_three_inputs())
    message.inputs[0].shape[0] = 3  # the raw contents hold 2 rows
    with pytest.raises(CodecError, match="needs 57600 bytes of raw data, got 38400"):
        request_from_proto(parse_infer_request(message.SerializeToString()), None)


def test_a_message_of_many_small_fields_goes_to_the_protobuf_parser() -> None:
    """Thousands of top-level fields (parameters here) would cost the Python walk seconds at
    the message limit; past MAX_WALKED_FIELDS the C parser reads the message instead, with
    the same result."""
    request = _three_inputs()
    request.parameters.update({f"p{i}": i for i in range(MAX_WALKED_FIELDS)})
    data = request_to_proto(request).SerializeToString()
    assert len(data) >= VIEW_MIN_BYTES
    assert _raw_spans(data) is None
    received = parse_infer_request(data)
    assert len(received.message.raw_input_contents) == 3  # parsed, not left as views
    decoded = request_from_proto(received, None)
    assert decoded.parameters == request.parameters
    for got, want in zip(decoded.inputs, request.inputs, strict=True):
        np.testing.assert_array_equal(got.data, want.data)
