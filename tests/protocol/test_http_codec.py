"""REST bodies ↔ domain: JSON tensors, Triton's binary extension, and refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from cnnserve.protocol.domain import InferRequest, InferResponse, RequestedOutput, Tensor
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.http_codec import (
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def test_json_request() -> None:
    body = _json(
        {
            "id": "42",
            "parameters": {"timeout": 1000, "binary_data_output": True},
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 2], "data": [[3, 4]]},
            ],
            "outputs": [{"name": "labels", "parameters": {"top_k": 2, "binary_data": False}}],
        }
    )
    decoded = decode_infer_request(body, None, "convnet", "1")
    request = decoded.request
    assert (request.model_name, request.model_version, request.id) == ("convnet", "1", "42")
    # The binary extension's own parameters stay in the transport.
    assert request.parameters == {"timeout": 1000}
    assert request.outputs == [RequestedOutput("labels", {"top_k": 2})]
    assert request.inputs[0].data.tolist() == [[3, 4]]
    assert decoded.wants_binary("labels") is False
    assert decoded.wants_binary("probabilities") is True


def test_binary_inputs_follow_the_header_in_input_order() -> None:
    first = np.arange(6, dtype=np.float32)
    second = struct.pack("<I", 3) + b"png"
    header = _json(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [2, 3],
                    "parameters": {"binary_data_size": first.nbytes},
                },
                {"name": "j", "datatype": "INT64", "shape": [1], "data": [5]},
                {
                    "name": "b",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(second)},
                },
            ]
        }
    )
    decoded = decode_infer_request(header + first.tobytes() + second, len(header), "m", "")
    a, j, b = decoded.request.inputs
    np.testing.assert_array_equal(a.data, first.reshape(2, 3))
    assert a.parameters == {}
    assert j.data.tolist() == [5]
    assert b.data.tolist() == [b"png"]


def _refusal(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(CodecError) as caught:
        decode_infer_request(body, header_length, "m", "")
    return str(caught.value)


def _one_input(**fields: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], **fields}]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "request body must be a JSON object, got []"),
        ({"inputs": {}}, "inputs must be a list"),
        ({"inputs": [{"datatype": "FP32", "shape": [1]}]}, "inputs[0].name must be a string"),
        (_one_input(), "input 'x' has neither data nor binary_data_size"),
        (_one_input(data=[1, 2], parameters={"binary_data_size": 8}), "both data and"),
        (_one_input(parameters={"binary_data_size": 8}), "declares 8 bytes of binary data"),
        (_one_input(data=[1, 2], parameters={"p": [1]}), "parameter 'p' must be a scalar"),
        ({**_one_input(data=[1, 2]), "id": 7}, "id must be a string"),
        ({**_one_input(data=[1, 2]), "outputs": [{"parameters": {}}]}, "outputs[0].name"),
        (_one_input(data=[1, 2, 3]), "FP32 [2] needs 2 elements, got 3"),
    ],
)
def test_json_refusals(document: object, message: str) -> None:
    assert message in _refusal(_json(document))


def test_refuses_invalid_json() -> None:
    assert "request body is not valid JSON" in _refusal(b"{nope")


def test_refuses_header_length_past_the_body() -> None:
    assert "Inference-Header-Content-Length is 99 but the body has 2 bytes" in _refusal(b"{}", 99)


def test_refuses_bytes_no_input_claims() -> None:
    header = _json(_one_input(data=[1, 2]))
    assert "3 bytes after the JSON header belong to no input" in _refusal(
        header + b"abc", len(header)
    )


def _response() -> InferResponse:
    labels = np.empty((1, 1), dtype=object)
    labels[0, 0] = b"7"
    return InferResponse(
        model_name="convnet",
        model_version="1",
        id="r",
        outputs=[
            Tensor("labels", "BYTES", (1, 1), labels),
            Tensor("logits", "FP32", (1, 2), np.array([[0.5, -1.0]], dtype=np.float32)),
        ],
    )


def test_json_response() -> None:
    decoded = decode_infer_request(_json({"inputs": []}), None, "convnet", "")
    body, header_length = encode_infer_response(_response(), decoded)
    assert header_length is None
    assert json.loads(body) == {
        "model_name": "convnet",
        "model_version": "1",
        "id": "r",
        "outputs": [
            {"name": "labels", "datatype": "BYTES", "shape": [1, 1], "data": ["7"]},
            {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [0.5, -1.0]},
        ],
    }


def test_binary_response_only_for_outputs_that_ask() -> None:
    request = {"inputs": [], "outputs": [{"name": "labels"}, {"name": "logits"}]}
    request["outputs"][1]["parameters"] = {"binary_data": True}  # type: ignore[index]
    decoded = decode_infer_request(_json(request), None, "convnet", "")
    body, header_length = encode_infer_response(_response(), decoded)
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert header["outputs"][0]["data"] == ["7"]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert body[header_length:] == np.array([0.5, -1.0], dtype=np.float32).tobytes()


def test_client_encoding_round_trips_through_the_server_decoding() -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(1, 3, 2, 4)
    request = InferRequest(
        "convnet",
        [Tensor("pixels", "UINT8", pixels.shape, pixels)],
        [RequestedOutput("labels", {"top_k": 2})],
        id="c",
        parameters={"timeout": 9},
    )
    body, header_length = encode_infer_request(request)
    decoded = decode_infer_request(body, header_length, "convnet", "")
    assert decoded.request.outputs == request.outputs
    assert decoded.request.parameters == {"timeout": 9}
    np.testing.assert_array_equal(decoded.request.inputs[0].data, pixels)
    assert decoded.wants_binary("labels")
    reply, reply_length = encode_infer_response(_response(), decoded)
    response = decode_infer_response(reply, reply_length)
    assert response.outputs[0].data.tolist() == [[b"7"]]
    assert response.outputs[1].data.tolist() == [[0.5, -1.0]]
