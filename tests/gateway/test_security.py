"""What the gateway never gives away: files outside its model store, and secrets in its logs.

- Model names are looked up in the registry, never joined into a path: ``../`` names, absolute
  paths and encoded traversals are NOT_FOUND / 404 on both transports.
- Neither the API key (accepted or presented) nor TorchServe's keys appear in any log line,
  at start, on authenticated and refused calls, and on calls TorchServe answers — in a real
  ``cnnserve serve`` process and, at DEBUG level, in process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import grpc
import pytest
from pydantic import SecretStr

from cnnserve.client.inference import ServerError, connect
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from tests.conftest import RunningTorchServe
from tests.gateway.harness import gateway_settings, raw_http, running_gateway
from tests.images import digit_png
from tests.support import gateway_process

API_KEY = "gw-key-5b0c2e9d71aa"
WRONG_KEY = "gw-wrong-0d7f3c1e9b44"

#: A valid ConvNet request: whatever is refused, is refused for its model name.
VALID_BODY = json.dumps(
    {
        "inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 28, 28], "data": [0] * 2352}
        ]
    }
).encode()
TRAVERSALS = [
    "../convnet",
    "../../etc/passwd",
    "/etc/passwd",
    "convnet/../fcn",
    "..%2Fconvnet",
    "%2e%2e%2fconvnet",
    "convnet.onnx",
    "convnet\x00",
]


@pytest.mark.asyncio(loop_scope="module")
async def test_model_names_never_reach_the_file_system(model_repository: Path) -> None:
    """Every traversal attempt is an unknown model, on gRPC and HTTP (metadata, ready, infer)."""
    async with (
        running_gateway(gateway_settings(model_repository)) as gateway,
        grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name in TRAVERSALS:
            for call in (
                stub.ModelMetadata(pb.ModelMetadataRequest(name=name)),
                stub.ModelReady(pb.ModelReadyRequest(name=name)),
                stub.ModelInfer(pb.ModelInferRequest(model_name=name)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND, name
                assert "served models are: convnet, fcn" in (refused.value.details() or "")
            # Raw paths, byte for byte as a hostile client sends them (httpx would
            # normalise the dot segments away).
            quoted = name.replace("\x00", "%00")
            for method, path in (
                ("GET", f"/v2/models/{quoted}"),
                ("POST", f"/v2/models/{quoted}/infer"),
                ("POST", f"/predict/{quoted}"),
            ):
                status, body = await raw_http(gateway.http_port, method, path, VALID_BODY)
                assert status == 404, (name, path, body)
                assert "root:" not in body


# --- no secrets in logs ---


def _secrets(torchserve: RunningTorchServe, file_key: str) -> dict[str, str]:
    """Every secret the gateway holds or is shown, by name."""
    management = torchserve.server.key("management")
    assert management is not None
    return {
        "api key": API_KEY,
        "api key from the file": file_key,
        "presented wrong key": WRONG_KEY,
        "TorchServe inference key": torchserve.inference_key,
        "TorchServe management key": management,
    }


def _calls(grpc_port: int, http_port: int) -> None:
    """Authenticated calls TorchServe answers, and refused ones, on both transports."""
    png, label = digit_png(9)
    for http, port in ((False, grpc_port), (True, http_port)):
        with connect("127.0.0.1", port, http=http, api_key=API_KEY) as client:
            assert client.classify([png])[0].label == str(label)
        with (
            connect("127.0.0.1", port, http=http, api_key=WRONG_KEY) as client,
            pytest.raises(ServerError, match="API key not accepted"),
        ):
            client.classify([png])


@pytest.mark.torchserve
def test_no_secret_in_the_log_of_a_real_process(
    torchserve: RunningTorchServe, model_repository: Path, tmp_path: Path
) -> None:
    """``cnnserve serve --backend torchserve`` with keys from the environment and a file:
    start, calls and shutdown print no key."""
    keys_file = tmp_path / "api_keys"
    file_key = "gw-file-key-8e21f4a0c3"
    keys_file.write_text(f"{file_key}\n")
    s = torchserve.settings
    with gateway_process(
        "torchserve",
        tmp_path / "gateway.log",
        model_repository=model_repository,
        model_store_dir=torchserve.model_store,
        torchserve_host=s.torchserve_host,
        torchserve_grpc_inference_port=s.torchserve_grpc_inference_port,
        torchserve_key_file=s.torchserve_key_file,
        api_key=API_KEY,
        api_keys_file=keys_file,
    ) as gateway:
        _calls(gateway.grpc_port, gateway.http_port)
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(60) == 0
    output = gateway.output()
    assert "API-key authentication on: 2 accepted key(s)" in output
    assert "gateway stopped" in output
    # TorchServe's own logs (server, access, model) after it served those calls.
    logs = {p.name: p.read_text() for p in (torchserve.server.run_dir / "logs").glob("*.log")}
    assert logs
    for name, secret in _secrets(torchserve, file_key).items():
        assert secret not in output, f"the {name} is in the gateway's log"
        for log_name, text in logs.items():
            assert secret not in text, f"the {name} is in TorchServe's {log_name}"


@pytest.mark.torchserve
@pytest.mark.asyncio(loop_scope="module")
async def test_no_secret_in_debug_logs(
    torchserve: RunningTorchServe,
    model_repository: Path,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Every logger at DEBUG (grpc, httpx, uvicorn, cnnserve) over the same calls."""
    caplog.set_level(logging.DEBUG)
    settings = torchserve.gateway_settings(model_repository, api_key=SecretStr(API_KEY))
    async with running_gateway(settings) as gateway:
        await asyncio.to_thread(_calls, gateway.grpc_port, gateway.http_port)
    # A gateway holding a key TorchServe refuses: the refusal is logged, the key is not.
    stale = "ts-stale-key-4c1d"
    stale_file = tmp_path / "key_file.json"
    stale_file.write_text(json.dumps({"inference": {"key": stale}}))
    refused_settings = settings.model_copy(update={"torchserve_key_file": stale_file})
    async with running_gateway(refused_settings) as gateway:
        with (
            connect("127.0.0.1", gateway.grpc_port, api_key=API_KEY) as client,
            pytest.raises(ServerError, match="refused the inference key"),
        ):
            await asyncio.to_thread(client.classify, [digit_png(0)[0]])
    assert "API-key authentication on" in caplog.text
    assert len(caplog.records) > 20  # DEBUG really was on
    for name, secret in {**_secrets(torchserve, API_KEY), "refused key": stale}.items():
        assert secret not in caplog.text, f"the {name} is in a log record"
