"""API-key authentication on real gRPC and HTTP listeners, and with the standard tritonclient.

Every call but health needs ``authorization: Bearer <key>`` with an accepted key; a missing or
wrong key is UNAUTHENTICATED / 401 with a message saying what to send; metrics stay open, and
so do the pages a browser loads (the web page, /docs, the OpenAPI document).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from cnnserve.errors import UnauthenticatedError
from cnnserve.gateway.auth import MISSING_KEY, WRONG_KEY, ApiKeys, read_keys_file
from cnnserve.gateway.grpc_service import INFERENCE_SERVICE
from cnnserve.gateway.server import Gateway
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from tests.gateway.harness import digit_pixels, gateway_settings, raw_http, running_gateway
from tests.images import digit_png

#: The gateway fixture lives on the module's event loop; its tests run there too.
module_loop = pytest.mark.asyncio(loop_scope="module")

KEY = "k-primary-3f9a61c2"
ROTATED_KEY = "k-rotated-77d0e5b4"


# --- the check itself ---


def test_check_accepts_only_a_bearer_with_an_accepted_key() -> None:
    keys = ApiKeys([KEY, ROTATED_KEY])
    keys.check(f"Bearer {KEY}")
    keys.check(f"bearer {ROTATED_KEY}")  # the scheme is case-insensitive (RFC 7235)
    for header, message in [
        (None, MISSING_KEY),
        ("", MISSING_KEY),
        (KEY, MISSING_KEY),  # no scheme
        (f"Basic {KEY}", MISSING_KEY),
        ("Bearer ", MISSING_KEY),
        (f"Bearer {KEY}x", WRONG_KEY),
        (f"Bearer {KEY[:-1]}", WRONG_KEY),
    ]:
        with pytest.raises(UnauthenticatedError) as refused:
            keys.check(header)
        assert str(refused.value) == message
        assert KEY not in str(refused.value)


def test_keys_come_from_the_setting_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# rotated in on Monday\n{ROTATED_KEY}\n\n  other-key  \n")
    assert read_keys_file(keys_file) == [ROTATED_KEY, "other-key"]
    keys = ApiKeys.from_settings(Settings(api_key=SecretStr(KEY), api_keys_file=keys_file))
    assert keys is not None and len(keys) == 3
    assert KEY not in repr(keys) and ROTATED_KEY not in repr(keys)
    assert ApiKeys.from_settings(Settings()) is None
    keys_file.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_settings(Settings(api_keys_file=keys_file))


# --- a real gateway with keys ---


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    keys_file = tmp_path_factory.mktemp("auth") / "api_keys"
    keys_file.write_text(f"{ROTATED_KEY}\n")
    settings = gateway_settings(model_repository, api_key=KEY, api_keys_file=keys_file)
    async with running_gateway(settings) as running:
        yield running


def _pixels_request() -> pb.ModelInferRequest:
    pixels, _ = digit_pixels([0])
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="labels")
    return request


def _auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@module_loop
async def test_grpc_inference_needs_an_accepted_key(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for metadata, message in [(None, MISSING_KEY), (_auth("guess"), WRONG_KEY)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(_pixels_request(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == message
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="convnet"), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A stream is refused as a whole, before any request on it runs.
        stream = stub.ModelStreamInfer(iter([_pixels_request()]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in (KEY, ROTATED_KEY):  # the setting's key and the file's
            reply = await stub.ModelInfer(_pixels_request(), metadata=_auth(key))
            assert list(reply.outputs[0].shape) == [1, 1]


@module_loop
async def test_a_call_without_a_key_is_refused_before_its_message_is_read(gateway: Gateway) -> None:
    # Bytes that are no ModelInferRequest: parsed first, the call would end as a malformed
    # message; refused first, the caller learns only that it needs a key. The same for a
    # message of the full size limit, which is never received.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        infer = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer")  # bytes in and out
        limit = gateway.settings.max_message_bytes
        for message in (b"\xff" * 1000, b"\xff" * (limit - 64)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await infer(message, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == MISSING_KEY
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await infer(b"\xff" * 1000, metadata=_auth(KEY), timeout=30)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@module_loop
async def test_grpc_health_stays_open(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Per-model readiness says which models exist: it is not a probe, so it needs a key;
        # so does reflection (grpcurl sends it with -H).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ModelReady(pb.ModelReadyRequest(name="convnet"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in reflection.ServerReflectionInfo(iter([listing])):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = reflection.ServerReflectionInfo(iter([listing]), metadata=_auth(KEY))
        services = [s.name async for a in answers for s in a.list_services_response.service]
        assert "inference.GRPCInferenceService" in services


@module_loop
async def test_http_inference_needs_an_accepted_key(gateway: Gateway) -> None:
    png, label = digit_png(3)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
        for headers, message in [
            ({}, MISSING_KEY),
            ({"authorization": "Bearer guess"}, WRONG_KEY),
            ({"authorization": f"Token {KEY}"}, MISSING_KEY),
        ]:
            reply = await http.post("/predict/convnet", content=png, headers=headers)
            assert reply.status_code == 401
            assert reply.json() == {"error": message}
            assert reply.headers["www-authenticate"].startswith("Bearer")
            assert (await http.get("/v2/models/convnet", headers=headers)).status_code == 401
        reply = await http.post(
            "/predict/convnet", content=png, headers={"authorization": f"Bearer {KEY}"}
        )
        assert reply.status_code == 200
        assert reply.json()["predictions"][0]["label"] == str(label)


@module_loop
async def test_http_health_and_metrics_stay_open(gateway: Gateway) -> None:
    async with httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{gateway.http_port}"
        assert (await http.get(f"{base}/v2/health/live")).json() == {"live": True}
        assert (await http.get(f"{base}/v2/health/ready")).json() == {"ready": True}
        metrics = await http.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
        assert metrics.status_code == 200
        assert "cnnserve_requests_total" in metrics.text


@module_loop
async def test_the_pages_stay_open_and_the_routes_they_call_do_not(gateway: Gateway) -> None:
    """The web page, /docs and the OpenAPI document hold no data and run no inference: a
    browser loads them without a key. Every route they call still needs it, and no dot
    segment walks from an open path into one."""
    png, _ = digit_png(3)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
        for path in (
            "/",
            "/ui/page.js",
            "/docs",
            "/docs/swagger-ui-bundle.js",
            "/docs/swagger-initializer.js",
            "/openapi.json",
        ):
            assert (await http.get(path)).status_code == 200, path
        for path in ("/ui/no-such-file.js", "/docs/no-such-file.js"):
            assert (await http.get(path)).status_code == 404, path  # open, but nothing there
        for method, path in (
            ("POST", "/predict/convnet"),
            ("POST", "/predict/convnet/features?layer=conv1"),
            ("POST", "/v2/repository/index"),
            ("GET", "/v2/models/convnet"),
            ("GET", "/demo/scene.png?seed=1"),
        ):
            reply = await http.request(method, path, content=png)
            assert reply.status_code == 401, path
            assert reply.json() == {"error": MISSING_KEY}
    for path in (
        "/ui/../predict/convnet",
        "/docs/../predict/convnet",
        "/docs/%2e%2e/predict/convnet",
        "/ui/..%2fpredict%2fconvnet",
    ):
        status, body = await raw_http(gateway.http_port, "POST", path, png)
        assert status == 404, (path, body)


@module_loop
async def test_the_openapi_document_says_every_call_but_health_needs_the_key(
    gateway: Gateway,
) -> None:
    """So /docs offers "Authorize" and sends the key with every call it tries."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as http:
        document = (await http.get("/openapi.json")).json()
    [(name, scheme)] = document["components"]["securitySchemes"].items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert document["security"] == [{name: []}]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v2/health/"):
                assert operation["security"] == [], path
            else:
                assert "security" not in operation, path  # the document's applies
                assert "401" in operation["responses"], (method, path)


