"""A real TorchServe started by cnnserve: REST inference, safe defaults, failing starts."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from cnnserve.errors import UnavailableError
from cnnserve.gateway.readiness import PROBE_TIMEOUT_S, REFRESH_INTERVAL_S
from cnnserve.models.registry import SHAPE_CLASSES, get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.semantics import PIXEL_COUNTS_HEADER
from cnnserve.models.steps import class_mask, normalize
from cnnserve.protocol import open_inference_pb2 as pb
from cnnserve.protocol import open_inference_pb2_grpc as pb_grpc
from cnnserve.protocol.grpc_codec import response_from_proto
from cnnserve.settings import Settings
from cnnserve.torchserve_engine import TorchServeError
from cnnserve.torchserve_engine.keys import EXPIRING, key_expiry, read_inference_key
from cnnserve.torchserve_engine.process import (
    JAVA_PACKAGE,
    ServerInfo,
    renew_keys,
    run_dir_of,
    start,
    status,
)

from ..conftest import RunningTorchServe, torchserve_settings
from ..gateway.harness import digit_pixels
from ..images import digit_png, shapes_png
from ..support import GatewayProcess, gateway_process, wait_until_async
from .renewal import LOAD_TIMEOUT_S, RENEWALS, SHORT_EXPIRATION_MIN, keep_calling

LOCALHOST = {"127.0.0.1", "::ffff:127.0.0.1"}
#: Bounds one gRPC call through a gateway.
CALL_TIMEOUT_S = 60.0


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


# --- keys that renew themselves ------------------------------------------------------------
#
# A TorchServe whose keys expire within seconds (tests/torchserve_engine/conftest.py). A
# fraction of 1 renews whatever is left of a key: ``renew_keys(server, 1.0)`` renews now.


def key_answer(server: ServerInfo, key: str | None, api: str = "inference") -> int:
    """The status TorchServe answers ``key`` with on a call that runs nothing: an unknown
    model's predictions (404 once the key is accepted) or the management API's model list
    (200); a refused key is 400."""
    url = (
        f"{server.inference_url}/predictions/.no-such-model"
        if api == "inference"
        else f"{server.management_url}/models"
    )
    return httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


def test_due_keys_are_renewed_and_the_old_keys_refused_at_once(
    short_lived_keys: ServerInfo,
) -> None:
    server = short_lived_keys
    assert renew_keys(server, 0.0) == [], "fraction 0 renews nothing"
    old = {kind: server.key(kind) for kind in EXPIRING}
    assert server.key_file is not None
    expiry = key_expiry(server.key_file, "inference")
    assert renew_keys(server, 1.0) == ["inference", "management"]
    # Freshly drawn: not due at the default fraction (a quarter of its 9 s left).
    assert renew_keys(server, Settings().torchserve_token_renew_fraction) == []
    assert key_expiry(server.key_file, "inference") > expiry
    new = {kind: server.key(kind) for kind in EXPIRING}
    assert all(new[kind] != old[kind] for kind in EXPIRING)
    assert key_answer(server, old["inference"]) == 400
    assert key_answer(server, new["inference"]) == 404
    assert key_answer(server, old["management"], "management") == 400
    assert key_answer(server, new["management"], "management") == 200


def test_renewers_racing_renew_once(short_lived_keys: ServerInfo) -> None:
    """Four renewers at once (several gateway processes): the lock lets one renew, and the
    others find the key fresh; one renewing after another would refuse the key just drawn."""
    server = short_lived_keys
    renew_keys(server, 1.0)  # a known start: 9 s left
    time.sleep(1.0)  # now due at 0.95 (8.55 s margin); fresh again once renewed
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: renew_keys(server, 0.95), range(4)))
    assert sorted(kind for kinds in results for kind in kinds) == ["inference", "management"]


async def watch_keys(key_file: Path, seen: list[str]) -> None:
    """Record each new inference key ``key_file`` holds in ``seen``, every 0.1 s, until
    cancelled."""
    while True:
        with contextlib.suppress(UnavailableError):  # rewritten in place
            key = read_inference_key(key_file)
            if not seen or seen[-1] != key:
                seen.append(key)
        await asyncio.sleep(0.1)


def convnet_call(gateway: GatewayProcess) -> Callable[[], Awaitable[object]]:
    """One gRPC ModelInfer of two digits through convnet on ``gateway``, labels checked."""
    pixels, labels = digit_pixels(range(2))
    request = pb.ModelInferRequest(model_name="convnet")
    request.inputs.add(name="pixels", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    request.outputs.add(name="labels")
    channel = grpc.aio.insecure_channel(gateway.grpc_target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]

    async def call() -> None:
        response = await stub.ModelInfer(request, timeout=CALL_TIMEOUT_S)
        (answered,) = response_from_proto(response).outputs
        assert [int(row[0]) for row in answered.data] == labels

    return call


def gateway_ready(gateway: GatewayProcess) -> bool:
    """The gateway's HTTP readiness."""
    url = f"http://127.0.0.1:{gateway.http_port}/v2/health/ready"
    return httpx.get(url, timeout=30.0).status_code == 200


