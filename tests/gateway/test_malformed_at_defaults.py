"""Malformed requests that used to escape the error table as 500/INTERNAL, sent to a real
gateway at its DEFAULT limits (lowered limits refuse big bodies early and hid these).

Each must be answered with the error table's row for bad input and a message the caller can
act on, and must leave the gateway serving.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio

from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from tests.gateway.harness import digit_pixels, gateway_settings, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

INFER = "/v2/models/convnet/infer"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """An onnxruntime gateway with every limit at its default (only ports and device set)."""
    settings = gateway_settings(model_repository)
    defaults = Settings()
    assert settings.max_message_bytes == defaults.max_message_bytes
    assert settings.max_items_per_request == defaults.max_items_per_request
    async with running_gateway(settings) as running:
        yield running


def _pixels_body(**parameters: object) -> dict[str, object]:
    pixels, _ = digit_pixels([0])
    return {
        "parameters": parameters,
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "data": pixels.reshape(-1).tolist(),
            }
        ],
    }


def _refusal(reply: httpx.Response) -> str:
    assert reply.status_code == 400, (reply.status_code, reply.text)
    return str(reply.json()["error"])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "request body is not accepted: JSON nested too deeply"),
        (b'{"id": ' + b"7" * 4301 + b"}", "request body is not valid JSON: Exceeds the limit"),
    ],
    ids=["nested-100000-deep", "integer-of-4301-digits"],
)
async def test_json_python_cannot_parse_is_400(
    http: httpx.AsyncClient, body: bytes, message: str
) -> None:
    assert _refusal(await http.post(INFER, content=body)).startswith(message)
    # The repository API reads JSON bodies too.
    reply = await http.post("/v2/repository/index", content=body)
    assert "repository index body" in _refusal(reply)


@pytest.mark.parametrize(
    "value",
    # Byte 0xB2 reads as "²" in latin-1 (how headers are decoded): "²".isdigit() is True but
    # int("²") raises; int() refuses more than 4,300 digits.
    ["²".encode("latin-1"), b"1" * 5000],
    ids=["superscript-two", "5000-digits"],
)
async def test_a_header_length_int_cannot_read_is_400(
    http: httpx.AsyncClient, value: bytes
) -> None:
    body = json.dumps(_pixels_body()).encode()
    reply = await http.post(INFER, content=body, headers={"Inference-Header-Content-Length": value})
    assert _refusal(reply).startswith("Inference-Header-Content-Length must be a byte count, got")


async def test_a_content_length_of_non_ascii_digits_is_refused(gateway: Gateway) -> None:
    # httpx will not send it; a raw socket does. The HTTP parser or the route refuses it:
    # either way a 4xx, never a 500.
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
    request = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: ²\r\n\r\n{{}}"
    writer.write(request.encode("latin-1"))
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1].startswith(b"4"), status_line


@pytest.mark.parametrize("timeout", [10**400, 2**64, -1, 1.5])
async def test_a_timeout_out_of_range_is_400(http: httpx.AsyncClient, timeout: object) -> None:
    body = json.dumps(_pixels_body(timeout=timeout)).encode()
    message = _refusal(await http.post(INFER, content=body))
    assert message.startswith(
        "parameter 'timeout' must be an integer of microseconds from 0 to 18446744073709551615"
    )


async def test_the_largest_uint64_timeout_is_accepted(
    http: httpx.AsyncClient, gateway: Gateway
) -> None:
    body = json.dumps(_pixels_body(timeout=2**64 - 1)).encode()
    reply = await http.post(INFER, content=body)
    assert reply.status_code == 200, reply.text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        pixels, _ = digit_pixels([0])
        request = pb.ModelInferRequest(model_name="convnet")
        request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
        request.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
        request.parameters["timeout"].uint64_param = 2**64 - 1
        answer = await stub.ModelInfer(request, timeout=30)
    assert answer.outputs


@pytest.mark.parametrize(
    "route",
    ["ready", "stats", "config", ""],
    ids=["ready", "stats", "config", "metadata"],
)
async def test_a_version_of_5000_digits_is_not_found(http: httpx.AsyncClient, route: str) -> None:
    # int() refuses more than 4,300 digits: the version lookup raised ValueError (500).
    path = f"/v2/models/convnet/versions/1{'0' * 4999}" + (f"/{route}" if route else "")
    reply = await http.get(path)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"].startswith("model convnet has no version '1000")


async def test_a_top_k_of_5000_digits_is_400(http: httpx.AsyncClient) -> None:
    reply = await http.post("/predict/convnet", params={"top_k": "1" * 5000}, content=b"x")
    assert _refusal(reply).startswith("top_k must be an integer ≥ 1")