def _tritonclient_http(url: str, key: str | None, png: bytes) -> str:
    """tritonclient.http, unmodified, with the key as an extra header (in a worker thread)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url)
    headers = None if key is None else {"authorization": f"Bearer {key}"}
    images = httpclient.InferInput("image", [1], "BYTES")
    images.set_data_from_numpy(np.array([png], dtype=np.object_), binary_data=True)
    try:
        result = client.infer("convnet", [images], headers=headers)
    except InferenceServerException as exc:
        return f"error {exc.status()}: {exc.message()}"
    finally:
        client.close()
    return str(result.as_numpy("labels")[0][0].decode())


@module_loop
async def test_tritonclient_http_sends_the_key_as_a_header(gateway: Gateway) -> None:
    png, label = digit_png(5)
    url = f"127.0.0.1:{gateway.http_port}"
    assert await asyncio.to_thread(_tritonclient_http, url, KEY, png) == str(label)
    refused = await asyncio.to_thread(_tritonclient_http, url, None, png)
    assert refused == f"error 401: {MISSING_KEY}"


# tritonclient's stubs declare the same inference.* protobuf symbols as ours, so its gRPC
# client runs in its own interpreter (as any client program would).
TRITON_GRPC_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

url, key, png = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
client = grpcclient.InferenceServerClient(url)
images = grpcclient.InferInput("image", [1], "BYTES")
images.set_data_from_numpy(np.array([png], dtype=np.object_))
out = {"ready": client.is_server_ready()}
result = client.infer("convnet", [images], headers={"authorization": "Bearer " + key})
out["label"] = result.as_numpy("labels")[0][0].decode()
try:
    client.infer("convnet", [images])
except InferenceServerException as exc:
    out["refused"] = [exc.status(), exc.message()]
print(json.dumps(out))
"""


@module_loop
async def test_tritonclient_grpc_sends_the_key_as_metadata(gateway: Gateway) -> None:
    png, label = digit_png(7)
    command = [
        sys.executable, "-c", TRITON_GRPC_SCRIPT,
        f"127.0.0.1:{gateway.grpc_port}", ROTATED_KEY, png.hex(),
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["ready"] is True  # readiness needs no key
    assert out["label"] == str(label)
    assert out["refused"][0] == "StatusCode.UNAUTHENTICATED"
    assert MISSING_KEY in out["refused"][1]


@module_loop
async def test_a_gateway_without_keys_stays_open(model_repository: Path) -> None:
    async with running_gateway(gateway_settings(model_repository)) as open_gateway:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{open_gateway.grpc_port}") as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_pixels_request())
        assert list(reply.outputs[0].shape) == [1, 1]
        async with httpx.AsyncClient() as http:
            reply = await http.get(f"http://127.0.0.1:{open_gateway.http_port}/openapi.json")
        document = reply.json()
        assert "security" not in document  # nothing to authorize at /docs
        assert "securitySchemes" not in document["components"]
        assert "401" not in document["paths"]["/v2/models/{model}/infer"]["post"]["responses"]
