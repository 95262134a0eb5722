"""Live registration against a real TorchServe started with an empty model store: versions
archived from a repository, registered and unregistered through the management API (tokens
on), served per version over gRPC; tutorial checkpoints with their own class counts; a broken
version refused with the worker's reason while the others serve."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch

from cnnserve.errors import UnavailableError, UnknownModelError
from cnnserve.models.repository import ModelVersion, Repository
from cnnserve.models.semantics import PIXEL_COUNTS_HEADER
from cnnserve.settings import Settings
from cnnserve.torchserve_engine.archive import store_archives
from cnnserve.torchserve_engine.client import TorchServeClient
from cnnserve.torchserve_engine.management import ManagedServer
from cnnserve.torchserve_engine.process import ServerInfo, start, status, stop
from tests.models import tutorial_classes as tutorial

from ..conftest import torchserve_settings
from ..images import shapes_png
from ..support import starts_torchserve

pytestmark = [pytest.mark.torchserve, pytest.mark.asyncio(loop_scope="module")]

TOLERANCE = 1e-4
CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EmptyTorchServe:
    """A TorchServe started from an empty model store, and its settings."""

    settings: Settings
    server: ServerInfo
    store: Path


@pytest.fixture(scope="module")
@starts_torchserve
def empty_torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmptyTorchServe]:
    store = tmp_path_factory.mktemp("empty_store")
    settings = torchserve_settings(store)
    server = start(settings, store)
    try:
        yield EmptyTorchServe(settings, server, store)
    finally:
        stop(store)


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default repository, plus convnet version 2 (a copy of 1) and a model ``broken``
    whose TorchScript file is not one."""
    root = tmp_path_factory.mktemp("managed") / "repository"
    shutil.copytree(model_repository, root)
    shutil.copytree(root / "convnet" / "1", root / "convnet" / "2")
    shutil.copytree(root / "convnet", root / "broken", ignore=shutil.ignore_patterns("2"))
    (root / "broken" / "1" / "model.pt").write_bytes(b"not a TorchScript file")
    return root


def version_of(root: Path, model: str, number: int = 1) -> ModelVersion:
    return Repository(root).read(model).versions[number]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture(scope="module")
def managed(empty_torchserve: EmptyTorchServe, http: httpx.AsyncClient) -> ManagedServer:
    return ManagedServer(empty_torchserve.store, empty_torchserve.settings, http)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(empty_torchserve: EmptyTorchServe) -> AsyncIterator[TorchServeClient]:
    server = empty_torchserve.server
    client = TorchServeClient(server.grpc_target, server.key("inference"))
    yield client
    await client.close()


def batch(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 3, height, width)).astype(np.float32)


def registered(empty_torchserve: EmptyTorchServe) -> set[str]:
    return set(status(empty_torchserve.store).workers)


def worker_pid(empty_torchserve: EmptyTorchServe, model: str, version: int) -> int:
    """The pid of the one worker of ``model`` ``version`` (management API, with its key)."""
    server = empty_torchserve.server
    reply = httpx.get(
        f"{server.management_url}/models/{model}/{version}",
        headers={"Authorization": f"Bearer {server.key('management')}"},
        timeout=CALL_TIMEOUT_S,
    )
    (described,) = reply.json()
    (worker,) = described["workers"]
    return int(worker["pid"])


def test_an_empty_store_starts_with_nothing_registered(empty_torchserve: EmptyTorchServe) -> None:
    assert empty_torchserve.server.models == ()
    assert status(empty_torchserve.store).workers == {}


@pytest.mark.parametrize(("model", "classes"), [("convnet10", 10), ("fcn10", 10), ("fcn3", 3)])
async def test_tutorial_checkpoints_serve_with_their_class_count(
    empty_torchserve: EmptyTorchServe,
    managed: ManagedServer,
    client: TorchServeClient,
    tutorial_repository: Path,
    tutorial_checkpoints: dict[str, Path],
    model: str,
    classes: int,
) -> None:
    """Exported into a repository, archived, registered live: TorchServe answers what the
    tutorial's own class computes, for a packed batch and for a direct image."""
    version = version_of(tutorial_repository, model)
    await managed.register(version)
    try:
        assert registered(empty_torchserve) == {f"{model}/1"}
        convnet = model.startswith("convnet")
        network = (tutorial.ConvNet if convnet else tutorial.FCN)(classes)
        network.load_state_dict(torch.load(tutorial_checkpoints[model], weights_only=True))
        items = batch(4) if convnet else batch(2, 30, 45)
        with torch.inference_mode():
            expected = network.eval()(torch.from_numpy(items)).numpy()
        outputs = await client.predict_batch(model, items, CALL_TIMEOUT_S, version="1")
        assert outputs.shape == expected.shape
        assert outputs.shape[1] == classes
        assert np.abs(outputs - expected).max() < TOLERANCE
        if not convnet:
            # A person's call straight to TorchServe: the mask's counts name every class.
            png, _ = shapes_png(3, 40)
            server = empty_torchserve.server
            reply = httpx.post(
                f"{server.inference_url}/predictions/{model}/1",
                content=png,
                headers={"Authorization": f"Bearer {server.key('inference')}"},
                timeout=CALL_TIMEOUT_S,
            )
            assert reply.status_code == 200
            counts = json.loads(reply.headers[PIXEL_COUNTS_HEADER])
            assert list(counts) == [str(c) for c in range(classes)]
    finally:
        await managed.unregister(model, 1)
    assert registered(empty_torchserve) == set()
    assert store_archives(empty_torchserve.store) == []


