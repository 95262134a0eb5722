"""How long big request messages freeze a real gateway's event loop.

Starts ``cnnserve serve --backend onnxruntime`` at its default limits, then for each message
below: polls ``GET /v2/health/live`` back to back from one thread while another sends the
message, and reports the slowest health answer during the send (the event loop's longest
stall, plus one round trip), the gateway's CPU seconds and peak RSS growth, and the answer.

    .venv/bin/python tools/loop_block.py [--repository DIR] [--log FILE]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import psutil

from cnnserve.bench.gateway_process import GatewayProcess, demo_repository, start_gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc

MIB = 1 << 20


def _zero_length_bytes_raw(size: int) -> pb.ModelInferRequest:
    count = size // 4
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(struct.pack("<I", 0) * count)
    return request


def _zero_length_bytes_typed(size: int) -> pb.ModelInferRequest:
    count = size // 2  # tag and length byte each
    request = pb.ModelInferRequest(model_name="convnet")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[count])
    tensor.contents.bytes_contents.extend([b""] * count)
    return request


def _uint_contents(size: int, shape: list[int] | None = None) -> pb.ModelInferRequest:
    count = size  # a zero is one byte of packed varint
    request = pb.ModelInferRequest(model_name="fcn")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=shape or [count])
    tensor.contents.uint_contents.extend([0] * count)
    return request


#: A valid FCN input: one 512×512 image's pixels, 768 Ki elements.
FCN_PIXELS = [1, 3, 512, 512]


def _fcn_pixels_typed() -> pb.ModelInferRequest:
    return _uint_contents(3 * 512 * 512, FCN_PIXELS)


def _fcn_pixels_json(outputs: list[str] | None = None) -> bytes:
    body: dict[str, object] = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "UINT8",
                "shape": FCN_PIXELS,
                "data": [7] * (3 * 512 * 512),
            }
        ]
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return json.dumps(body).encode()


def _grpc_sender(gateway: GatewayProcess, request: pb.ModelInferRequest) -> Callable[[], str]:
    options = [("grpc.max_send_message_length", 1 << 30)]

    def send() -> str:
        with grpc.insecure_channel(gateway.grpc_target, options=options) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.ModelInfer(request, timeout=120)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {(exc.details() or '')[:90]}"
            return "OK"

    return send


def _http_sender(gateway: GatewayProcess, body: bytes, model: str) -> Callable[[], str]:
    def send() -> str:
        reply = httpx.post(
            f"http://127.0.0.1:{gateway.http_port}/v2/models/{model}/infer",
            content=body,
            timeout=120,
        )
        text = "" if reply.status_code == 200 else f": {reply.text[:90]}"
        return f"HTTP {reply.status_code}{text}"

    return send


def measure(gateway: GatewayProcess, send: Callable[[], str]) -> dict[str, object]:
    """The slowest health answer while ``send`` runs, the gateway's CPU and RSS growth."""
    process = psutil.Process(gateway.process.pid)
    cpu_before = sum(process.cpu_times()[:2])
    rss_before = process.memory_info().rss
    peak = rss_before
    result: list[str] = []
    sender = threading.Thread(target=lambda: result.append(send()))
    slowest = 0.0
    url = f"http://127.0.0.1:{gateway.http_port}/v2/health/live"
    with httpx.Client(timeout=60) as client:
        client.get(url)
        started = time.monotonic()
        sender.start()
        while sender.is_alive():
            asked = time.monotonic()
            client.get(url)
            slowest = max(slowest, time.monotonic() - asked)
            peak = max(peak, process.memory_info().rss)
        sender.join()
    return {
        "answer": result[0],
        "seconds": round(time.monotonic() - started, 2),
        "slowest_health_s": round(slowest, 3),
        "gateway_cpu_s": round(sum(process.cpu_times()[:2]) - cpu_before, 2),
        "rss_growth_mib": round((peak - rss_before) / MIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--only", default="", help="run the cases whose name holds this text")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loop_block-"))
    repository = args.repository or demo_repository(work)
    log = args.log or work / "gateway.log"
    env = {"CNNSERVE_MODEL_REPOSITORY": str(repository), "CNNSERVE_DEVICE": "cpu"}
    gateway = start_gateway("onnxruntime", env, log)
    try:
        cases: dict[str, Callable[[], str]] = {
            "gRPC raw BYTES, 8 MiB of zero-length elements": _grpc_sender(
                gateway, _zero_length_bytes_raw(8 * MIB)
            ),
            "gRPC typed bytes_contents, 8 MiB of zero-length elements": _grpc_sender(
                gateway, _zero_length_bytes_typed(8 * MIB)
            ),
            "gRPC typed uint_contents, 8 MiB (shape [8388608])": _grpc_sender(
                gateway, _uint_contents(8 * MIB)
            ),
            "gRPC typed uint_contents, 60 MiB (shape [62914560])": _grpc_sender(
                gateway, _uint_contents(60 * MIB)
            ),
            "gRPC typed uint_contents, valid FCN pixels [1,3,512,512]": _grpc_sender(
                gateway, _fcn_pixels_typed()
            ),
            "HTTP JSON data, valid FCN pixels [1,3,512,512] (1.5 MiB)": _http_sender(
                gateway, _fcn_pixels_json(), "fcn"
            ),
            "HTTP JSON answer, FCN scores of one 512×512 image": _http_sender(
                gateway, _fcn_pixels_json(["scores"]), "fcn"
            ),
        }
        for name, send in cases.items():
            if args.only not in name:
                continue
            print(json.dumps({"case": name, **measure(gateway, send)}), flush=True)
    finally:
        gateway.stop()


if __name__ == "__main__":
    main()
