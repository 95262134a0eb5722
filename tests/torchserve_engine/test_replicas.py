"""Replicas behind one client: targets, resolution, and two real TorchServes with tokens on.

The two TorchServes (the session's and one more) each draw their own random inference key;
each publishes it in a shared key directory under its address, as the container entry point
does, and the client sends every replica its own key. Replicas joining and leaving are
driven by a resolver the test changes, standing in for DNS answering with more or fewer
addresses after ``docker compose up --scale`` or a Kubernetes scale.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnserve.models.runtime import load_runner
from cnnserve.torchserve_engine.client import TorchServeClient
from cnnserve.torchserve_engine.keys import KeyDir
from cnnserve.torchserve_engine.process import ServerInfo
from cnnserve.torchserve_engine.replicas import Address, parse_target, resolve_dns

from ..conftest import (
    RunningTorchServe,
    publish_key,
    running_torchserve,
    served_requests,
    torchserve_settings,
)
from ..support import starts_torchserve, wait_until_async

WAIT_S = 30.0
TOLERANCE = 1e-4


def address_of(server: ServerInfo) -> Address:
    """The gRPC inference address of ``server``."""
    host, _, port = server.grpc_target.rpartition(":")
    return Address(host, int(port))


# --- targets ----------------------------------------------------------------------------


def test_fixed_targets_list_their_addresses() -> None:
    resolver, dynamic = parse_target("ipv4:127.0.0.1:7070,10.0.0.2:7071")
    assert not dynamic
    assert list(resolver()) == [Address("127.0.0.1", 7070), Address("10.0.0.2", 7071)]
    resolver, dynamic = parse_target("ipv6:[::1]:7070")
    assert list(resolver()) == [Address("::1", 7070)] and not dynamic
    assert str(Address("::1", 7070)) == "[::1]:7070"
    resolver, dynamic = parse_target("torchserve:7070")
    assert list(resolver()) == [Address("torchserve", 7070)] and not dynamic


def test_dns_targets_resolve_every_address_again_and_again() -> None:
    resolver, dynamic = parse_target("dns:///localhost:7070")
    assert dynamic
    addresses = list(resolver())
    assert addresses == resolve_dns("localhost", 7070)
    assert {a.host for a in addresses} & {"127.0.0.1", "::1"}
    assert all(a.port == 7070 for a in addresses)


@pytest.mark.parametrize("target", ["unix:/tmp/ts.sock", "http://torchserve:7070", "torchserve"])
def test_unusable_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="TorchServe target"):
        parse_target(target)


# --- two real TorchServes, tokens on ------------------------------------------------------


@pytest.fixture(scope="module")
@starts_torchserve
def second(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerInfo]:
    """A second TorchServe with tokens on (its own key), on its own free ports."""
    store = tmp_path_factory.mktemp("second_replica")
    with running_torchserve(model_repository, store, torchserve_settings(store)) as server:
        yield server


@pytest.fixture(scope="module")
def key_dir(
    torchserve: RunningTorchServe, second: ServerInfo, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Both replicas' keys, published as the entry point does."""
    directory = tmp_path_factory.mktemp("keys")
    publish_key(torchserve.server, directory)
    publish_key(second, directory)
    assert torchserve.server.key("inference") != second.key("inference")
    return directory


def digits(count: int, seed: int) -> np.ndarray:
    """A float32 ConvNet batch."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 3, 28, 28)).astype(np.float32)


async def send(client: TorchServeClient, calls: int, runner_path: Path) -> None:
    """``calls`` batches, four at a time; every answer must match the in-process model."""
    runner = load_runner(runner_path, "torchscript", "cpu")
    for first in range(0, calls, 4):
        batches = [digits(1 + (first + i) % 3, first + i) for i in range(min(4, calls - first))]
        outputs = await asyncio.gather(
            *(client.predict_batch("convnet", b, timeout_s=60) for b in batches)
        )
        for items, answer in zip(batches, outputs, strict=True):
            assert np.abs(answer - runner.infer(items)).max() <= TOLERANCE


@pytest.mark.torchserve
async def test_batches_spread_over_replicas_each_with_its_own_key(
    torchserve: RunningTorchServe, second: ServerInfo, key_dir: Path
) -> None:
    servers = [torchserve.server, second]
    target = "ipv4:" + ",".join(server.grpc_target for server in servers)
    client = TorchServeClient(target, KeyDir(key_dir))
    try:
        before = [served_requests(server) for server in servers]
        await send(client, 24, torchserve.repository / "convnet" / "1" / "model.pt")
        served = [served_requests(s) - b for s, b in zip(servers, before, strict=True)]
    finally:
        await client.close()
    assert sum(served) == 24, served
    # Turns alternate; a quarter each leaves room for a retry on the other replica.
    assert min(served) >= 24 / 4, served


@pytest.mark.torchserve
async def test_a_wrong_key_on_one_replica_sends_its_batches_to_the_other(
    torchserve: RunningTorchServe, second: ServerInfo, tmp_path: Path
) -> None:
    publish_key(torchserve.server, tmp_path)
    (tmp_path / f"{address_of(second).host}_{address_of(second).port}.json").write_text(
        '{"inference": {"key": "stale"}}'
    )
    target = f"ipv4:{torchserve.grpc_target},{second.grpc_target}"
    client = TorchServeClient(target, KeyDir(tmp_path))
    try:
        before = served_requests(torchserve.server)
        await send(client, 8, torchserve.repository / "convnet" / "1" / "model.pt")
        assert served_requests(torchserve.server) - before == 8
    finally:
        await client.close()


@pytest.mark.torchserve
async def test_replicas_join_and_leave_the_rotation_as_resolution_changes(
    torchserve: RunningTorchServe, second: ServerInfo, key_dir: Path
) -> None:
    """A replica that appears gets batches; one that disappears gets none, and no call fails."""
    first, added = torchserve.server, second
    resolved = [address_of(first)]
    client = TorchServeClient(
        "dns:///torchserve.test:7070",
        KeyDir(key_dir),
        resolve_interval_s=0.1,
        resolver=lambda: list(resolved),
    )
    model = torchserve.repository / "convnet" / "1" / "model.pt"
    try:
        added_before = served_requests(added)
        await send(client, 8, model)
        assert client.replicas.addresses == [address_of(first)]
        assert served_requests(added) == added_before, "a replica not resolved got batches"

        resolved.append(address_of(added))
        # The client re-resolves in the background.
        await wait_until_async(
            lambda: len(client.replicas.addresses) == 2, WAIT_S, "the new replica joining", 0.05
        )
        await send(client, 16, model)
        assert served_requests(added) - added_before >= 16 / 4

        # The first replica leaves while calls run: they all finish, on either replica.
        load = asyncio.create_task(send(client, 24, model))
        await asyncio.sleep(0.2)
        resolved.remove(address_of(first))
        await wait_until_async(
            lambda: client.replicas.addresses == [address_of(added)], WAIT_S, "leaving", 0.05
        )
        await load
        first_after = served_requests(first)
        added_after = served_requests(added)
        await send(client, 12, model)
        assert served_requests(first) == first_after, "a replica that left still got batches"
        assert served_requests(added) - added_after == 12
    finally:
        await client.close()
