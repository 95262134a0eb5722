"""The gRPC client against a real TorchServe: packed batches (float32 items, or encoded images
the handler decodes), and each failure as our error."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from cnnserve.errors import (
    DeadlineExceededError,
    InvalidInputError,
    UnavailableError,
    UnknownModelError,
)
from cnnserve.models.registry import get_spec
from cnnserve.models.runtime import load_runner
from cnnserve.models.steps import normalize
from cnnserve.torchserve_engine.client import KEY_POLL_S, KEY_WAIT_S, TorchServeClient
from cnnserve.torchserve_engine.keys import KeyDir, read_inference_key, read_key
from cnnserve.torchserve_engine.process import KEY_FILE, ServerInfo, renew_keys, run_dir_of

from ..conftest import RunningTorchServe, publish_key
from ..images import digit_png, shapes_png
from ..support import free_ports

pytestmark = [pytest.mark.torchserve, pytest.mark.asyncio(loop_scope="module")]

TOLERANCE = 1e-4
#: How long after a renewal the test publishes the new key (the entry point takes
#: milliseconds; within :data:`KEY_WAIT_S`).
PUBLISH_DELAY_S = 0.3


def batch(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 3, height, width)).astype(np.float32)


def reference(torchserve: RunningTorchServe, model: str, items: np.ndarray) -> np.ndarray:
    """The served version's artifact run in-process (the archives carry the TorchScript
    files of the repository's version 1)."""
    runner = load_runner(torchserve.repository / model / "1" / "model.pt", "torchscript", "cpu")
    return runner.infer(items)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(torchserve: RunningTorchServe) -> AsyncIterator[TorchServeClient]:
    client = TorchServeClient(torchserve.settings.grpc_target, torchserve.inference_key)
    yield client
    await client.close()


async def test_a_packed_batch_matches_the_in_process_runner(
    torchserve: RunningTorchServe, client: TorchServeClient
) -> None:
    for model, items in (("convnet", batch(5)), ("fcn", batch(3, 45, 64))):
        expected = reference(torchserve, model, items)
        # The version by number, and TorchServe's default version (the only one here).
        for version in ("1", ""):
            outputs = await client.predict_batch(model, items, timeout_s=60, version=version)
            assert outputs.shape == expected.shape
            assert np.abs(outputs - expected).max() <= TOLERANCE


async def test_concurrent_uneven_batches_get_their_own_outputs(
    torchserve: RunningTorchServe, client: TorchServeClient
) -> None:
    calls = [
        ("convnet", batch(2, seed=1)),
        ("fcn", batch(3, 16, 24, seed=2)),
        ("convnet", batch(3, seed=3)),
        ("fcn", batch(1, 7, 7, seed=4)),
        ("convnet", batch(1, seed=5)),
        ("fcn", batch(2, 33, 20, seed=6)),
    ]
    results = await asyncio.gather(*(client.predict_batch(m, b, timeout_s=60) for m, b in calls))
    for (model, items), outputs in zip(calls, results, strict=True):
        assert np.abs(outputs - reference(torchserve, model, items)).max() <= TOLERANCE


async def test_a_rejected_batch_fails_alone(client: TorchServeClient) -> None:
    """The handler's 400 travels in the body of an OK gRPC answer; the client raises it."""
    good = [client.predict_batch("convnet", batch(2, seed=i), timeout_s=60) for i in range(3)]
    bad = client.predict_batch("convnet", batch(2, 32, 32), timeout_s=60)
    tiny = client.predict_batch("fcn", batch(1, 5, 5), timeout_s=60)
    results = await asyncio.gather(*good, bad, tiny, return_exceptions=True)
    assert all(isinstance(r, np.ndarray) and r.shape == (2, 10) for r in results[:3])
    assert isinstance(results[3], InvalidInputError)
    assert str(results[3]) == "convnet expects [N,3,28,28], got [N,3,32,32]"
    assert isinstance(results[4], InvalidInputError)
    assert "got [N,3,5,5]" in str(results[4])


async def test_a_malformed_batch_is_refused_before_sending(client: TorchServeClient) -> None:
    with pytest.raises(InvalidInputError, match="got FP64"):
        await client.predict_batch("convnet", batch(1).astype(np.float64))
    with pytest.raises(InvalidInputError, match="rank 4"):
        await client.predict_batch("convnet", batch(1)[0])


async def test_an_unknown_model_or_version_is_unknown(client: TorchServeClient) -> None:
    """TorchServe answers INTERNAL ("Model not found", "Model version: 9 does not exist for
    model"); callers see NOT_FOUND's error."""
    with pytest.raises(UnknownModelError, match=r"does not serve resnet$"):
        await client.predict_batch("resnet", batch(1))
    with pytest.raises(UnknownModelError, match=r"does not serve convnet version 9$"):
        await client.predict_batch("convnet", batch(1), version="9")


async def test_a_wrong_key_is_refused(torchserve: RunningTorchServe) -> None:
    for key in ("wrong", None):
        client = TorchServeClient(torchserve.settings.grpc_target, key)
        try:
            assert not await client.ping()
            assert not await client.ready(get_spec("convnet"))
            with pytest.raises(UnavailableError, match="refused the inference key"):
                await client.predict_batch("convnet", batch(1))
        finally:
            await client.close()


async def test_ping_and_readiness(client: TorchServeClient) -> None:
    assert await client.ping()
    assert await client.ready(get_spec("convnet"), "1")
    assert await client.ready(get_spec("fcn"))
    assert not await client.ready(get_spec("fcn"), "2")
    unknown = dataclasses.replace(get_spec("convnet"), name="resnet")
    assert not await client.ready(unknown)