async def test_versions_come_and_go_while_another_serves(
    empty_torchserve: EmptyTorchServe,
    managed: ManagedServer,
    client: TorchServeClient,
    repository: Path,
) -> None:
    """Version 1 serves a steady load while version 2 is registered, serves, and goes; then
    version 1 (TorchServe's default, which it never removes while others exist) goes while 2
    serves. No call to the version that stays fails."""
    await managed.register(version_of(repository, "convnet", 1))
    items = batch(3, seed=7)
    expected = await client.predict_batch("convnet", items, CALL_TIMEOUT_S, version="1")
    stop_load = asyncio.Event()

    async def load(version: str) -> int:
        calls = 0
        while not stop_load.is_set():
            outputs = await client.predict_batch("convnet", items, CALL_TIMEOUT_S, version=version)
            assert np.array_equal(outputs, expected)
            calls += 1
        return calls

    steady = asyncio.create_task(load("1"))
    await managed.register(version_of(repository, "convnet", 2))
    assert registered(empty_torchserve) == {"convnet/1", "convnet/2"}
    outputs = await client.predict_batch("convnet", items, CALL_TIMEOUT_S, version="2")
    assert np.array_equal(outputs, expected)  # a copy of version 1
    await managed.unregister("convnet", 2)
    with pytest.raises(UnknownModelError, match="does not serve convnet version 2"):
        await client.predict_batch("convnet", items, CALL_TIMEOUT_S, version="2")
    stop_load.set()
    assert await steady > 0

    await managed.register(version_of(repository, "convnet", 2))
    stop_load.clear()
    steady = asyncio.create_task(load("2"))
    await managed.unregister("convnet", 1)
    assert registered(empty_torchserve) == {"convnet/2"}
    stop_load.set()
    assert await steady > 0
    await managed.unregister("convnet", 2)
    assert store_archives(empty_torchserve.store) == []


async def test_a_broken_version_is_refused_with_the_worker_s_reason(
    empty_torchserve: EmptyTorchServe,
    managed: ManagedServer,
    client: TorchServeClient,
    repository: Path,
) -> None:
    await managed.register(version_of(repository, "fcn"))
    try:
        with pytest.raises(UnavailableError) as refused:
            await managed.register(version_of(repository, "broken"))
        message = str(refused.value)
        assert "could not register broken version 1: Failed to start workers" in message
        assert "the worker said: PytorchStreamReader failed reading zip archive" in message
        # Nothing of it is left: not registered, no archive a restart would pick up.
        assert registered(empty_torchserve) == {"fcn/1"}
        assert [p.name for p in store_archives(empty_torchserve.store)] == ["fcn.1.mar"]
        outputs = await client.predict_batch("fcn", batch(1, 16, 16), CALL_TIMEOUT_S, "1")
        assert outputs.shape == (1, 4, 16, 16)
    finally:
        await managed.unregister("fcn", 1)


async def test_a_registered_copy_is_kept_when_it_is_the_same_and_replaced_when_not(
    empty_torchserve: EmptyTorchServe,
    managed: ManagedServer,
    client: TorchServeClient,
    http: httpx.AsyncClient,
    repository: Path,
) -> None:
    """TorchServe answers 409 for a version it holds (a restart from its store, another
    gateway process): a copy built from the same files stays, workers and all, and belongs
    to whoever registered it; a version changed in place (``replace``) or built from other
    files takes its place."""
    version = version_of(repository, "convnet")
    await managed.register(version)
    try:
        first = worker_pid(empty_torchserve, "convnet", 1)
        await managed.register(version)
        assert worker_pid(empty_torchserve, "convnet", 1) == first
        another_gateway = ManagedServer(empty_torchserve.store, empty_torchserve.settings, http)
        await another_gateway.register(version)
        await another_gateway.unregister("convnet", 1)  # not its own: it stays
        assert worker_pid(empty_torchserve, "convnet", 1) == first
        await managed.register(version, replace=True)
        second = worker_pid(empty_torchserve, "convnet", 1)
        assert second != first
        # Other files under the same number (here: another TorchServe batch size).
        other = ManagedServer(
            empty_torchserve.store,
            empty_torchserve.settings.model_copy(update={"torchserve_batch_size": 2}),
            http,
        )
        await other.register(version)
        assert worker_pid(empty_torchserve, "convnet", 1) != second
        assert registered(empty_torchserve) == {"convnet/1"}
        outputs = await client.predict_batch("convnet", batch(1), CALL_TIMEOUT_S, "1")
        assert outputs.shape == (1, 10)
    finally:
        await managed.unregister("convnet", 1)


async def test_unregistering_what_torchserve_does_not_hold_is_a_no_op(
    empty_torchserve: EmptyTorchServe, managed: ManagedServer
) -> None:
    await managed.unregister("convnet", 9)
    await managed.unregister("resnet", 1)
    assert registered(empty_torchserve) == set()


async def test_a_version_registered_before_its_server_starts_is_served_from_the_store(
    repository: Path, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A gateway may start before TorchServe: the archive waits in the store, and the
    TorchServe started from it serves the version; unregistering then removes both."""
    store = tmp_path / "store"
    settings = torchserve_settings(store)
    managed = ManagedServer(store, settings, http)
    await managed.register(version_of(repository, "fcn"))
    assert [p.name for p in store_archives(store)] == ["fcn.1.mar"]
    server = await asyncio.to_thread(start, settings, store)
    try:
        assert server.models == ("fcn/1",)
        client = TorchServeClient(server.grpc_target, server.key("inference"))
        try:
            outputs = await client.predict_batch("fcn", batch(1, 9, 9), CALL_TIMEOUT_S, "1")
            assert outputs.shape == (1, 4, 9, 9)
        finally:
            await client.close()
        await managed.unregister("fcn", 1)
        assert set(status(store).workers) == set()
        assert store_archives(store) == []
    finally:
        await asyncio.to_thread(stop, store)