@contextlib.contextmanager
def gateway_of(
    server: ServerInfo, model_repository: Path, log: Path, renew_fraction: float
) -> Iterator[GatewayProcess]:
    """``cnnserve serve --backend torchserve`` on ``server``'s model store, as ``make serve``
    runs it (registration on, the key from the run directory), renewing keys at
    ``renew_fraction``."""
    with gateway_process(
        "torchserve",
        log,
        model_repository=model_repository,
        model_store_dir=server.model_store,
        torchserve_grpc_target=server.grpc_target,
        torchserve_token_expiration_min=SHORT_EXPIRATION_MIN,
        torchserve_token_renew_fraction=renew_fraction,
    ) as gateway:
        yield gateway


async def test_a_gateway_renews_its_local_torchserves_keys_and_serves_on(
    short_lived_keys: ServerInfo, model_repository: Path, tmp_path: Path
) -> None:
    """``make serve``: nothing but the gateway runs beside a TorchServe started by ``cnnserve
    torchserve start``, so the gateway renews its keys. Under load from concurrent callers,
    through several renewals (each refusing the key before it at once), no call fails."""
    server = short_lived_keys
    assert server.key_file is not None
    renew_keys(server, 1.0)  # fresh, so the gateway starts before it expires
    seen: list[str] = []
    default = Settings().torchserve_token_renew_fraction
    with gateway_of(server, model_repository, tmp_path / "gateway.log", default) as gateway:
        watcher = asyncio.get_running_loop().create_task(watch_keys(server.key_file, seen))
        try:
            load = await keep_calling(
                convnet_call(gateway), lambda: len(seen) > RENEWALS, LOAD_TIMEOUT_S
            )
        finally:
            watcher.cancel()
        assert len(seen) > RENEWALS, f"{len(seen) - 1} renewals in {LOAD_TIMEOUT_S} s"
        # The gateway logs a renewal after it has written the new keys, which the load
        # stopped on: its last line may still be on its way.
        await wait_until_async(
            lambda: gateway.output().count("renewed the inference") >= RENEWALS,
            10,
            f"the gateway to log {RENEWALS} renewals",
        )
    assert load.failures == [], f"{len(load.failures)} of {load.answered} calls failed"
    assert load.answered > 0


async def test_with_renewal_off_the_key_expires_and_the_gateway_is_not_ready(
    short_lived_keys: ServerInfo, model_repository: Path, tmp_path: Path
) -> None:
    """``torchserve_token_renew_fraction=0``: nobody renews, so once the key expires every
    call is refused, saying so, and the gateway's cached readiness turns false."""
    server = short_lived_keys
    assert server.key_file is not None
    # This test stands in for a renewer until the gateway is up (it starts ready only with a
    # key TorchServe accepts), then stops.
    stop_renewing = threading.Event()

    def renew_until_stopped() -> None:
        while not stop_renewing.wait(0.5):
            renew_keys(server, 0.5)

    renewer = threading.Thread(target=renew_until_stopped)
    renew_keys(server, 1.0)
    renewer.start()
    try:
        with gateway_of(server, model_repository, tmp_path / "gateway.log", 0.0) as gateway:
            call = convnet_call(gateway)
            await call()
            assert gateway_ready(gateway)
            stop_renewing.set()
            renewer.join()
            expiry = key_expiry(server.key_file, "inference")
            await asyncio.sleep((expiry - datetime.now(UTC)).total_seconds() + 0.5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "refused the inference key" in (refused.value.details() or "")
            await wait_until_async(
                lambda: not gateway_ready(gateway),
                2 * (REFRESH_INTERVAL_S + PROBE_TIMEOUT_S),
                "the gateway to report not ready",
            )
            assert "renewed" not in gateway.output()
    finally:
        stop_renewing.set()
        renewer.join()
