"""The load generator against a real gRPC echo server and a real HTTP server: counts,
latencies and errors add up."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from cnnserve.bench.loadgen import (
    LoadSpec,
    check_http_request,
    check_request,
    http_request,
    infer_request,
    run_load,
)
from cnnserve.bench.suite import echo_server
from cnnserve.protocol import open_inference_pb2 as pb
from tests.support import free_ports


@pytest.fixture(scope="module")
def echo_target() -> Iterator[str]:
    """The suite's gRPC echo server (its own process), once it answers."""
    with echo_server("uvloop") as target:
        yield target


def test_infer_request_carries_raw_contents() -> None:
    items = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    request = pb.ModelInferRequest.FromString(infer_request("fcn", items, outputs=("mask",)))
    assert request.model_name == "fcn"
    assert list(request.inputs[0].shape) == [2, 3, 4, 4]
    assert request.inputs[0].datatype == "FP32"
    assert np.array_equal(
        np.frombuffer(request.raw_input_contents[0], np.float32).reshape(items.shape), items
    )
    assert [o.name for o in request.outputs] == ["mask"]


def test_echo_returns_the_payload(echo_target: str) -> None:
    items = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    response = check_request(echo_target, infer_request("m", items))
    assert list(response.outputs[0].shape) == [3, 3, 8, 8]
    assert response.raw_output_contents[0] == items.tobytes()


def test_closed_loop_counts(echo_target: str) -> None:
    request = infer_request("m", np.zeros((2, 3, 7, 7), np.float32))
    result = run_load(
        LoadSpec(echo_target, request, 2, duration_s=1.0, warmup_s=0.3, concurrency=3, processes=2)
    )
    assert result.errors == {}
    assert result.succeeded > 10
    assert result.images_per_s == pytest.approx(2 * result.requests_per_s)
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms


def test_open_loop_sends_at_the_rate(echo_target: str) -> None:
    request = infer_request("m", np.zeros((1, 3, 7, 7), np.float32))
    result = run_load(
        LoadSpec(echo_target, request, 1, duration_s=1.0, warmup_s=0.2, rate_rps=50, processes=1)
    )
    # 50 requests/s for one measured second: the schedule fixes the count, not the server.
    assert 45 <= result.requests <= 55
    assert result.errors == {}


def test_errors_are_counted_by_status() -> None:
    request = infer_request("m", np.zeros((1, 3, 7, 7), np.float32))
    (port,) = free_ports(1)
    dead = f"127.0.0.1:{port}"
    result = run_load(
        LoadSpec(
            dead,
            request,
            1,
            duration_s=0.5,
            warmup_s=0.0,
            concurrency=1,
            processes=1,
            timeout_s=0.2,
        )
    )
    assert result.succeeded == 0
    assert set(result.errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert sum(result.errors.values()) >= 1


class _Handler(BaseHTTPRequestHandler):
    """POST /ok echoes the body; /chunked echoes it chunked; /busy answers 503."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the load generator expects

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/busy":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (body[:3], body[3:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def http_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/ok", "/chunked"])
def test_http_request_round_trips(http_target: str, path: str) -> None:
    request = http_request(http_target, path, b"digit-png", {"Authorization": "Bearer k"})
    assert request.startswith(f"POST {path} HTTP/1.1\r\n".encode())
    assert b"\r\nAuthorization: Bearer k\r\n" in request
    assert check_http_request(http_target, request) == (200, b"digit-png")


def test_http_closed_loop_counts(http_target: str) -> None:
    request = http_request(http_target, "/ok", b"x" * 100)
    result = run_load(
        LoadSpec(http_target, request, 1, duration_s=1.0, warmup_s=0.2, concurrency=4,
                 processes=2, transport="http")
    )  # fmt: skip
    assert result.errors == {}
    assert result.succeeded > 10
    assert 0 < result.p50_ms <= result.p99_ms


def test_http_errors_are_counted_by_status(http_target: str) -> None:
    request = http_request(http_target, "/busy", b"x")
    result = run_load(
        LoadSpec(http_target, request, 1, duration_s=0.5, warmup_s=0.0, concurrency=2,
                 processes=1, transport="http")
    )  # fmt: skip
    assert result.succeeded == 0
    assert set(result.errors) == {"HTTP_503"}
    assert result.errors["HTTP_503"] >= 1


def test_http_open_loop_is_refused() -> None:
    with pytest.raises(ValueError, match="closed loops only"):
        run_load(LoadSpec("127.0.0.1:1", b"", 1, rate_rps=10, transport="http"))
