"""A real TorchServe started by cnnserve: REST inference, safe defaults, failing starts."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from cnnserve.models.registry import SHAPE_CLASSES, get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.semantics import PIXEL_COUNTS_HEADER
from cnnserve.models.steps import class_mask, normalize
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.process import (
    JAVA_PACKAGE,
    ServerInfo,
    run_dir_of,
    start,
    status,
)

from ..conftest import RunningTorchServe, torchserve_settings
from ..images import digit_png, shapes_png

LOCALHOST = {"127.0.0.1", "::ffff:127.0.0.1"}


def predict(
    torchserve: RunningTorchServe, model: str, body: bytes, **headers: str
) -> httpx.Response:
    """POST ``body`` to ``/predictions/<model>`` with the inference key, as curl would."""
    headers = {"Authorization": f"Bearer {torchserve.inference_key}", **headers}
    return httpx.post(
        f"{torchserve.rest_url}/predictions/{model}", content=body, headers=headers, timeout=60
    )


def reference_top1(repository: Path, png: bytes) -> str:
    """The label the served version (the repository's convnet version 1) gives ``png``."""
    spec = get_spec("convnet")
    runner = load_runner(repository / "convnet" / "1" / "model.pt", "torchscript", "cpu")
    logits = runner.infer(normalize(spec.image_to_pixels(png))[np.newaxis])
    return spec.labels[int(np.argmax(logits[0]))]


def reference_mask(repository: Path, png: bytes) -> np.ndarray:
    """The mask the served version (the repository's fcn version 1) gives ``png``."""
    runner = load_runner(repository / "fcn" / "1" / "model.pt", "torchscript", "cpu")
    return class_mask(runner.infer(normalize(get_spec("fcn").image_to_pixels(png))[None]))[0]


@pytest.mark.torchserve
def test_digit_pngs_come_back_as_the_right_digit(torchserve: RunningTorchServe) -> None:
    correct = 0
    for index in range(10):
        png, label = digit_png(index, invert=index % 3 == 0)
        response = predict(torchserve, "convnet", png, **{"X-Top-K": "2"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        (prediction,) = response.json()["predictions"]
        assert len(prediction["top_k"]) == 2
        assert prediction["label"] == reference_top1(torchserve.repository, png)
        correct += prediction["label"] == str(label)
    assert correct >= 9


@pytest.mark.torchserve
def test_an_fcn_image_comes_back_as_its_mask(torchserve: RunningTorchServe) -> None:
    png, truth = shapes_png(3, 80)
    response = predict(torchserve, "fcn", png)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    mask = np.asarray(Image.open(io.BytesIO(response.content)))
    assert mask.shape == truth.shape == (80, 80)
    assert set(np.unique(mask)) <= set(range(len(SHAPE_CLASSES)))
    np.testing.assert_array_equal(mask, reference_mask(torchserve.repository, png))
    counts = json.loads(response.headers[PIXEL_COUNTS_HEADER])
    assert sum(counts.values()) == 80 * 80
    assert counts["background"] == int((mask == 0).sum())
    as_json = predict(torchserve, "fcn", png, **{"X-Format": "json"})
    assert as_json.json() == {"model": "fcn", "predictions": [{"counts": counts}]}


@pytest.mark.torchserve
def test_concurrent_requests_with_corrupt_images_among_them(
    torchserve: RunningTorchServe,
) -> None:
    digits = [digit_png(i) for i in range(6)]
    scenes = [shapes_png(seed, 48) for seed in range(4)]
    corrupt = [digits[0][0][:80], b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"not an image"]
    calls = (
        [("convnet", png) for png, _ in digits]
        + [("fcn", png) for png, _ in scenes]
        + [("convnet", data) for data in corrupt]
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda c: predict(torchserve, *c), calls))
    for (model, body), response in zip(calls, responses, strict=True):
        if any(body is bad for bad in corrupt):
            assert response.status_code == 400
            assert "could not decode image" in response.json()["message"]
        elif model == "convnet":
            assert response.status_code == 200
            expected = reference_top1(torchserve.repository, body)
            assert response.json()["predictions"][0]["label"] == expected
        else:
            assert response.status_code == 200
            mask = np.asarray(Image.open(io.BytesIO(response.content)))
            np.testing.assert_array_equal(mask, reference_mask(torchserve.repository, body))


@pytest.mark.torchserve
def test_unknown_model_is_404(torchserve: RunningTorchServe) -> None:
    png, _ = digit_png(1)
    response = predict(torchserve, "resnet", png)
    assert response.status_code == 404
    assert "Model not found: resnet" in response.text


@pytest.mark.torchserve
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "wrong-scheme"])
def test_requests_without_the_inference_key_are_refused(
    torchserve: RunningTorchServe, authorization: str | None
) -> None:
    png, _ = digit_png(1)
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(
        f"{torchserve.rest_url}/predictions/convnet", content=png, headers=headers
    )
    # TorchServe answers a failed token check with 400 InvalidKeyException.
    assert response.status_code == 400
    assert "Token Authorization failed" in response.json()["message"]
    ping = httpx.get(f"{torchserve.rest_url}/ping", headers=headers)
    assert ping.status_code == 400