async def test_an_unreachable_server_is_unavailable(torchserve: RunningTorchServe) -> None:
    (port,) = free_ports(1)
    client = TorchServeClient(f"127.0.0.1:{port}", torchserve.inference_key)
    try:
        assert not await client.ping()
        assert not await client.ready(get_spec("convnet"))
        with pytest.raises(UnavailableError, match=f"127.0.0.1:{port} is unavailable"):
            await client.predict_batch("convnet", batch(1), timeout_s=10)
    finally:
        await client.close()


async def test_a_deadline_that_passes_is_deadline_exceeded(client: TorchServeClient) -> None:
    with pytest.raises(DeadlineExceededError, match=r"within 0\.001 s"):
        await client.predict_batch("fcn", batch(8, 256, 256), timeout_s=0.001)
    # The channel stays usable afterwards.
    assert (await client.predict_batch("convnet", batch(1), timeout_s=60)).shape == (1, 10)


async def test_keys_are_read_from_torchserves_key_file(
    torchserve: RunningTorchServe, tmp_path: Path
) -> None:
    key_file = run_dir_of(torchserve.model_store) / KEY_FILE  # where `start` leaves it
    assert read_inference_key(key_file) == torchserve.inference_key
    assert read_key(key_file, "management") != torchserve.inference_key
    with pytest.raises(UnavailableError, match="not found; is TorchServe running"):
        read_inference_key(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(UnavailableError, match="has no inference key"):
        read_inference_key(tmp_path / "empty.json")


async def test_a_key_refused_because_it_was_just_renewed_is_read_again(
    short_lived_keys: ServerInfo, tmp_path: Path
) -> None:
    """A replica publishes its new key a moment after TorchServe drew it (and refused the old
    one): the call waits for it and is made again with it. A key that does not change is
    still refused, after :data:`KEY_WAIT_S` the first time and at once after that, and the
    caller is told so."""
    server = short_lived_keys
    renew_keys(server, 1.0)  # fresh: 9 s
    publish_key(server, tmp_path)
    client = TorchServeClient(server.grpc_target, KeyDir(tmp_path))
    try:
        assert (await client.predict_batch("convnet", batch(1), timeout_s=60)).shape == (1, 10)
        assert renew_keys(server, 1.0) == ["inference", "management"]
        asyncio.get_running_loop().call_later(PUBLISH_DELAY_S, publish_key, server, tmp_path)
        started = time.monotonic()
        assert (await client.predict_batch("convnet", batch(1), timeout_s=60)).shape == (1, 10)
        assert time.monotonic() - started >= PUBLISH_DELAY_S, "answered with the old key?"
        renew_keys(server, 1.0)  # and not published
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="refused the inference key"):
            await client.predict_batch("convnet", batch(1), timeout_s=60)
        assert time.monotonic() - started >= KEY_WAIT_S - KEY_POLL_S
        # The same key refused again: no second wait.
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="refused the inference key"):
            await client.predict_batch("convnet", batch(1), timeout_s=60)
        assert time.monotonic() - started < KEY_WAIT_S / 2
    finally:
        await client.close()


def float32_items(model: str, images: list[bytes]) -> np.ndarray:
    """What the gateway's own decoding would send for ``images``."""
    spec = get_spec(model)
    return np.stack(
        [normalize(spec.image_to_pixels(image), spec.normalization) for image in images]
    )


async def test_image_batches_are_decoded_by_the_handler_and_fail_per_image(
    client: TorchServeClient,
) -> None:
    """Concurrent uneven image batches, one image corrupt: only that image fails, and every
    other row is what the float32 path computes for the same image."""
    digits = [digit_png(i)[0] for i in range(5)]
    scenes = [shapes_png(seed, 40)[0] for seed in (1, 2, 3)]
    corrupt = digits[3][:90]
    calls = [
        ("convnet", [digits[0], digits[1]], None),
        ("fcn", scenes, (40, 40)),
        ("convnet", [digits[2], corrupt, digits[4]], None),
        ("fcn", [scenes[0]], (40, 40)),
    ]
    results = await asyncio.gather(
        *(client.predict_images(m, images, size, timeout_s=60) for m, images, size in calls)
    )
    assert [sorted(r.failures) for r in results] == [[], [], [1], []]
    assert "could not decode image" in str(results[2].failures[1])
    for (model, images, _), result in zip(calls, results, strict=True):
        good = [i for i, image in enumerate(images) if image is not corrupt]
        expected = await client.predict_batch(
            model, float32_items(model, [images[i] for i in good]), timeout_s=60
        )
        assert result.outputs is not None and len(result.outputs) == len(images)
        assert np.abs(result.outputs[good] - expected).max() <= TOLERANCE


async def test_an_image_batch_whose_every_image_fails_has_no_outputs(
    client: TorchServeClient,
) -> None:
    png, _ = digit_png(0)
    result = await client.predict_images("convnet", [png[:70], b"not an image"], timeout_s=60)
    assert result.outputs is None
    assert sorted(result.failures) == [0, 1]
    assert all(isinstance(error, InvalidInputError) for error in result.failures.values())


async def test_an_image_batch_the_handler_refuses_whole_raises(client: TorchServeClient) -> None:
    scene, _ = shapes_png(1, 40)
    with pytest.raises(InvalidInputError, match="must declare the size its images share"):
        await client.predict_images("fcn", [scene], timeout_s=60)
