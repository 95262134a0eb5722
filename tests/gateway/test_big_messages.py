"""Big messages at the DEFAULT size limit never freeze the gateway's event loop.

Before, a message of millions of tiny elements was parsed and converted on the event loop,
before its shape was checked against the limits: 8 MiB of zero-length BYTES elements stalled
every other caller (health checks included) for ~1.3 s, and the stall grew with the message.
Now each input's declared shape and element count are checked first, and big messages are
parsed and converted in the decode pool, a chunk at a time. What remains on the loop's side is
the parse of the message itself (one C call holding the GIL: ~12 ms per MiB of tiny elements),
bounded by the default ``max_message_bytes``.

The loop's stalls are measured from inside it: a task asks to wake every 5 ms and records how
late it wakes, while another thread sends the message.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from cnnserve.gateway.grpc_service import INFERENCE_SERVICE
from cnnserve.gateway.server import Gateway
from cnnserve.models.registry import get_spec
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.settings import Settings
from tests.gateway.harness import gateway_settings, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = Settings().max_message_bytes
#: Room for the message's own fields within the limit.
SLACK = 4096
#: The longest stall accepted for a message at the size limit. Before, these messages stalled
#: the loop for 2.8–8.9 s each; now 0.03–0.66 s on a busy 2-core machine, what remains being
#: the parse itself (one C call holding the GIL).
MAX_STALL_S = 1.5
#: The longest stall accepted while a big JSON answer is encoded (before: 1.2 s in one call).
MAX_ENCODE_STALL_S = 0.8
TICK_S = 0.005


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """An onnxruntime gateway at the default limits."""
    async with running_gateway(gateway_settings(model_repository)) as running:
        yield running


async def _longest_stall(send: Callable[[], str]) -> tuple[str, float]:
    """``send()`` in a thread; its answer and the event loop's longest stall meanwhile."""
    loop = asyncio.get_running_loop()
    sending = loop.run_in_executor(None, send)
    longest = 0.0
    while not sending.done():
        asked = time.monotonic()
        await asyncio.sleep(TICK_S)
        longest = max(longest, time.monotonic() - asked - TICK_S)
    return await sending, longest


def _grpc_send(gateway: Gateway, message: pb.ModelInferRequest) -> Callable[[], str]:
    data = message.SerializeToString()  # here, not in the measured thread
    assert len(data) <= LIMIT

    def send() -> str:
        with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
            infer = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer")
            try:
                infer(data, timeout=60)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()}"
        return "OK"

    return send


def _bytes_raw() -> pb.ModelInferRequest:
    count = (LIMIT - SLACK) // 4
    message = pb.ModelInferRequest(model_name="convnet")
    message.inputs.add(name="image", datatype="BYTES", shape=[count])
    message.raw_input_contents.append(struct.pack("<I", 0) * count)
    return message


def _bytes_typed() -> pb.ModelInferRequest:
    count = (LIMIT - SLACK) // 2
    message = pb.ModelInferRequest(model_name="convnet")
    tensor = message.inputs.add(name="image", datatype="BYTES", shape=[count, 1])
    tensor.contents.bytes_contents.extend([b""] * count)
    return message


def _uint_typed(shape: list[int] | None = None) -> pb.ModelInferRequest:
    count = LIMIT - SLACK  # a zero is one byte of packed varint
    message = pb.ModelInferRequest(model_name="convnet")
    tensor = message.inputs.add(name="pixels", datatype="UINT8", shape=shape or [count, 1, 1, 1])
    tensor.contents.uint_contents.extend(bytes(count))
    return message


@pytest.mark.parametrize(
    ("message", "answer"),
    [
        (
            _bytes_raw,
            "INVALID_ARGUMENT: tensor 'image' declares 5241856 BYTES elements [5241856]; a "
            "request may carry at most 65536",
        ),
        (
            _bytes_typed,
            "INVALID_ARGUMENT: tensor 'image' declares 10483712 BYTES elements [10483712, 1]",
        ),
        (
            _uint_typed,
            "INVALID_ARGUMENT: tensor 'pixels' declares 20967424 UINT8 elements "
            "[20967424, 1, 1, 1]; a request may carry at most 11184810",
        ),
        (
            lambda: _uint_typed([1, 3, 28, 28]),
            "INVALID_ARGUMENT: tensor 'pixels': UINT8 [1, 3, 28, 28] needs 2352 elements, "
            "got 20967424",
        ),
    ],
    ids=["raw-zero-length-bytes", "typed-zero-length-bytes", "typed-uint-elements", "typed-count"],
)
async def test_a_grpc_message_of_millions_of_elements_does_not_stall_the_loop(
    gateway: Gateway, message: Callable[[], pb.ModelInferRequest], answer: str
) -> None:
    got, stall = await _longest_stall(_grpc_send(gateway, message()))
    assert got.startswith(answer), got
    assert stall < MAX_STALL_S, f"event loop stalled {stall:.2f} s"


async def test_a_valid_typed_request_is_converted_off_the_loop(gateway: Gateway) -> None:
    # 256 ConvNet items as typed UINT8 values: 602,112 elements, all converted.
    message = pb.ModelInferRequest(model_name="convnet")
    tensor = message.inputs.add(name="pixels", datatype="UINT8", shape=[256, 3, 28, 28])
    tensor.contents.uint_contents.extend([200] * (256 * 3 * 28 * 28))
    got, stall = await _longest_stall(_grpc_send(gateway, message))
    assert got == "OK"
    assert stall < MAX_STALL_S, f"event loop stalled {stall:.2f} s"


async def test_a_big_json_body_does_not_stall_the_loop(gateway: Gateway) -> None:
    count = (LIMIT - SLACK) // 2  # "0," per element
    document = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [count]}]}
    body = json.dumps(document).encode()[:-3] + b', "data": [' + b"0," * (count - 1) + b"0]}]}"
    assert len(body) <= LIMIT

    def send() -> str:
        url = f"http://127.0.0.1:{gateway.http_port}/v2/models/convnet/infer"
        reply = httpx.post(url, content=body, timeout=60)
        return f"{reply.status_code}: {reply.json()['error']}"

    got, stall = await _longest_stall(send)
    assert got.startswith("400: convnet expects UINT8 [N,3,28,28] for input 'pixels'"), got
    assert stall < MAX_STALL_S, f"event loop stalled {stall:.2f} s"


async def test_a_big_json_answer_is_encoded_off_the_loop(gateway: Gateway) -> None:
    # FCN scores for one 512×512 image as JSON: a million floats or more, ~1 s of json.dumps
    # in one call.
    document = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": [1, 3, 512, 512],
                "data": [9] * 786_432,
            }
        ],
        "outputs": [{"name": "scores"}],
    }
    body = json.dumps(document).encode()

    def send() -> str:
        url = f"http://127.0.0.1:{gateway.http_port}/v2/models/fcn/infer"
        reply = httpx.post(url, content=body, timeout=120)
        (output,) = reply.json()["outputs"]
        return f"{reply.status_code}: {len(output['data'])}"

    got, stall = await _longest_stall(send)
    assert got == f"200: {get_spec('fcn').num_classes * 512 * 512}", got
    assert stall < MAX_ENCODE_STALL_S, f"event loop stalled {stall:.2f} s"