@pytest.mark.torchserve
@pytest.mark.parametrize(
    "url",
    ["https://example.com/evil.mar", "file:///tmp/evil.mar", "../evil.mar", "missing.1.mar"],
)
def test_registration_takes_archives_from_the_model_store_only(
    torchserve: RunningTorchServe, url: str
) -> None:
    """The management API registers versions (with the management key, on loopback), but
    downloads nothing and reads nothing outside the store."""
    management = f"{torchserve.server.management_url}/models"
    refused = httpx.post(management, params={"url": url}, headers={"Authorization": "Bearer x"})
    assert refused.status_code == 400
    assert "Token Authorization failed" in refused.json()["message"]
    key = torchserve.server.key("management")
    response = httpx.post(
        management, params={"url": url}, headers={"Authorization": f"Bearer {key}"}
    )
    assert response.status_code == 404
    assert "not" in response.json()["message"]


@pytest.mark.torchserve
def test_every_port_listens_on_localhost_only(torchserve: RunningTorchServe) -> None:
    jvm = psutil.Process(torchserve.server.pid)
    listening = {
        (conn.laddr.ip, conn.laddr.port)
        for conn in jvm.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    settings = torchserve.settings
    expected_ports = {
        settings.torchserve_inference_port,
        settings.torchserve_management_port,
        settings.torchserve_metrics_port,
        settings.torchserve_grpc_inference_port,
        settings.torchserve_grpc_management_port,
    }
    assert {port for _, port in listening} == expected_ports
    assert {ip for ip, _ in listening} <= LOCALHOST


@pytest.mark.torchserve
def test_status_shows_ready_workers_and_workers_run_this_python(
    torchserve: RunningTorchServe,
) -> None:
    found = status(torchserve.model_store)
    assert found.running
    # Each archive registers its repository version; the workers answer per version.
    assert found.workers == {"convnet/1": ["READY"], "fcn/1": ["READY"]}
    assert torchserve.server.models == ("convnet/1", "fcn/1")
    workers = psutil.Process(torchserve.server.pid).children()
    assert len(workers) == 2
    venv_python = Path(psutil.Process().exe()).resolve()
    assert {Path(w.exe()).resolve() for w in workers} == {venv_python}
    assert ServerInfo.load(run_dir_of(torchserve.model_store)) == torchserve.server


@pytest.mark.torchserve
def test_a_second_start_on_the_same_store_is_refused(torchserve: RunningTorchServe) -> None:
    with pytest.raises(TorchServeError, match=r"already runs .* stop it with"):
        start(torchserve.settings, torchserve.model_store)


@pytest.mark.torchserve
def test_start_fails_cleanly_when_a_port_is_taken(
    torchserve: RunningTorchServe, tmp_path: Path
) -> None:
    """``torchserve --start`` exits 0 here; the JVM dies later and start must notice."""
    store = tmp_path / "store"
    store.mkdir()
    for archive in torchserve.model_store.glob("*.mar"):
        shutil.copy(archive, store)
    settings = torchserve.settings.model_copy(update={"model_store_dir": store})
    with pytest.raises(TorchServeError, match="Failed to bind to address"):
        start(settings, store)
    leftovers = [
        process
        for process in psutil.process_iter(["cmdline"])
        if str(store) in " ".join(process.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert not status(store).running
    assert not (run_dir_of(store) / "state.json").exists()
    png, _ = digit_png(2)
    assert predict(torchserve, "convnet", png).status_code == 200  # the first one is unaffected


def test_start_without_java_fails_at_once_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TorchServeError, match=f"apt-get install -y {JAVA_PACKAGE}"):
        start(torchserve_settings(tmp_path), tmp_path)
    assert not run_dir_of(tmp_path).exists()


def test_start_with_an_unreadable_archive_names_it(tmp_path: Path) -> None:
    (tmp_path / "convnet.1.mar").write_bytes(b"not a zip file")
    with pytest.raises(TorchServeError, match=r"convnet\.1\.mar is not a TorchServe archive"):
        start(torchserve_settings(tmp_path), tmp_path)
    assert not run_dir_of(tmp_path).exists()
