"""TLS and mutual TLS on the real gRPC and HTTP listeners, with certificates made per test.

TLS works for a client that trusts the CA; a plaintext client gets no answer from a TLS port;
with a client CA configured, a client without a certificate (or with one from another CA) is
refused during the handshake, and one with a certificate the CA signed is served. The
tritonclient gRPC client, unmodified, works over TLS with an API key.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from cnnserve.client.inference import ServerError, TlsConfig, connect
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.settings import Settings
from tests.gateway.certs import CertificateAuthority, Pem
from tests.gateway.harness import gateway_settings, running_gateway
from tests.images import digit_png


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The CA that signs the gateway's and the good client's certificates."""
    return CertificateAuthority(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_pem(ca: CertificateAuthority) -> Pem:
    return ca.issue("server", server=True)


def tls_settings(model_repository: Path, server: Pem, **extra: object) -> Settings:
    return gateway_settings(
        model_repository, tls_cert_file=server.cert, tls_key_file=server.key, **extra
    )


async def _ready(channel: grpc.aio.Channel) -> bool:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return bool((await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready)


async def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(
    model_repository: Path, ca: CertificateAuthority, server_pem: Pem
) -> None:
    png, label = digit_png(2)
    async with running_gateway(tls_settings(model_repository, server_pem)) as gateway:
        trusted = grpc.ssl_channel_credentials(root_certificates=ca.pem.cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{gateway.grpc_port}", trusted) as channel:
            assert await _ready(channel)
        verify = ssl.create_default_context(cafile=ca.pem.cert)
        async with httpx.AsyncClient(verify=verify) as http:
            reply = await http.post(
                f"https://127.0.0.1:{gateway.http_port}/predict/convnet", content=png
            )
            assert reply.json()["predictions"][0]["label"] == str(label)
            # The metrics port stays plaintext (Prometheus scrapes it inside the deployment).
            metrics = await http.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics")
            assert metrics.status_code == 200

        # Plaintext against the TLS ports: no answer, neither gRPC nor HTTP.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _ready(plain)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(f"http://127.0.0.1:{gateway.http_port}/v2/health/ready")
            # A client that does not trust the CA refuses the server.
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(f"https://127.0.0.1:{gateway.http_port}/v2/health/ready")


async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    model_repository: Path, ca: CertificateAuthority, server_pem: Pem, tmp_path: Path
) -> None:
    good = ca.issue("client", server=False)
    stranger = CertificateAuthority(tmp_path / "other", name="another CA").issue(
        "stranger", server=False
    )
    settings = tls_settings(model_repository, server_pem, tls_client_ca_file=ca.pem.cert)
    root = ca.pem.cert.read_bytes()
    async with running_gateway(settings) as gateway:
        target = f"127.0.0.1:{gateway.grpc_port}"
        with_cert = grpc.ssl_channel_credentials(
            root, good.key.read_bytes(), good.cert.read_bytes()
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await _ready(channel)
        for credentials in (
            grpc.ssl_channel_credentials(root),  # no client certificate
            grpc.ssl_channel_credentials(
                root, stranger.key.read_bytes(), stranger.cert.read_bytes()
            ),
        ):
            async with grpc.aio.secure_channel(target, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _ready(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        url = f"https://127.0.0.1:{gateway.http_port}/v2/health/ready"
        context = ssl.create_default_context(cafile=ca.pem.cert)
        context.load_cert_chain(good.cert, good.key)
        async with httpx.AsyncClient(verify=context) as http:
            assert (await http.get(url)).status_code == 200
        for client_pem in (None, stranger):
            context = ssl.create_default_context(cafile=ca.pem.cert)
            if client_pem is not None:
                context.load_cert_chain(client_pem.cert, client_pem.key)
            async with httpx.AsyncClient(verify=context) as http:
                # TLS 1.3 reports the rejected certificate after the handshake: the request
                # fails either while connecting or while reading the answer.
                with pytest.raises(httpx.TransportError):
                    await http.get(url)


async def test_cnnserve_client_over_mutual_tls_with_a_key(
    model_repository: Path, ca: CertificateAuthority, server_pem: Pem
) -> None:
    """The Python client on both transports: CA, client certificate and API key."""
    good = ca.issue("python-client", server=False)
    settings = tls_settings(
        model_repository, server_pem, tls_client_ca_file=ca.pem.cert, api_key="mtls-and-key"
    )
    tls = TlsConfig(ca_file=ca.pem.cert, cert_file=good.cert, key_file=good.key)
    png, label = digit_png(4)
    async with running_gateway(settings) as gateway:
        for http, port in ((False, gateway.grpc_port), (True, gateway.http_port)):

            def classify(key: str | None, http: bool = http, port: int = port) -> str:
                with connect("127.0.0.1", port, http=http, tls=tls, api_key=key) as client:
                    return client.classify([png])[0].label

            assert await asyncio.to_thread(classify, "mtls-and-key") == str(label)
            with pytest.raises(ServerError) as refused:
                await asyncio.to_thread(classify, None)
            assert refused.value.status in ("UNAUTHENTICATED", "401")


TRITON_GRPC_TLS_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

url, ca, png = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
client = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)
images = grpcclient.InferInput("image", [1], "BYTES")
images.set_data_from_numpy(np.array([png], dtype=np.object_))
result = client.infer("convnet", [images], headers={"authorization": "Bearer tls-key"})
print(json.dumps({"ready": client.is_server_ready(),
                  "label": result.as_numpy("labels")[0][0].decode()}))
"""


async def test_tritonclient_grpc_over_tls_with_a_key(
    model_repository: Path, ca: CertificateAuthority, server_pem: Pem
) -> None:
    png, label = digit_png(8)
    settings = tls_settings(model_repository, server_pem, api_key="tls-key")
    async with running_gateway(settings) as gateway:
        command = [
            sys.executable, "-c", TRITON_GRPC_TLS_SCRIPT,
            f"localhost:{gateway.grpc_port}", str(ca.pem.cert), png.hex(),
        ]  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ready": True, "label": str(label)}


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    with pytest.raises(ValueError, match="set together"):
        Settings(tls_cert_file=cert)
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        Settings(tls_client_ca_file=cert)
    with pytest.raises(ValueError, match="needs its key"):
        TlsConfig(cert_file=cert)
