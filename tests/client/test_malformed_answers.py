"""A server whose answer breaks the Open Inference Protocol is the server's fault: the client
raises :class:`MalformedResponseError`, never an "invalid input" error aimed at the caller.

Each transport gets a tiny stand-in server on 127.0.0.1 whose inference answer declares an
INT64 ``[1,1]`` output (8 bytes) but carries only 4 bytes of it; over HTTP, also answers
that are not JSON or not shaped like an inference response.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
import pytest_asyncio

from cnnserve.client.inference import MalformedResponseError, ServerError, connect
from cnnserve.errors import InvalidInputError
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.errors import CodecError
from cnnserve.protocol.http_codec import HEADER_LENGTH

pytestmark = pytest.mark.asyncio(loop_scope="module")

PIXELS = np.zeros((1, 3, 28, 28), dtype=np.uint8)
#: The output the stand-ins declare: INT64 [1,1] needs 8 bytes; they send 4.
OUTPUT = {"name": "labels", "datatype": "INT64", "shape": [1, 1]}
SHORT = b"\x07\x00\x00\x00"


class ShortAnswers(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """ModelInfer answers OK with raw output contents shorter than the output's shape."""

    async def ModelInfer(  # noqa: N802 (the gRPC method's name)
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(**OUTPUT)
        response.raw_output_contents.append(SHORT)
        return response


@pytest_asyncio.fixture(loop_scope="module")
async def grpc_port() -> AsyncIterator[int]:
    """A gRPC OIP stand-in on a free loopback port."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(ShortAnswers(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(grace=None)


def short_binary_answer() -> tuple[bytes, int | None]:
    """A binary-extension answer whose output carries 4 of its 8 bytes."""
    output = {**OUTPUT, "parameters": {"binary_data_size": len(SHORT)}}
    header = json.dumps({"model_name": "convnet", "outputs": [output]}).encode()
    return header + SHORT, len(header)


#: HTTP answers (body, Inference-Header-Content-Length) that break the protocol, and a
#: fragment of what the client says about each.
HTTP_ANSWERS = {
    "short binary output": (short_binary_answer(), "labels"),
    "short JSON output": (
        (json.dumps({"outputs": [{**OUTPUT, "data": []}]}).encode(), None),
        "labels",
    ),
    "not JSON": ((b"<html>502 Bad Gateway</html>", None), "not valid JSON"),
    "not an object": ((b"[1, 2]", None), "must be a JSON object"),
    "outputs not a list": ((b'{"outputs": {"labels": [7]}}', None), "outputs must be a list"),
    "header past the body": ((b"{}", 99), "body has 2 bytes"),
}


class AnswerServer(ThreadingHTTPServer):
    """Answers every ``POST`` with :attr:`answer`, status 200."""

    answer: tuple[bytes, int | None] = (b"", None)


class AnswerHandler(BaseHTTPRequestHandler):
    server: AnswerServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body, header_length = self.server.answer
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if header_length is not None:
            self.send_header(HEADER_LENGTH, str(header_length))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def http_server() -> Iterator[AnswerServer]:
    """An HTTP OIP stand-in on a free loopback port, served from a thread."""
    server = AnswerServer(("127.0.0.1", 0), AnswerHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _infer_expecting_malformed(port: int, http: bool) -> MalformedResponseError:
    with (
        connect("127.0.0.1", port, http=http) as client,
        pytest.raises(MalformedResponseError, match="malformed") as caught,
    ):
        client.infer("convnet", {"pixels": PIXELS}, timeout_s=30)
    error = caught.value
    # The server's fault, not the caller's: neither "invalid input" nor a server status.
    assert not isinstance(error, InvalidInputError | ServerError | ValueError)
    assert isinstance(error.__cause__, CodecError)
    return error


async def test_a_malformed_grpc_answer_is_a_malformed_response(grpc_port: int) -> None:
    error = await asyncio.to_thread(_infer_expecting_malformed, grpc_port, False)
    assert "labels" in str(error)


@pytest.mark.parametrize("answer", list(HTTP_ANSWERS))
async def test_a_malformed_http_answer_is_a_malformed_response(
    http_server: AnswerServer, answer: str
) -> None:
    http_server.answer, said = HTTP_ANSWERS[answer]
    port = int(http_server.server_address[1])
    error = await asyncio.to_thread(_infer_expecting_malformed, port, True)
    assert said in str(error)
