"""``cnnserve predict`` end to end: the real command against a real gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
from PIL import Image
from typer.testing import CliRunner

from cnnserve.cli import app
from cnnserve.client.predict import mask_path, split
from cnnserve.gateway.server import Gateway
from tests.gateway.certs import CertificateAuthority
from tests.gateway.harness import gateway_settings, running_gateway
from tests.images import digit_png, shapes_png
from tests.support import free_ports

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(model_repository: Path) -> AsyncIterator[Gateway]:
    """One onnxruntime gateway for the module, at the default settings."""
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


def _digits(folder: Path, count: int) -> tuple[list[str], list[int]]:
    """``count`` digit PNGs written into ``folder``: their paths and labels."""
    paths, labels = [], []
    for index in range(count):
        png, label = digit_png(index, invert=index % 3 == 1)
        path = folder / f"digit{index}.png"
        path.write_bytes(png)
        paths.append(str(path))
        labels.append(label)
    return paths, labels


async def _requests_served(gateway: Gateway, model: str) -> int:
    """Successful requests the gateway counted for ``model`` (its statistics extension)."""
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{gateway.http_port}/v2/models/{model}/stats")
    (stats,) = reply.json()["model_stats"]
    return int(stats["inference_stats"]["success"]["count"])


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_more_images_than_a_batch_go_as_several_requests(
    gateway: Gateway, tmp_path: Path, transport: str
) -> None:
    """70 digits at the default max_batch_size of 32: three requests (32, 32, 6), every
    image answered in order with its label."""
    paths, labels = _digits(tmp_path, 70)
    port = gateway.http_port if transport == "http" else gateway.grpc_port
    flags = ["--http"] if transport == "http" else []
    before = await _requests_served(gateway, "convnet")
    code, out, err = await _predict(*flags, "--port", str(port), "--json", *paths)
    assert code == 0, err
    assert await _requests_served(gateway, "convnet") - before == 3
    results = json.loads(out)["results"]
    assert [r["image"] for r in results] == paths
    assert [r["label"] for r in results] == [str(x) for x in labels]


async def test_json_and_top_k(gateway: Gateway, tmp_path: Path) -> None:
    paths, labels = _digits(tmp_path, 2)
    code, out, err = await _predict("--port", str(gateway.grpc_port), "--top-k", "3", *paths)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    ranked = lines[0].split(": ", 1)[1].split(", ")
    assert len(ranked) == 3 and ranked[0].split()[0] == str(labels[0])
    code, out, err = await _predict(
        "--port", str(gateway.grpc_port), "--json", "--top-k", "3", *paths
    )
    assert code == 0, err
    document = json.loads(out)
    assert document["model"] == "convnet"
    first = document["results"][0]
    assert first["image"] == paths[0] and first["label"] == str(labels[0])
    probabilities = [entry["probability"] for entry in first["top_k"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert first["top_k"][0] == {"label": first["label"], "probability": first["probability"]}


async def test_json_for_masks(gateway: Gateway, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    path.write_bytes(shapes_png(40, side=40)[0])
    code, out, err = await _predict(
        "--http", "--port", str(gateway.http_port), "--model", "fcn", "--json", str(path)
    )
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    mask = np.asarray(Image.open(result["mask"]))
    assert (result["width"], result["height"]) == (40, 40)
    counted = {str(c): int(n) for c, n in zip(*np.unique(mask, return_counts=True), strict=True)}
    assert result["pixels_per_class"] == counted
    assert sum(counted.values()) == 40 * 40


@pytest.mark.parametrize(("transport", "flags"), [("gRPC", []), ("HTTP", ["--http"])])
async def test_no_gateway_is_one_line_saying_what_to_do(
    tmp_path: Path, transport: str, flags: list[str]
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    paths, _ = _digits(tmp_path, 1)
    code, out, err = await _predict(*flags, "--port", str(port), *paths)
    assert code == 2, transport
    assert out == ""
    assert err == (
        f"error: no gateway at 127.0.0.1:{port} (connection refused): start one with "
        "`make serve` or give --host/--port\n"
    )


@pytest.mark.parametrize("flags", [[], ["--http"]])
async def test_a_host_that_does_not_resolve_is_no_gateway(tmp_path: Path, flags: list[str]) -> None:
    # .invalid never resolves (RFC 2606).
    paths, _ = _digits(tmp_path, 1)
    code, _, err = await _predict(*flags, "--host", "gateway.invalid", "--port", "8001", *paths)
    assert code == 2
    assert err.startswith("error: no gateway at gateway.invalid:8001 (")
    assert err.endswith("): start one with `make serve` or give --host/--port\n")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ca-file", "/nonexistent/ca.pem"], "error: /nonexistent/ca.pem: No such file"),
        (["--cert-file", "c.pem"], "error: a client certificate needs its key"),
        (["--timeout-s", "0.000001"], "error: DEADLINE_EXCEEDED: "),
        (["--http", "--timeout-s", "0.000001"], "error: "),
    ],
)
async def test_client_side_failures_are_one_line(
    gateway: Gateway, tmp_path: Path, flags: list[str], message: str
) -> None:
    paths, _ = _digits(tmp_path, 1)
    port = gateway.http_port if "--http" in flags else gateway.grpc_port
    code, out, err = await _predict(*flags, "--port", str(port), *paths)
    assert code == 2
    assert out == ""
    assert err.startswith(message) and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["gone.png"], "error: no such image file: gone.png\n"),
        (
            ["--model", "fcn", "--top-k", "2", "scene.png"],
            "error: --top-k ranks labels: it applies to convnet, not fcn\n",
        ),
    ],
)
async def test_a_mistake_is_named_before_calling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scene.png").write_bytes(shapes_png(32, side=32)[0])
    code, _, err = await _predict("--port", "1", *args)
    assert code == 2
    assert err == message


async def test_split_keeps_each_request_within_items_and_bytes() -> None:
    images = [b"x" * size for size in (5, 5, 5, 20, 1, 1, 1)]
    assert [list(r) for r in split(images, 3, 12)] == [[0, 1], [2], [3], [4, 5, 6]]
    assert [list(r) for r in split(images, 2, 100)] == [[0, 1], [2, 3], [4, 5], [6]]
    assert list(split([], 2, 100)) == []
