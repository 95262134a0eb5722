"""``cnnserve predict`` end to end: the real command against a real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from typer.testing import CliRunner

from cnnserve.cli import app
from cnnserve.client.predict import mask_path
from cnnserve.gateway.server import Gateway
from tests.gateway.certs import CertificateAuthority
from tests.gateway.harness import gateway_settings, running_gateway
from tests.images import digit_png, shapes_png

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module."""
    async with running_gateway(gateway_settings(model_repository)) as running:
        yield running


async def _predict(*args: str) -> tuple[int, str, str]:
    # The command blocks; the gateway keeps serving on this loop meanwhile.
    result = await asyncio.to_thread(CliRunner().invoke, app, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_predict_classifies_digits(gateway: Gateway, tmp_path: Path, transport: str) -> None:
    paths, labels = [], []
    for index in (0, 1, 2):
        png, label = digit_png(index, invert=index == 1)
        path = tmp_path / f"digit{index}.png"
        path.write_bytes(png)
        paths.append(str(path))
        labels.append(label)
    port = gateway.http_port if transport == "http" else gateway.grpc_port
    flags = ["--http"] if transport == "http" else []
    code, out, err = await _predict(*flags, "--port", str(port), "--model", "convnet", *paths)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == paths
    assert [line.split(": ")[1].split()[0] for line in lines] == [str(x) for x in labels]


async def test_predict_writes_fcn_masks(gateway: Gateway, tmp_path: Path) -> None:
    sizes = (32, 48)  # different sizes: one request each
    paths = []
    for side in sizes:
        path = tmp_path / f"scene{side}.png"
        path.write_bytes(shapes_png(side, side=side)[0])
        paths.append(path)
    out_dir = tmp_path / "masks"
    code, out, err = await _predict(
        "--port", str(gateway.grpc_port), "--model", "fcn", "--out", str(out_dir),
        *map(str, paths),
    )  # fmt: skip
    assert code == 0, err
    for path, side in zip(paths, sizes, strict=True):
        written = mask_path(path, out_dir)
        assert written.parent == out_dir
        assert str(written) in out
        mask = np.asarray(Image.open(written))
        assert mask.shape == (side, side)
        assert mask.max() < 4


async def test_predict_reports_server_errors(gateway: Gateway, tmp_path: Path) -> None:
    path = tmp_path / "digit.png"
    path.write_bytes(b"not an image")
    code, _, err = await _predict("--port", str(gateway.grpc_port), str(path))
    assert code == 2
    assert "INVALID_ARGUMENT" in err and "could not decode image" in err


async def test_predict_refuses_an_unknown_model_before_calling(tmp_path: Path) -> None:
    # The model's task decides how its answer is shown, so an unknown one stops here.
    path = tmp_path / "digit.png"
    path.write_bytes(digit_png(0)[0])
    code, _, err = await _predict("--port", "1", "--model", "resnet", str(path))
    assert code == 2
    assert err == "error: unknown model 'resnet'; served models are: convnet, fcn\n"


async def test_mask_path_defaults_beside_the_image() -> None:
    assert mask_path(Path("/a/b/scene.jpg"), None) == Path("/a/b/scene.mask.png")


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_predict_over_mutual_tls_with_an_api_key(
    model_repository: Path, tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--ca-file, --cert-file/--key-file and CNNSERVE_CLIENT_API_KEY against a gateway that
    requires all three; without the key the command fails with the server's reason."""
    ca = CertificateAuthority(tmp_path / "pki")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    settings = gateway_settings(
        model_repository,
        tls_cert_file=server.cert,
        tls_key_file=server.key,
        tls_client_ca_file=ca.pem.cert,
        api_key="predict-key",
    )
    png, label = digit_png(6)
    image = tmp_path / "digit.png"
    image.write_bytes(png)
    async with running_gateway(settings) as gateway:
        port = gateway.http_port if transport == "http" else gateway.grpc_port
        flags = [
            *(["--http"] if transport == "http" else []),
            "--port", str(port), "--ca-file", str(ca.pem.cert),
            "--cert-file", str(client.cert), "--key-file", str(client.key), str(image),
        ]  # fmt: skip
        code, _, err = await _predict(*flags)
        assert code == 2
        assert "UNAUTHENTICATED" in err or "401" in err
        assert "missing API key" in err
        monkeypatch.setenv("CNNSERVE_CLIENT_API_KEY", "predict-key")
        code, out, err = await _predict(*flags)
    assert code == 0, err
    assert out.split(": ")[1].split()[0] == str(label)
